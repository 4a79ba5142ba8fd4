"""Lettering in every script: font chains, glyph fallback per character, family names, right to
left order, and the one-line errors of `anystory validate`.

The fonts these tests rely on are the packaged comic font and fonts built here with fontTools
(each glyph a box of its own size, so where a glyph landed can be measured). The test that
renders real Chinese needs an installed CJK font and is skipped without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from anystory_cli import cli, fonts
from anystory_cli.errors import FontError
from anystory_cli.layout import PageSpec, PanelText, compose_page, fit_text, plan_lettering, wrap_text

COMIC = str(fonts.default_font_path())
UNITS = 1000
NO_FONT_HAS = "\U0010fffd"  # the last private-use code point: no real font maps it
runner = CliRunner()


def build_font(path: Path, family: str, boxes: dict[str, tuple[int, int]]) -> Path:
    """A TrueType font whose glyph for each character is a filled box (width, height) in font
    units, on the baseline, advance = width + 100."""
    names = [".notdef"] + [f"g{ord(c):04X}" for c in boxes]
    builder = FontBuilder(UNITS, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({ord(c): f"g{ord(c):04X}" for c in boxes})
    glyphs, metrics = {}, {}
    for name, (width, height) in [(".notdef", (400, 700)), *((f"g{ord(c):04X}", b) for c, b in boxes.items())]:
        pen = TTGlyphPen(None)
        if name != ".notdef":
            pen.moveTo((50, 0))
            pen.lineTo((50, height))
            pen.lineTo((50 + width, height))
            pen.lineTo((50 + width, 0))
            pen.closePath()
        glyphs[name] = pen.glyph()
        metrics[name] = (width + 100, 50)
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics(metrics)
    builder.setupHorizontalHeader(ascent=900, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=900, sTypoDescender=-200, usWinAscent=900, usWinDescent=200)
    builder.setupPost()
    path.parent.mkdir(parents=True, exist_ok=True)
    builder.save(str(path))
    return path


# Han characters and Hebrew letters of distinct sizes; a space so words can be wrapped.
HAN = {"中": (800, 800), "文": (800, 500), "风": (800, 300), "，": (100, 100), " ": (0, 0)}
HEBREW = {"\u05d0": (300, 600), "\u05d1": (300, 400), "\u05d2": (300, 200), " ": (0, 0)}


@pytest.fixture(autouse=True)
def _fresh_font_caches():
    fonts.clear_caches()
    yield
    fonts.clear_caches()


@pytest.fixture
def han_font(tmp_path) -> Path:
    return build_font(tmp_path / "fonts" / "han.ttf", "Test Han", HAN)


@pytest.fixture
def hebrew_font(tmp_path) -> Path:
    return build_font(tmp_path / "fonts" / "hebrew.ttf", "Test Hebrew", HEBREW)


def ink_columns(image: Image.Image) -> list[tuple[int, int, int]]:
    """(x0, x1, height) of each stretch of columns with ink, left to right."""
    ink = np.asarray(image.convert("L")) < 128
    columns = ink.any(axis=0)
    found, start = [], None
    for x, on in enumerate([*columns, False]):
        if on and start is None:
            start = x
        elif not on and start is not None:
            rows = np.flatnonzero(ink[:, start:x].any(axis=1))
            found.append((start, x, int(rows[-1] - rows[0] + 1)))
            start = None
    return found


def draw_line(chain: fonts.FontChain, text: str, size: int = 50, raqm: bool | None = None) -> Image.Image:
    image = Image.new("L", (600, 100), 255)
    font = chain.at(size)
    if raqm is not None:
        font.raqm = raqm
    font.draw(ImageDraw.Draw(image), 10, 80, text, 0)
    return image


# --------------------------------------------------------------------------------------------
# Per character: the first font that has the glyph
# --------------------------------------------------------------------------------------------


def test_each_character_comes_from_the_first_font_that_has_it(han_font):
    chain = fonts.font_chain([COMIC, str(han_font)], fallbacks=False)
    comic, han = chain.faces
    assert [(face, text) for face, text in chain.runs("Hi 中文!")] == [
        (comic, "Hi "), (han, "中文"), (comic, "!")]
    # The order of the list decides: the Han font first draws its space too.
    reverse = fonts.font_chain([str(han_font), COMIC], fallbacks=False)
    assert [(face.path, text) for face, text in reverse.runs("中 Hi")] == [
        (str(han_font), "中 "), (COMIC, "Hi")]
    assert chain.undrawable(f"Hi 中文 {NO_FONT_HAS}") == [NO_FONT_HAS]
    # Coverage is read from the fonts' character maps, not guessed.
    assert ord("中") in fonts.character_map(han) and ord("中") not in fonts.character_map(comic)


def test_the_fallback_glyph_is_drawn_and_measured(han_font):
    chain = fonts.font_chain([COMIC, str(han_font)], fallbacks=False)
    # 中 is an 800 x 800 unit box: 40 x 40 px at 50 px, advance 900 units = 45 px.
    assert chain.at(50).getlength("中中") == pytest.approx(90, abs=1)
    (x0, x1, height), = ink_columns(draw_line(chain, "中"))
    assert (x1 - x0, height) == (40, 40)
    # A mixed line: the comic font's ink, then the 40 px box, then the 15 px box of 风.
    columns = ink_columns(draw_line(chain, "A中风"))
    assert [c[2] for c in columns[-2:]] == [40, 15]


def test_wrapping_and_fitting_measure_with_the_fallback_fonts(han_font):
    chain = fonts.font_chain([COMIC, str(han_font)], fallbacks=False)
    font = chain.at(50)
    lines = wrap_text("中中中中中中", font, 100)  # 45 px each: two to a line
    assert lines == ["中中", "中中", "中中"]
    assert all(font.getlength(line) <= 120 for line in wrap_text("Hi 中文风 中文 风风风", font, 120))
    # A Han line breaks between any two characters (not before closing punctuation).
    assert wrap_text("Hi 中中中", font, font.getlength("Hi 中") + 1) == ["Hi 中", "中中"]
    assert fonts.is_cjk("，")
    assert wrap_text("中中，中", font, 95) == ["中", "中，", "中"]  # not ["中中", "，中"]
    block = fit_text("中文风", chain, 200, 100, max_size=50)
    assert block.font_size == 50 and block.width == 135 and block.lines == ("中文风",)


def test_a_page_letters_a_mixed_caption(han_font):
    spec = PageSpec(300, 300, (1,), font=(COMIC, str(han_font)))
    text = PanelText(caption="Hi 中中中")
    page = compose_page(spec, [Image.new("RGB", (8, 8), (255, 255, 255))], [text])
    x0, y0, x1, y1 = plan_lettering((300, 300), text, font=spec.font, inset=4).caption.rect
    caption = page.crop((x0 + 2, y0 + 2, x1 - 2, y1 - 2))  # inside the caption's outline
    # Three square boxes of the Han font, side by side, after the comic font's "Hi".
    boxes = [c for c in ink_columns(caption) if c[1] - c[0] == c[2] and c[2] > 8]
    assert len(boxes) == 3


# --------------------------------------------------------------------------------------------
# Right to left
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raqm", [True, False], ids=["raqm", "basic-layout"])
def test_hebrew_keeps_its_right_to_left_order(hebrew_font, raqm):
    if raqm and not fonts.raqm_available():
        pytest.skip("Pillow without raqm")
    chain = fonts.font_chain([COMIC, str(hebrew_font)], fallbacks=False)
    # Alef (600 units tall), bet (400), gimel (200): read right to left, alef is rightmost.
    heights = [c[2] for c in ink_columns(draw_line(chain, "\u05d0\u05d1\u05d2", raqm=raqm))]
    assert heights == [10, 20, 30]
    # In a left-to-right line the Hebrew word still reads right to left, after the Latin.
    columns = ink_columns(draw_line(chain, "Hi \u05d0\u05d1\u05d2!", raqm=raqm))
    hebrew = [c[2] for c in columns if c[2] in (10, 20, 30)]
    assert hebrew == [10, 20, 30]
    assert columns[0][2] not in (10, 20, 30)  # "Hi" stays on the left


def test_a_right_to_left_caption_line_is_set_flush_right(hebrew_font):
    spec = PageSpec(300, 300, (1,), font=(COMIC, str(hebrew_font)))
    text = PanelText(caption="Hi there, friend\n\u05d0\u05d1")
    page = compose_page(spec, [Image.new("RGB", (8, 8), (255, 255, 255))], [text])
    block = plan_lettering((300, 300), text, font=spec.font, inset=4).caption
    x0, y0, x1, y1 = block.rect
    caption = np.asarray(page.convert("L").crop((x0 + 2, y0 + 2, x1 - 2, y1 - 2))) < 128
    rows = np.flatnonzero(caption.any(axis=1))
    split = y0 + 2 + block.text.ascent + block.text.line_height // 2  # between the two lines
    first, second = caption[: split - y0 - 2], caption[split - y0 - 2:]
    right_of = [np.flatnonzero(part.any(axis=0)).max() for part in (first, second)]
    assert rows.size and abs(right_of[0] - right_of[1]) <= 2  # both end at the block's right


def test_a_right_to_left_line_puts_latin_words_in_their_place(hebrew_font):
    chain = fonts.font_chain([COMIC, str(hebrew_font)], fallbacks=False)
    runs = fonts.visual_runs(chain, "\u05d0\u05d1 Mira \u05d2!")
    # Display order, left to right: "!", gimel, " ", "Mira", then alef-bet and the space after
    # it (one run of the Hebrew font, drawn right to left).
    assert [r.text for r in runs] == ["!", "\u05d2", " ", "Mira", "\u05d0\u05d1 "]
    assert [r.rtl for r in runs] == [True, True, True, False, True]


@pytest.mark.parametrize("text, levels", [
    ("abc", [0, 0, 0]),
    ("\u05d0\u05d1 12", [1, 1, 1, 2, 2]),  # numbers in a right-to-left line stay left to right
    ("\u0627 12 ok", [1, 1, 2, 2, 1, 2, 2]),  # after Arabic, 12 is an Arabic number
    ("ab \u05d0\u05d1 cd", [0, 0, 0, 1, 1, 0, 0, 0]),
    ("\u05d0 (x) \u05d1", [1, 1, 1, 2, 1, 1, 1]),
])
def test_bidi_levels(text, levels):
    assert fonts.bidi_levels(text, fonts.base_direction(text) == "rtl") == levels


@pytest.mark.skipif(not fonts.raqm_available(), reason="Pillow without raqm")
def test_runs_in_one_font_draw_exactly_as_raqm_lays_out_the_whole_line(tmp_path):
    boxes = {c: (100 + 40 * n, 100 + 50 * n) for n, c in enumerate("ab12\u05d0\u05d1\u05d2 !(),.")}
    face = fonts.Face(str(build_font(tmp_path / "all.ttf", "All", boxes)))
    chain = fonts.FontChain((face,))
    for text in ["\u05d0\u05d1 ab \u05d2!", "ab (\u05d0\u05d1) 12.", "\u05d0 12, ab \u05d1\u05d2",
                 "a \u05d0\u05d1\u05d2 b", "\u05d0 (ab) \u05d1", "\u05d0 (\u05d1 a) b", "(\u05d0) [a]."]:
        ours = draw_line(chain, text)
        reference = Image.new("L", (600, 100), 255)
        ImageDraw.Draw(reference).text((10, 80), text, font=fonts.load_face(face, 50), fill=0,
                                       anchor="ls")
        assert np.array_equal(np.asarray(ours), np.asarray(reference)), text


# --------------------------------------------------------------------------------------------
# Finding fonts by family name
# --------------------------------------------------------------------------------------------


def test_a_family_name_is_found_in_the_font_folders(tmp_path, monkeypatch):
    path = build_font(tmp_path / "folder" / "sub" / "kite.ttf", "Kite Test Sans", HAN)
    build_font(tmp_path / "folder" / "other.ttf", "Other Test", HEBREW)
    monkeypatch.setattr(fonts, "_faces_from_fontconfig", lambda: None)
    monkeypatch.setattr(fonts, "_font_folders", lambda: [tmp_path / "folder"])
    face = fonts.find_family("kite test SANS")
    assert face is not None and face.path == str(path)
    assert fonts.find_family("Luckiest Guy").path == COMIC  # the packaged font counts
    assert fonts.find_family("No Such Family") is None
    chain = fonts.font_chain("Kite Test Sans", fallbacks=False)
    assert [f.path for f in chain.faces] == [str(path)]


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="no fontconfig")
def test_a_family_name_is_found_through_fontconfig(tmp_path, monkeypatch):
    path = build_font(tmp_path / "folder" / "kite.ttf", "Kite Test Sans", HAN)
    conf = tmp_path / "fonts.conf"
    conf.write_text(f"<?xml version='1.0'?><fontconfig><dir>{tmp_path / 'folder'}</dir>"
                    f"<cachedir>{tmp_path / 'cache'}</cachedir></fontconfig>")
    monkeypatch.setenv("FONTCONFIG_FILE", str(conf))
    monkeypatch.setattr(fonts, "_font_folders", lambda: [])  # fontconfig alone must find it
    faces = fonts.installed_faces()
    assert [(f.path, f.families) for f in faces] == [(str(path), ("Kite Test Sans",))]
    assert fonts.find_family("Kite Test Sans").path == str(path)


def test_installed_fallbacks_follow_the_story_fonts(han_font, monkeypatch):
    han = fonts.InstalledFace(str(han_font), 0, ("WenQuanYi Micro Hei",), "Regular")
    monkeypatch.setattr(fonts, "installed_faces", lambda: (han,))
    chain = fonts.font_chain(None)
    assert [f.label for f in chain.faces] == ["Luckiest Guy", "WenQuanYi Micro Hei"]
    assert chain.undrawable("Hi 中文") == []


# --------------------------------------------------------------------------------------------
# Fonts that are not there: one error naming them
# --------------------------------------------------------------------------------------------


def test_missing_fonts_are_named(tmp_path, han_font, monkeypatch):
    monkeypatch.setattr(fonts, "installed_faces", lambda: ())
    with pytest.raises(FontError, match="no installed font is named 'Kite Sans'"):
        fonts.font_chain("Kite Sans")
    with pytest.raises(FontError, match=r"font file not found: .*nope\.ttf"):
        fonts.font_chain([COMIC, str(tmp_path / "nope.ttf")])
    with pytest.raises(FontError, match="none of the fonts in page.font is installed here: A, B"):
        fonts.font_chain(["A", "B"])
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font at all")
    with pytest.raises(FontError, match="cannot read font broken.ttf"):
        fonts.font_chain(str(broken))
    # In a list, a family that is not installed is skipped, and named when a glyph is missing.
    chain = fonts.font_chain([str(han_font), "Noto Sans CJK JP"])
    assert chain.missing == ("Noto Sans CJK JP",)
    message = chain.describe_missing(chain.undrawable("中 あ"))
    assert "'あ' (U+3042)" in message and "not installed here: Noto Sans CJK JP" in message
    assert "install a CJK font such as Noto Sans CJK" in message


def _story(folder: Path, page: dict | None = None, caption: str = "Hello!") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"title": "Fonts", "page": page or {},
            "panels": [{"prompt": "a hill", "caption": "Fine."}, {"prompt": "a hill", "caption": caption}]}
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _validate(path: Path):
    result = runner.invoke(cli.app, ["validate", str(path)])
    return result.exit_code, result.stderr.strip().splitlines()


def test_validate_accepts_a_font_list_with_a_font_beside_the_story(tmp_path, han_font):
    shutil.copy(han_font, tmp_path / "han.ttf")
    story = _story(tmp_path, {"font": ["Luckiest Guy", "han.ttf"]}, caption="Hi 中文风")
    code, lines = _validate(story)
    assert (code, lines) == (0, [])


@pytest.mark.parametrize("page, caption, expected", [
    ({"font": "fonts/nope.ttf"}, "Hello!", "page.font: font file not found: "),
    ({"font": ["Luckiest Guy", "nope.otf"]}, "Hello!", "page.font[1]: font file not found: "),
    ({"font": "No Such Family Sans"}, "Hello!", "page.font: no installed font is named 'No Such Family Sans'"),
    ({}, f"Stars {NO_FONT_HAS}", "panels[1].caption: no lettering font draws '\\U0010fffd' (U+10FFFD)"),
])
def test_validate_names_the_missing_font_or_glyphs_in_one_line(tmp_path, page, caption, expected):
    story = _story(tmp_path, page, caption)
    code, lines = _validate(story)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {story}: {expected}"), lines[0]


def test_without_a_cjk_font_a_chinese_story_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "installed_faces", lambda: ())
    out = tmp_path / "story.yaml"
    script = Path(__file__).parent / "data" / "storyboard_script.json"
    imported = runner.invoke(cli.app, ["import", "storyboard", str(script), "--out", str(out)])
    assert imported.exit_code == 0  # the story is valid; this machine cannot letter it
    warning, = imported.stderr.strip().splitlines()
    assert warning.startswith(f"warning: {script}: the narration cannot be lettered on this "
                              "machine: no lettering font draws '暴' (U+66B4)")
    assert "fonts-wqy-microhei" in warning
    code, lines = _validate(out)
    assert code == 1 and len(lines) == 4  # one line per captioned panel with Chinese
    assert all("no lettering font draws" in line and "install a CJK font such as Noto Sans CJK "
               "(Debian: fonts-noto-cjk)" in line for line in lines)
    assert lines[0].startswith(f"error: {out}: panels[0].caption: ")


# --------------------------------------------------------------------------------------------
# With a CJK font installed: a Chinese story validates and letters
# --------------------------------------------------------------------------------------------


def _installed_cjk() -> bool:
    try:
        return not fonts.font_chain(None).undrawable("中文字")
    except FontError:
        return False


@pytest.mark.skipif(not _installed_cjk(), reason="no CJK font installed (e.g. fonts-wqy-microhei)")
def test_a_chinese_story_validates_and_letters_with_an_installed_cjk_font(tmp_path):
    example = Path(__file__).parents[1] / "stories" / "storyboard_example.json"
    out = tmp_path / "story.yaml"
    assert runner.invoke(cli.app, ["import", "storyboard", str(example), "--out", str(out)]).exit_code == 0
    assert _validate(out) == (0, [])
    spec = PageSpec(400, 300, (1,))
    text = PanelText(caption="一阵大风吹走了小狐狸的红风筝。", dialogue=(("bolt", "别担心！OK?"),),
                     characters=("bolt",), boxes=((0.5, 0.2, 1.0, 1.0),))
    page = compose_page(spec, [Image.new("RGB", (8, 8), (255, 255, 255))], [text])
    ink = np.asarray(page.convert("L").crop((10, 10, 390, 120))) < 128
    assert ink.sum() > 500  # the caption and the balloon are lettered, not left empty
