"""Lettering fonts: which font draws each character of a caption or balloon.

`page.font` names one font or a list: a font file (`.ttf`, `.otf`, `.ttc`, `.otc`, relative to the
story) or the family name of an installed font ("Noto Sans CJK JP"). The fonts form a chain,
tried in order for every character: each glyph comes from the first font whose character map
(read with fontTools) has it. After the story's fonts come the installed ones of
`FALLBACK_FAMILIES` (common fonts for Latin, Cyrillic, Greek, Arabic, Hebrew, Chinese, Japanese
and Korean on Linux, macOS and Windows), so a caption in Chinese renders wherever a CJK font is
installed. Without `page.font` the chain starts with the packaged comic font (Luckiest Guy).

Installed fonts are listed by fontconfig (`fc-list`) where it exists, else by scanning the usual
font folders and reading each file's family names with fontTools. A single font that is not
found, a font file that is missing or unreadable, and text no font in the chain can draw raise
`FontError` naming the font or the characters. In a list, a family name that is not installed is
skipped (a list may name fonts for several systems); it is named when a character is left that
no installed font draws.

Right-to-left text (Arabic, Hebrew) is laid out by `visual_runs`: the line's runs of one font
and one embedding level are put in display order by the Unicode bidirectional algorithm
(`bidi_levels`: its rules for numbers, brackets and neutrals, W1-W7, N0-N2, I1-I2, and L2's
reordering; explicit embedding controls are not interpreted), and each right-to-left run is
drawn by Pillow's raqm layout, which shapes it (Arabic letters join) and orders its glyphs. Without raqm (`PIL.features.check('raqm')` false) the
characters of a right-to-left run are reversed here: the order is right, but Arabic letters are
drawn in their isolated forms. No torch.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont, features

from anystory_cli.errors import FontError

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
DEFAULT_FAMILY = "Luckiest Guy"  # the packaged comic font (fontpkg-luckiest-guy)
# Tried after the story's fonts, in this order; only the installed ones count.
FALLBACK_FAMILIES = (
    "DejaVu Sans", "Noto Sans", "Liberation Sans", "Arial", "Helvetica", "Segoe UI",
    "Noto Sans Arabic", "Noto Naskh Arabic", "Noto Sans Hebrew",
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Source Han Sans SC", "Source Han Sans", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
    "Droid Sans Fallback", "PingFang SC", "Hiragino Sans", "Hiragino Sans GB",
    "Apple SD Gothic Neo", "Microsoft YaHei", "Yu Gothic", "Meiryo", "Malgun Gothic",
    "Arial Unicode MS",
)
CJK_HINT = ("install a CJK font such as Noto Sans CJK (Debian: fonts-noto-cjk) or WenQuanYi "
            "Micro Hei (Debian: fonts-wqy-microhei), or name one in page.font")
# Folders searched when fontconfig is not there.
_FONT_FOLDERS = (
    "/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
    "/Library/Fonts", "/System/Library/Fonts", "~/Library/Fonts",
    "%WINDIR%/Fonts", "%LOCALAPPDATA%/Microsoft/Windows/Fonts",
)
_REGULAR_STYLES = ("regular", "book", "normal", "roman", "medium", "")


def raqm_available() -> bool:
    """Whether Pillow lays out text with raqm (shaping and right-to-left order)."""
    return bool(features.check("raqm"))


@dataclass(frozen=True)
class Face:
    """One font face: a file, the face's index in a collection, and the name a user knows."""

    path: str
    index: int = 0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


# --------------------------------------------------------------------------------------------
# Finding fonts
# --------------------------------------------------------------------------------------------


def is_font_file_entry(entry: str) -> bool:
    """Whether a `page.font` entry names a file (a font suffix or a folder part), not a family."""
    return entry.lower().endswith(FONT_SUFFIXES) or "/" in entry or "\\" in entry


def default_font_path() -> Path:
    """The Luckiest Guy .ttf shipped by the `fontpkg-luckiest-guy` package."""
    try:
        import fontpkg_luckiest_guy
    except ImportError:
        raise FontError("the lettering font is missing: pip install fontpkg-luckiest-guy") from None
    fonts = sorted((fontpkg_luckiest_guy.ROOT / "files").glob("*.ttf"))
    if not fonts:
        raise FontError(f"no .ttf in {fontpkg_luckiest_guy.ROOT}; reinstall fontpkg-luckiest-guy")
    return fonts[0]


@dataclass(frozen=True)
class InstalledFace:
    path: str
    index: int
    families: tuple[str, ...]
    style: str


def _family_key(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.casefold())


@lru_cache(maxsize=1)
def installed_faces() -> tuple[InstalledFace, ...]:
    """Every installed font face, with its family names (all languages) and style."""
    faces = _faces_from_fontconfig()
    if faces is None:
        faces = _faces_from_folders(_font_folders())
    return tuple(sorted(faces, key=lambda f: (f.path, f.index)))


def _faces_from_fontconfig() -> list[InstalledFace] | None:
    """fc-list's view of the installed fonts; None when fontconfig is not there or fails."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return None
    try:
        done = subprocess.run(
            [fc_list, "--format", "%{file}\\t%{index}\\t%{family}\\t%{style}\\n"],
            capture_output=True, timeout=60, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    faces = []
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or not parts[0].lower().endswith(FONT_SUFFIXES):
            continue
        path, index, families, style = parts
        names = tuple(n.replace("\\,", ",").strip() for n in re.split(r"(?<!\\),", families))
        faces.append(InstalledFace(path, int(index) if index.isdigit() else 0,
                                   tuple(n for n in names if n), style.split(",")[0].strip()))
    return faces


def _font_folders() -> list[Path]:
    folders = []
    for folder in _FONT_FOLDERS:
        expanded = os.path.expandvars(os.path.expanduser(folder))
        if "%" not in expanded and "$" not in expanded:
            folders.append(Path(expanded))
    return folders


def _faces_from_folders(folders: Iterable[Path]) -> list[InstalledFace]:
    """The font files under `folders`, their family names read from their name tables."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    faces = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.name.lower().endswith(FONT_SUFFIXES) or not path.is_file():
                continue
            try:
                if path.suffix.lower() in (".ttc", ".otc"):
                    fonts = TTCollection(str(path), lazy=True).fonts
                else:
                    fonts = [TTFont(str(path), lazy=True)]
                for index, font in enumerate(fonts):
                    families, style = _names(font)
                    if families:
                        faces.append(InstalledFace(str(path), index, families, style))
            except (TTLibError, OSError, ValueError, KeyError, AssertionError, struct.error):
                continue  # not a font fontTools reads: not one we can check glyphs of either
    return faces


def _names(font) -> tuple[tuple[str, ...], str]:
    """(family names, English first, then other languages; style) from a font's name table."""
    if "name" not in font:
        return (), ""
    found: list[tuple[tuple, str]] = []
    styles: list[tuple[tuple, str]] = []
    for record in font["name"].names:
        try:
            text = record.toUnicode().strip()
        except (UnicodeDecodeError, ValueError):
            continue
        english = (record.platformID, record.langID) in ((3, 0x409), (1, 0), (0, 0))
        if record.nameID in (16, 1) and text:
            found.append(((not english, record.nameID != 16), text))
        if record.nameID in (17, 2) and text:
            styles.append(((not english, record.nameID != 17), text))
    families: list[str] = []
    for _, text in sorted(found, key=lambda item: item[0]):
        if text not in families:
            families.append(text)
    style = min(styles, key=lambda item: item[0])[1] if styles else ""
    return tuple(families), style


@lru_cache(maxsize=1)
def _family_index() -> dict[str, list[InstalledFace]]:
    """Installed faces by each of their family names (case, spaces, '-' and '_' ignored)."""
    index: dict[str, list[InstalledFace]] = {}
    for face in installed_faces():
        for name in face.families:
            entries = index.setdefault(_family_key(name), [])
            if face not in entries:
                entries.append(face)
    return index


def find_family(family: str) -> Face | None:
    """The installed face of `family` (any of its names, case and spaces ignored), its regular
    style preferred; the packaged comic font counts as installed. None if there is none."""
    key = _family_key(family)
    if key == _family_key(DEFAULT_FAMILY):
        return Face(str(default_font_path()), 0, DEFAULT_FAMILY)
    matches = _family_index().get(key, [])
    if not matches:
        return None

    def rank(face: InstalledFace) -> tuple:
        style = face.style.casefold()
        primary = _family_key(face.families[0]) == key
        regular = style in _REGULAR_STYLES
        plain = not any(w in style for w in ("bold", "italic", "oblique", "light", "thin", "black"))
        return (not primary, not regular, not plain, len(style), face.path, face.index)

    best = min(matches, key=rank)
    return Face(best.path, best.index, family)


def resolve_entry(entry: str) -> Face | None:
    """A `page.font` entry as a face: a file (FontError if it is not there) or an installed
    family (None if it is not installed)."""
    if is_font_file_entry(entry):
        path = Path(entry).expanduser()
        if not path.is_file():
            raise FontError(f"font file not found: {path}")
        return Face(str(path), 0, path.name)
    return find_family(entry)


@lru_cache(maxsize=256)
def character_map(face: Face) -> frozenset[int]:
    """The code points `face` has a glyph for (its best cmap subtable, via fontTools)."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        font = TTFont(face.path, fontNumber=face.index, lazy=True)
        cmap = font.getBestCmap()
    except (TTLibError, OSError, ValueError, KeyError, AssertionError, struct.error) as exc:
        raise FontError(f"cannot read font {face.label} ({face.path}): {exc}") from None
    if not cmap:
        raise FontError(f"font {face.label} ({face.path}) has no Unicode character map")
    return frozenset(cmap)


@lru_cache(maxsize=256)
def load_face(face: Face, size: int, basic: bool = False) -> ImageFont.FreeTypeFont:
    """`face` at `size`; `basic`: Pillow's basic layout (no shaping, no reordering) even where
    raqm is available."""
    engine = ImageFont.Layout.BASIC if basic else None
    try:
        return ImageFont.truetype(face.path, size, index=face.index, layout_engine=engine)
    except OSError as exc:
        raise FontError(f"cannot load font {face.label} ({face.path}): {exc}") from None


# --------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------


def _is_format(char: str) -> bool:
    """Whitespace, format characters (ZWJ...) and variation selectors: no glyph of their own."""
    code = ord(char)
    return (char.isspace() or unicodedata.category(char) == "Cf" or 0xFE00 <= code <= 0xFE0F
            or 0xE0100 <= code <= 0xE01EF)


def _is_mark(char: str) -> bool:
    """A combining mark (an Arabic vowel sign, an accent): a glyph drawn on the one before."""
    return unicodedata.category(char) in ("Mn", "Me") and not _is_format(char)


@dataclass(frozen=True)
class FontChain:
    """Faces tried in order for each character. `missing`: fonts the story named that are not
    installed (skipped)."""

    faces: tuple[Face, ...]
    missing: tuple[str, ...] = ()
    named: tuple[str, ...] = ()  # what the story's page.font said, for messages

    def face_for(self, char: str, previous: Face | None = None) -> Face | None:
        """The first face with a glyph for `char`. Whitespace and format characters, and
        combining marks the previous character's face has, stay with that face (a run is not
        cut by them)."""
        if _is_format(char):
            return previous or (self.faces[0] if self.faces else None)
        code = ord(char)
        if previous is not None and _is_mark(char) and code in character_map(previous):
            return previous
        for face in self.faces:
            if code in character_map(face):
                return face
        return None

    def runs(self, text: str) -> list[tuple[Face | None, str]]:
        """`text` cut where the face changes: [(face, characters), ...] in logical order."""
        out: list[tuple[Face | None, str]] = []
        previous = None
        for char in text:
            face = self.face_for(char, previous)
            if out and out[-1][0] == face:
                out[-1] = (face, out[-1][1] + char)
            else:
                out.append((face, char))
            previous = face
        return out

    def undrawable(self, text: str) -> list[str]:
        """Characters of `text` no face in the chain has, in order, once each."""
        missing: list[str] = []
        previous = None
        for char in text:
            face = self.face_for(char, previous)
            if face is None and char not in missing:
                missing.append(char)
            previous = face if face is not None else previous
        return missing

    def describe_missing(self, characters: Sequence[str]) -> str:
        """Why these characters cannot be drawn and what to do, for one error line."""
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in characters[:12])
        if len(characters) > 12:
            shown += f" and {len(characters) - 12} more"
        used = ", ".join(self.named) if self.named else DEFAULT_FAMILY
        message = f"no lettering font draws {shown} (page.font: {used}; installed fallbacks " \
                  f"searched)"
        if self.missing:
            message += f"; not installed here: {', '.join(self.missing)}"
        if any(is_cjk(c) for c in characters):
            return f"{message}; {CJK_HINT}"
        return f"{message}; change the text, install a font that has them, or name one in page.font"

    def at(self, size: int) -> ChainFont:
        return ChainFont(self, size)


def is_cjk(char: str) -> bool:
    """Han, kana, Hangul, CJK punctuation and full-width forms."""
    code = ord(char)
    return (0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF
            or 0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x3FFFF)


def normalise_spec(spec: str | os.PathLike[str] | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, (str, os.PathLike)):
        return (str(spec),)
    return tuple(str(entry) for entry in spec)


def font_chain(spec: str | os.PathLike[str] | Sequence[str] | None = None,
               fallbacks: bool = True) -> FontChain:
    """The chain for a `page.font` value (None: the packaged comic font), followed by the
    installed fallback fonts unless `fallbacks` is False. FontError if a single named font is
    not found, a font file is missing or unreadable, or a list has no font installed here."""
    return _font_chain(normalise_spec(spec), fallbacks)


@lru_cache(maxsize=32)
def _font_chain(entries: tuple[str, ...], fallbacks: bool) -> FontChain:
    faces: list[Face] = []
    missing: list[str] = []
    for entry in entries or (DEFAULT_FAMILY,):
        face = resolve_entry(entry)
        if face is None:
            if len(entries) == 1:
                raise FontError(f"no installed font is named {entry!r}; give a font file "
                                f"(.ttf/.otf/.ttc) or the family name of an installed font "
                                f"({_family_hint()})")
            missing.append(entry)
            continue
        character_map(face)  # unreadable: say so now, naming the font
        if face not in faces:
            faces.append(face)
    if entries and not faces:
        raise FontError(f"none of the fonts in page.font is installed here: {', '.join(entries)}; "
                        f"{_family_hint()}")
    if fallbacks:
        for family in FALLBACK_FAMILIES:
            face = find_family(family)
            if face is not None and all((face.path, face.index) != (f.path, f.index) for f in faces):
                faces.append(face)
    return FontChain(tuple(faces), tuple(missing), entries)


def _family_hint() -> str:
    if shutil.which("fc-list"):
        return "`fc-list : family` lists the installed families"
    return "installed fonts are looked for in the usual font folders"


# --------------------------------------------------------------------------------------------
# Measuring and drawing with a chain
# --------------------------------------------------------------------------------------------

_RTL_CLASSES = ("R", "AL")


def has_rtl(text: str) -> bool:
    return any(unicodedata.bidirectional(c) in _RTL_CLASSES for c in text)


def base_direction(text: str) -> str:
    """'rtl' when the first strong character is right-to-left (Unicode rule P2), else 'ltr'."""
    for char in text:
        kind = unicodedata.bidirectional(char)
        if kind in _RTL_CLASSES:
            return "rtl"
        if kind == "L":
            return "ltr"
    return "ltr"


def bidi_levels(line: str, base_rtl: bool) -> list[int]:
    """Embedding level of each character: the Unicode bidirectional algorithm's weak, neutral
    and implicit rules (W1-W7, N1-N2, I1-I2) for one line without explicit embeddings."""
    types = [unicodedata.bidirectional(c) for c in line]
    sos = "R" if base_rtl else "L"
    for index, kind in enumerate(types):  # W1: a mark takes the type of the one before
        if kind == "NSM":
            types[index] = types[index - 1] if index else sos
    last_strong = sos
    for index, kind in enumerate(types):  # W2, W3: numbers after Arabic letters are Arabic
        if kind in ("L", "R", "AL"):
            last_strong = kind
        if kind == "EN" and last_strong == "AL":
            types[index] = "AN"
        if kind == "AL":
            types[index] = "R"
    for index in range(1, len(types) - 1):  # W4: 1,000 and 1.5 stay one number
        before, kind, after = types[index - 1], types[index], types[index + 1]
        if (before == after == "EN" and kind in ("ES", "CS")
                or before == after == "AN" and kind == "CS"):
            types[index] = before
    for index, kind in enumerate(types):  # W5: $100, 100% go with their number
        if kind == "ET":
            run_end = index
            while run_end < len(types) and types[run_end] == "ET":
                run_end += 1
            next_is_number = run_end < len(types) and types[run_end] == "EN"
            if (index and types[index - 1] == "EN") or next_is_number:
                for inner in range(index, run_end):
                    types[inner] = "EN"
    last_strong = sos
    for index, kind in enumerate(types):  # W6, W7: other separators are neutral; EN after L is L
        if kind in ("ES", "ET", "CS"):
            types[index] = "ON"
        elif kind in ("L", "R"):
            last_strong = kind
        elif kind == "EN" and last_strong == "L":
            types[index] = "L"
    _resolve_brackets(line, types, sos)
    # N1, N2: a neutral between two of one direction (numbers count as R) takes it, else the
    # line's direction.
    strength = ["R" if k in ("R", "EN", "AN") else "L" if k == "L" else None for k in types]
    after: list[str | None] = [None] * len(types)
    following: str | None = sos  # end of line: the line's direction (eos)
    for index in range(len(types) - 1, -1, -1):
        after[index] = following
        if strength[index] is not None:
            following = strength[index]
    before: str | None = sos
    for index, kind in enumerate(strength):
        if kind is not None:
            before = kind
            continue
        types[index] = before if before == after[index] else sos
    # I1, I2: implicit levels.
    base = 1 if base_rtl else 0
    levels = []
    for kind in types:
        if base == 0:
            levels.append(1 if kind == "R" else 2 if kind in ("AN", "EN") else 0)
        else:
            levels.append(2 if kind in ("L", "EN", "AN") else 1)
    return levels


# Paired brackets (Unicode's Bidi_Paired_Bracket pairs in common use): opening -> closing.
_BRACKETS = dict(zip(
    "([{\u0f3a\u0f3c\u2045\u207d\u208d\u2308\u230a\u2329\u2768\u276a\u27e6\u27e8"
    "\u3008\u300a\u300c\u300e\u3010\u3014\u3016\u3018\u301a\uff08\uff3b\uff5b\uff5f\uff62",
    ")]}\u0f3b\u0f3d\u2046\u207e\u208e\u2309\u230b\u232a\u2769\u276b\u27e7\u27e9"
    "\u3009\u300b\u300d\u300f\u3011\u3015\u3017\u3019\u301b\uff09\uff3d\uff5d\uff60\uff63",
))


def _resolve_brackets(line: str, types: list[str], sos: str) -> None:
    """N0: a bracket pair takes the line's direction when it holds a strong character of that
    direction, else the other direction when it holds one and the text before the pair has it
    too, else the line's direction; a pair with nothing strong inside stays neutral."""
    pairs: list[tuple[int, int]] = []
    stack: list[tuple[str, int]] = []
    for index, char in enumerate(line):
        if types[index] != "ON":
            continue
        if char in _BRACKETS:
            if len(stack) == 63:
                break
            stack.append((_BRACKETS[char], index))
        else:
            for depth in range(len(stack) - 1, -1, -1):
                if stack[depth][0] == char:
                    pairs.append((stack[depth][1], index))
                    del stack[depth:]
                    break
    embedding = sos

    def strength(kind: str) -> str | None:
        return "R" if kind in ("R", "EN", "AN") else "L" if kind == "L" else None

    for opening, closing in sorted(pairs):
        inside = {strength(k) for k in types[opening + 1:closing]} - {None}
        if not inside:
            continue
        if embedding in inside:
            direction = embedding
        else:  # only the other direction inside: the text before the pair decides
            direction = next((strength(k) for k in reversed(types[:opening]) if strength(k)), sos)
        types[opening] = types[closing] = direction


@dataclass(frozen=True)
class Run:
    face: Face
    text: str  # in logical order
    rtl: bool


def visual_runs(chain: FontChain, line: str, direction: str | None = None) -> list[Run]:
    """The runs of `line` (one face, one level each) in display order, left to right."""
    if not line:
        return []
    base_rtl = (direction or base_direction(line)) == "rtl"
    if not base_rtl and not has_rtl(line) and not any(
            unicodedata.bidirectional(c) == "AN" for c in line):
        char_levels = [0] * len(line)  # the common case: all left to right
    else:
        char_levels = bidi_levels(line, base_rtl)
    runs: list[Run] = []
    levels: list[int] = []
    previous = None
    for char, level in zip(line, char_levels):
        face = chain.face_for(char, previous) or (chain.faces[0] if chain.faces else None)
        if face is None:
            raise FontError(f"no lettering font is available for {char!r}")
        if runs and runs[-1].face == face and levels[-1] == level:
            runs[-1] = Run(face, runs[-1].text + char, level % 2 == 1)
        else:
            runs.append(Run(face, char, level % 2 == 1))
            levels.append(level)
        previous = face
    # L2: from the highest level down to the lowest odd one, reverse every stretch of runs at
    # that level or higher.
    lowest_odd = min((lv for lv in levels if lv % 2), default=None)
    if lowest_odd is not None or max(levels) > 0:
        floor = lowest_odd if lowest_odd is not None else 1
        for level in range(max(levels), floor - 1, -1):
            start = None
            for index in range(len(runs) + 1):
                inside = index < len(runs) and levels[index] >= level
                if inside and start is None:
                    start = index
                elif not inside and start is not None:
                    runs[start:index] = runs[start:index][::-1]
                    levels[start:index] = levels[start:index][::-1]
                    start = None
    return runs


class ChainFont:
    """A chain at one size, measured like a Pillow font (`getlength`), drawn run by run."""

    def __init__(self, chain: FontChain, size: int):
        self.chain = chain
        self.size = size
        self.raqm = raqm_available()

    def font(self, face: Face) -> ImageFont.FreeTypeFont:
        return load_face(face, self.size, basic=not self.raqm)

    def _run_text(self, run: Run) -> tuple[str, dict]:
        if not self.raqm:
            return (run.text[::-1] if run.rtl else run.text), {}
        return run.text, {"direction": "rtl" if run.rtl else "ltr"}

    def getlength(self, text: str) -> float:
        total = 0.0
        for run in visual_runs(self.chain, text):
            shown, options = self._run_text(run)
            total += self.font(run.face).getlength(shown, **options)
        return total

    def getmetrics(self, text: str | None = None) -> tuple[int, int]:
        """(ascent, descent): the largest of the faces `text` uses (the first face if None)."""
        faces = {run.face for run in visual_runs(self.chain, text)} if text else set()
        if not faces:
            faces = {self.chain.faces[0]}
        metrics = [self.font(face).getmetrics() for face in faces]
        return max(m[0] for m in metrics), max(m[1] for m in metrics)

    def single_face(self, text: str) -> Face | None:
        """The face that draws all of `text` left to right in one run, or None."""
        runs = visual_runs(self.chain, text)
        if len(runs) == 1 and not runs[0].rtl:
            return runs[0].face
        return None

    def draw(self, draw, x: float, baseline: float, text: str, fill) -> None:
        """Draw `text` with its left end at x, on the baseline."""
        for run in visual_runs(self.chain, text):
            shown, options = self._run_text(run)
            font = self.font(run.face)
            draw.text((x, baseline), shown, font=font, fill=fill, anchor="ls", **options)
            x += font.getlength(shown, **options)


def lettering_problems(story, source: str) -> list[str]:
    """Captions and dialogue the lettering fonts cannot draw, one line each naming the field;
    or one `page.font` line when the fonts themselves are wrong."""
    try:
        chain = font_chain(story.page.font)
    except FontError as exc:
        return [f"{source}: page.font: {exc}"]
    problems = []
    for index, panel in enumerate(story.panels):
        fields = [("caption", panel.caption)]
        fields += [(f"dialogue[{n}].text", line.text) for n, line in enumerate(panel.dialogue)]
        for name, text in fields:
            if not text:
                continue
            try:
                missing = chain.undrawable(text)
            except FontError as exc:
                return [f"{source}: page.font: {exc}"]
            if missing:
                problems.append(f"{source}: panels[{index}].{name}: "
                                f"{chain.describe_missing(missing)}")
    return problems


def clear_caches() -> None:
    """Forget the installed fonts and chains found so far (after fonts are installed)."""
    for cached in (installed_faces, _family_index, character_map, load_face, _font_chain):
        cached.cache_clear()
