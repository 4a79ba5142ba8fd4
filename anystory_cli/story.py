"""The YAML story format and its loader.

A story names its characters once, then lists its panels::

    title: The Lost Kite
    model: default
    seed: 1
    style: {prompt_prefix: "pixel art", steps: 25, guidance: 7.5}
    page: {size: A4, layout: auto, reading_order: ltr, dpi: 150}
    characters:
      mira: {image: characters/mira.png}
      bolt: {description: "a small round robot"}
    panels:
      - prompt: "mira and bolt on a hill at sunset"
        characters: [mira, {name: bolt, at: right}]
        caption: "The wind picked up."
        dialogue: [{who: mira, text: "Look, a kite!"}]

Panels may also set `seed`, `span: wide` (the panel fills a row), `page_break: true` and
`page_layout` (a new page with its own layout); see `anystory schema` for every field.

`load_story()` reports every problem of a file at once (`StoryError.problems`), each as
``<file>: <field path>: <what is wrong> (line N)``, top to bottom. Paths in the story resolve
relative to the YAML file. No torch here: `anystory validate` must stay instant.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from anystory_cli.errors import ModelError, StoryError
from anystory_cli.fonts import is_font_file_entry
from anystory_cli.hub import PUBLISHED_MODELS
from anystory_cli.sd.guidance import DEFAULT_INTERVAL as DEFAULT_GUIDANCE_INTERVAL
from anystory_cli.sd.guidance import inside_schedule
from anystory_cli.layout import LAYOUT_TEMPLATES, mm_to_px, page_size_px
from anystory_cli.loras import looks_like_hub_id
from anystory_cli.masks import ImageFileError, load_image
from anystory_cli.scores import MAX_TAKES

# Limits on what a story file may be. Each refuses hostile input with one clear line and sits
# far above what a real story needs (a long story is tens of KB, a few thousand nodes, 8
# levels deep).
# Checked before parsing: pure-Python YAML parses only about 100 KB a second.
MAX_STORY_BYTES = 1024 * 1024
# Anchors/aliases let a tiny file expand into a huge tree ("billion laughs"); cap the expansion
# (and the nodes of the file itself, counted while parsing, so a big flat file stops early).
MAX_EXPANDED_NODES = 200_000
# `title: [[[[...` recurses once per level in the YAML composer and in validation: stop at a
# depth no story reaches (panels[0].characters[0].at.box[0] is 8) and long before Python's
# recursion limit.
MAX_NESTING_DEPTH = 50
# A plain number is converted by Python's int(); a long one ('1:0:0:...' in base 60, or a
# million digits) costs quadratic time or exceeds int's digit limit. No field needs 100 chars.
MAX_NUMBER_CHARS = 100
DEFAULT_MAX_CHARACTERS = 4
MAX_REFERENCE_PIXELS = 4096 * 4096
MAX_PAGE_SIDE_PX = 20_000
MIN_CONTENT_PX = 64

# A character's name is also a file name (out/characters/<name>.png): letters, digits, '_' and
# '-' only, so no name holds '/', '..', a drive, a NUL or a newline. \Z, not $: '$' also
# matches before a final newline, and 'mira\n' would pass.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}\Z")
# Device names Windows reserves whatever the extension: 'con.png' is the console, not a file.
_RESERVED_NAMES = frozenset(
    ["con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))]
)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not be silently ignored); NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def is_character_name(value: str) -> bool:
    """Whether `value` may name a character (the rules `_check_name` enforces)."""
    return bool(_NAME_RE.match(value)) and value.lower() not in _RESERVED_NAMES


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise PydanticCustomError(
            "character_name",
            "character name {name} must start with a letter and use only letters, digits, "
            "'_' or '-' (at most 40)",
            {"name": repr(value)},
        )
    if value.lower() in _RESERVED_NAMES:
        raise PydanticCustomError(
            "character_name",
            "character name {name} is reserved for a device on Windows (con, prn, aux, nul, "
            "com0-9, lpt0-9); choose another",
            {"name": repr(value)},
        )
    return value


CharacterName = Annotated[str, AfterValidator(_check_name)]


def _non_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "must not be empty")
    return value


NonBlank = Annotated[str, AfterValidator(_non_blank)]


# --------------------------------------------------------------------------------------------
# Characters no text may hold
# --------------------------------------------------------------------------------------------

# One rule for every string of a story (title, prompts, captions, dialogue, names,
# descriptions, paths) and for what `import` takes from a storyboard script: control characters
# other than tab and newline (C0, DEL, C1: XML cannot hold most of them, a terminal obeys them),
# lone surrogates (no UTF-8 encoding exists: a PDF title, a UTF-8 file cannot be written) and
# non-characters (U+FFFE, U+FDD0..., never meant to be exchanged; XML refuses U+FFFE/U+FFFF).
# YAML writes them only as escapes ("\x00", "\ud800"), never by mistake.
_ALLOWED_CONTROLS = frozenset("\t\n")


def forbidden_kind(char: str) -> str | None:
    """'control character', 'lone surrogate' or 'non-character' when no text may hold `char`."""
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return "lone surrogate"
    if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:  # U+FFFE, U+1FFFF, ...
        return "non-character"
    if (code < 0x20 or 0x7F <= code <= 0x9F) and char not in _ALLOWED_CONTROLS:
        return "control character"
    return None


# The same set as one character class: a story is scanned in C, not character by character
# (test_the_scan_finds_exactly_the_characters_the_rule_names checks that both agree).
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
                        + "".join(f"{chr(plane << 16 | 0xFFFE)}-{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
                        + "]")


def forbidden_characters(text: str) -> list[tuple[int, str]]:
    """(index, character) of each character of `text` no text may hold, in order."""
    return [(match.start(), match.group()) for match in _FORBIDDEN.finditer(text)]


def without_forbidden(text: str) -> str:
    """`text` with the characters no text may hold removed."""
    return _FORBIDDEN.sub("", text)


def escape_forbidden(text: str) -> str:
    """`text` with each character no text may hold written as its escape ('\\x00'), for pages
    that show a value as it is."""
    return _FORBIDDEN.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def text_problem(text: str, what: str = "text") -> str | None:
    """Why `text` may not be used (the first forbidden character, where, how many), or None."""
    found = forbidden_characters(text)
    if not found:
        return None
    index, char = found[0]
    message = (f"{forbidden_kind(char)} U+{ord(char):04X} at character {index + 1}"
               + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
               + f" is not allowed in {what} (no control characters but tab and newline, no lone "
               "surrogates, no non-characters); remove it")
    if any(0xD800 <= ord(c) <= 0xDBFF and 0xDC00 <= ord(n) <= 0xDFFF for c, n in zip(text, text[1:])):
        message += (" and write a character beyond U+FFFF as one escape (\\U0001F600), not as a "
                    "pair of \\u escapes")
    return message


def _text_problems(data: Any) -> list[tuple[tuple, str]]:
    """(location, problem) of every string of a parsed story, mapping keys too, that holds a
    forbidden character."""
    found: list[tuple[tuple, str]] = []
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:  # iterative: the depth of a parsed document is capped, a dict's is not
        loc, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                found.append((loc, problem))
        elif isinstance(value, dict):
            for key in value:
                problem = text_problem(key, "a key") if isinstance(key, str) else None
                if problem:
                    found.append(((*loc, key), problem))
            stack.extend(((*loc, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, (list, tuple)):
            stack.extend(((*loc, index), item) for index, item in reversed(list(enumerate(value))))
    return found  # in document order: each container's items are taken first to last


# The longest file or folder name, and the longest path, Linux and macOS accept (in bytes): a
# longer one fails every file operation (ENAMETOOLONG), so it is refused with the text.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def path_problem(value: str) -> str | None:
    """Why `value` cannot name a file on this kind of system (too long), or None."""
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_PATH_BYTES:
        return f"a path of {size} bytes; at most {MAX_PATH_BYTES}"
    for part in re.split(r"[/\\]", value):
        size = len(part.encode("utf-8", "surrogateescape"))
        if size > MAX_NAME_BYTES:
            return f"a file or folder name of {size} bytes ({part[:20]!r}...); at most {MAX_NAME_BYTES}"
    return None


def _path_problems(data: Any) -> list[tuple[tuple, str]]:
    """(location, problem) of every path of a parsed story too long to name a file."""
    if not isinstance(data, dict):
        return []
    paths: list[tuple[tuple, Any]] = []
    model = data.get("model")
    if isinstance(model, dict):
        paths += [(("model", part), model.get(part)) for part in ("base", "redux", "adapter")]
    else:
        paths.append((("model",), model))
    characters = data.get("characters")
    for name, character in characters.items() if isinstance(characters, dict) else ():
        if isinstance(character, dict):
            paths += [(("characters", name, field), character.get(field)) for field in ("image", "mask")]
    style = data.get("style")
    loras = style.get("loras") if isinstance(style, dict) else None
    for index, lora in enumerate(loras if isinstance(loras, list) else []):
        if isinstance(lora, dict):
            paths.append((("style", "loras", index, "path"), lora.get("path")))
    page = data.get("page")
    fonts = page.get("font") if isinstance(page, dict) else None
    fonts = [(("page", "font"), fonts)] if isinstance(fonts, str) else (
        [(("page", "font", n), f) for n, f in enumerate(fonts)] if isinstance(fonts, list) else [])
    paths += [(loc, f) for loc, f in fonts if isinstance(f, str) and is_font_file_entry(f.strip())]
    found = []
    for loc, value in paths:
        problem = path_problem(value) if isinstance(value, str) and not text_problem(value) else None
        if problem:
            found.append((loc, problem))
    return found


class Box(_Strict):
    """A region of the panel in 0..1 coordinates, (x0, y0) top-left, (x1, y1) bottom-right."""

    box: Annotated[list[float], Field(min_length=4, max_length=4)]

    @field_validator("box")
    @classmethod
    def _ordered_inside_unit_square(cls, value: list[float]) -> list[float]:
        x0, y0, x1, y1 = value
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise PydanticCustomError(
                "box_range", "box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}",
                {"box": value},
            )
        return value


def _shape_of(value: Any) -> str | None:
    """Discriminator shared by the 'word or structure' unions below (None = neither)."""
    if isinstance(value, str):
        return "@word"
    if isinstance(value, Mapping):
        return "@mapping"
    if isinstance(value, (list, tuple)):
        return "@list"
    if isinstance(value, BaseModel):
        return "@mapping"
    return None


# Tags pydantic inserts into error locations for the unions below; they are not field names.
_UNION_TAGS = {"@word", "@mapping", "@list", "@name", "@folder", "@flux"}

Placement = Annotated[
    Union[
        Annotated[Literal["left", "right", "center"], Tag("@word")],
        Annotated[Box, Tag("@mapping")],
    ],
    Discriminator(
        _shape_of,
        custom_error_type="placement",
        custom_error_message="expected left, right, center or {box: [x0, y0, x1, y1]}",
    ),
]


class PixelSize(_Strict):
    """An explicit page size in pixels."""

    width: int = Field(ge=1, le=MAX_PAGE_SIDE_PX)
    height: int = Field(ge=1, le=MAX_PAGE_SIDE_PX)


PageSize = Annotated[
    Union[
        Annotated[Literal["A4", "A5", "Letter", "B5", "square"], Tag("@word")],
        Annotated[PixelSize, Tag("@mapping")],
    ],
    Discriminator(
        _shape_of,
        custom_error_type="page_size",
        custom_error_message="expected A4, A5, Letter, B5, square or {width: PX, height: PX}",
    ),
]

RowCounts = Annotated[
    list[Annotated[int, Field(ge=1, le=4)]], Field(min_length=1, max_length=6)
]
# A tuple subscript, not Literal["auto", *names]: star-unpacking there needs Python 3.11.
LayoutName = Literal[("auto", *LAYOUT_TEMPLATES)]  # type: ignore[valid-type]
Layout = Annotated[
    Union[Annotated[LayoutName, Tag("@word")], Annotated[RowCounts, Tag("@list")]],
    Discriminator(
        _shape_of,
        custom_error_type="layout",
        custom_error_message="expected auto, a template name ("
        + ", ".join(LAYOUT_TEMPLATES)
        + ") or a list of panels per row such as [2, 1, 3]",
    ),
]


class StyleLora(_Strict):
    """A LoRA that gives every panel its look (loaded beside the model's own weights, removed after
    the render)."""

    path: Annotated[NonBlank, Field(
        description="A .safetensors LoRA file, a folder holding one, or a hub id (owner/name) from the "
        "Hugging Face cache; a relative path is relative to the story file.")]
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="Weight of the LoRA (0: off).")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str, info: ValidationInfo) -> str:
        local = _resolve(Path(value), info)
        if looks_like_hub_id(value) and not local.exists():
            return value  # a hub id, resolved through the Hugging Face cache when rendering
        return str(local)


class Style(_Strict):
    """Story-wide generation defaults."""

    prompt_prefix: str = Field("", description="Put before every panel prompt, e.g. 'pixel art'.")
    prompt_suffix: str = Field("", description="Put after every panel prompt.")
    negative_prompt: str = Field("", description="Negative prompt of every panel.")
    steps: int = Field(25, ge=1, le=500, description="Denoising steps per panel (default: the model's own; "
                       "25, and 28 on FLUX as the released code).")
    guidance: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance scale (on FLUX: "
                            "FLUX.1-dev's distilled guidance, default 3.5). Default: the model's own.")
    resolution: int | None = Field(
        None, ge=64, le=4096, description="Long side of a drawn panel in pixels (default: the model's own "
        "size, 512 on FLUX; the short side follows the frame's shape).",
    )
    guidance_interval: Annotated[list[float], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: list(DEFAULT_GUIDANCE_INTERVAL),
        description="[low, high]: guide only the steps whose noise level t/T lies in it (0 clean, "
        "1 pure noise); guidance at the noisiest steps, where the layout is decided, leaves characters out.",
    )
    subject_strength: float = Field(
        1.0, ge=0.0, le=4.0, description="Weight of the character tokens (eta in the paper)."
    )
    reference_strength: float = Field(
        0.0, ge=-10.0, le=10.0, description="Bias towards reference features (gamma in the paper)."
    )
    reference_guidance: bool = Field(
        True, description="Guidance amplifies the characters' reference images too (the unconditional "
        "half draws without them); false keeps them in both halves, which draws the characters less like "
        "their references.",
    )
    paste_references_at: float | None = Field(
        None, ge=0.0, le=1.0, description="Noise level t/T (0 clean, 1 pure noise) at which "
        "each character's reference is pasted, noised, into its place and then redrawn into the scene, so "
        "that the base draws the character there and in its shape and colours; 0 turns it off. Default: "
        "the model's own (`anystory_defaults.json` in its folder; the embedded model's is 0.4); a model "
        "without one does not paste, as in the paper.",
    )

    takes: int = Field(
        1, ge=1, le=MAX_TAKES, description="Draw each panel with characters up to this many times, from "
        "seeds derived from its own, and keep the take whose weakest character's identity score is highest "
        "(never one with a blended or missing character when another has none); review.html shows them all. "
        "A panel's own `seed:` pins one take.",
    )
    min_identity: float | None = Field(
        None, ge=0.0, le=1.0, description="Stop drawing takes of a panel once one has every character at or "
        "above this identity score and none blended or missing (default: draw every take).",
    )

    loras: list[StyleLora] = Field(
        default_factory=list, max_length=8,
        description="Style LoRAs for the model's base (SD 1.5, SDXL, ...), each {path, scale}; applied "
        "to every panel, not to the character sheets.",
    )

    @field_validator("guidance_interval")
    @classmethod
    def _interval_inside_schedule(cls, value: list[float]) -> list[float]:
        if not inside_schedule(*value):
            raise PydanticCustomError(
                "interval_range", "guidance_interval must satisfy 0 <= low < high <= 1, got {interval}",
                {"interval": value},
            )
        return value


class PageSettings(_Strict):
    """Page geometry and lettering. Lengths are in millimetres, converted with `dpi`."""

    size: PageSize = "A4"
    orientation: Literal["portrait", "landscape"] = Field(
        "portrait", description="For named sizes; a size in px is used as given."
    )
    dpi: int = Field(150, ge=36, le=1200)
    layout: Layout = Field("auto", description="auto, a template name, or panels per row.")
    reading_order: Literal["ltr", "rtl"] = Field("ltr", description="rtl for manga.")
    margin: float = Field(10.0, ge=0.0, le=200.0, description="Page margin in mm.")
    gutter: float = Field(4.0, ge=0.0, le=100.0, description="Space between panels in mm.")
    border: float = Field(0.8, ge=0.0, le=20.0, description="Panel border width in mm.")
    font: Union[NonBlank, Annotated[list[NonBlank], Field(min_length=1, max_length=16)], None] = \
        Field(None, description="The lettering font: a .ttf/.otf/.ttc file (relative to the story), the "
        "family name of an installed font, or a list of these tried in order for each character "
        "(default: Luckiest Guy). Installed fallback fonts follow, so text in any script is drawn "
        "where a font for it is installed.")

    @field_validator("font")
    @classmethod
    def _resolve_font(cls, value: str | list[str] | None,
                      info: ValidationInfo) -> str | list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return _resolve_font_entry(value, info)
        return [_resolve_font_entry(entry, info) for entry in value]

    @model_validator(mode="after")
    def _room_for_panels(self) -> PageSettings:
        width, height = self.size_px()
        if max(width, height) > MAX_PAGE_SIDE_PX:
            raise PydanticCustomError(
                "page_too_big", "page is {w}x{h} px; at most {m} px a side (lower dpi)",
                {"w": width, "h": height, "m": MAX_PAGE_SIDE_PX},
            )
        margin = mm_to_px(self.margin, self.dpi)
        if min(width, height) - 2 * margin < MIN_CONTENT_PX:
            raise PydanticCustomError(
                "margin_too_big",
                "margins of {margin} mm leave no room for panels on a {w}x{h} px page",
                {"margin": self.margin, "w": width, "h": height},
            )
        return self

    def size_px(self) -> tuple[int, int]:
        """Page (width, height) in pixels; `orientation` applies to named sizes only."""
        if isinstance(self.size, PixelSize):
            return self.size.width, self.size.height
        return page_size_px(self.size, self.dpi, landscape=self.orientation == "landscape")


class Character(_Strict):
    """A recurring character: a reference image (mask optional), or a text description."""

    image: Path | None = Field(None, description="Reference image, relative to the story file.")
    mask: Path | None = Field(None, description="Mask of the character in `image` (white = it).")
    description: str | None = Field(None, max_length=1000)

    @field_validator("image", "mask")
    @classmethod
    def _resolve_paths(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _resolve(value, info)

    @model_validator(mode="after")
    def _image_or_description(self) -> Character:
        if self.image is None and not (self.description and self.description.strip()):
            raise PydanticCustomError(
                "character_source", "a character needs an image or a description"
            )
        if self.mask is not None and self.image is None:
            raise PydanticCustomError("mask_without_image", "a mask needs an image")
        return self


class CharacterRef(_Strict):
    """A character in a panel, optionally placed (left/right/center or a box)."""

    name: CharacterName
    at: Placement | None = Field(
        None, description="Where it stands: with several characters the panel has one column each and left, "
        "center or right pins this one to the first, middle or last; alone, the left, middle or right half; "
        "or a box in 0..1 of the panel.",
    )
    mirrored: bool = Field(
        False, description="Draw it mirrored (its reference image flipped left to right), e.g. so that two "
        "characters face each other.",
    )


def _name_to_ref(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, (Mapping, BaseModel)):
        return value
    raise PydanticCustomError("character_ref", "expected a character name or {name: ..., at: ...}")


CharacterRefIn = Annotated[
    CharacterRef, BeforeValidator(_name_to_ref, json_schema_input_type=Union[str, CharacterRef])
]


class DialogueLine(_Strict):
    who: CharacterName
    text: Annotated[NonBlank, Field(max_length=500)]


class Panel(_Strict):
    prompt: Annotated[NonBlank, Field(max_length=2000)]
    characters: list[CharacterRefIn] = Field(default_factory=list)
    caption: Annotated[NonBlank, Field(max_length=500)] | None = None
    dialogue: list[DialogueLine] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Default: story seed + index.")
    span: Literal["normal", "wide"] = Field("normal", description="wide: the panel fills a row.")
    page_break: bool = Field(False, description="Start a new page with this panel.")
    page_layout: Layout | None = Field(
        None, description="Start a new page with this panel, laid out like this."
    )


def _model_location(value: str, info: ValidationInfo) -> str:
    """A folder or file relative to the story, or a hub id ("org/name", "org/name/file") kept as it
    is when no such path exists."""
    from .hub import names_hub_part

    if names_hub_part(value, (info.context or {}).get("base_dir")):
        return value  # from the Hugging Face cache, downloaded once when online
    return str(_resolve(Path(value), info))


class FluxModel(_Strict):
    """The released AnyStory weights on FLUX.1 (docs/flux.md)."""

    base: Annotated[NonBlank, Field(description="FLUX.1-dev: a diffusers folder or a hub id "
                                    "(black-forest-labs/FLUX.1-dev).")]
    redux: Annotated[NonBlank, Field(description="FLUX.1-Redux-dev: a folder or a hub id "
                                     "(black-forest-labs/FLUX.1-Redux-dev).")]
    adapter: Annotated[NonBlank, Field(description="anystory_flux.bin: a file, or the hub file "
                                       "Junjie96/AnyStory/anystory_flux.bin.")]
    transformer: NonBlank | None = Field(None, description="A GGUF file of the FLUX.1 transformer (e.g. "
                                    "flux1-dev-Q4_K_S.gguf, or a hub file org/name/file.gguf) to draw with instead "
                                    "of base's transformer weights: they stay quantized and are dequantized layer by "
                                    "layer (needs the gguf package: pip install \"anystory-cli[quant]\").")
    memory: str | None = Field(None, description="Device memory to plan for: auto (the GPU's free memory), "
                               "a size such as 16GB, 12GiB, 24G (binary units), or a plan to follow whatever "
                               "the memory, e.g. int8; render --memory replaces it.")

    @field_validator("base", "redux", "adapter")
    @classmethod
    def _locate(cls, value: str, info: ValidationInfo) -> str:
        return _model_location(value, info)

    @field_validator("transformer")
    @classmethod
    def _locate_transformer(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _model_location(value, info)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_size(cls, value: Any) -> Any:
        from .errors import InputError
        from .flux.memory import PLAN_NAMES, named_plan, parse_memory

        if value is not None and named_plan(value) is None:
            try:
                parse_memory(value, "memory")
            except InputError:
                raise PydanticCustomError("memory_size", "expected a memory size such as 16GB, 12GiB or 24G, "
                                          "auto, or a plan ({plans})", {"plans": ", ".join(PLAN_NAMES)}) from None
        return value

    def __str__(self) -> str:
        gguf = f" + transformer {Path(self.transformer).name}" if self.transformer else ""
        return f"FLUX {self.base} + {Path(self.adapter).name}{gguf}"


# Built-in model names: the embedded model, and the published models made of hub parts.
BUILTIN_MODELS = ("default", *PUBLISHED_MODELS)
MAX_MODEL_FILE_BYTES = 64 * 1024


def _any_of(schema: dict[str, Any]) -> None:
    """A built-in name is a string too: the schema's alternatives may overlap (anyOf, not oneOf)."""
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


def _model_tag(value: Any) -> str:
    if isinstance(value, (Mapping, FluxModel)):
        return "@flux"
    return "@name" if value in BUILTIN_MODELS else "@folder"


def _resolve_model(value: str | FluxModel, info: ValidationInfo) -> str | FluxModel:
    """Built-in names and hub ids stay as they are; a path becomes absolute (relative to the
    story, or to where `--model` was given). A bare name that is neither built in nor a file or
    folder is an unknown model, said with the names there are."""
    if isinstance(value, FluxModel) or value in BUILTIN_MODELS:
        return value
    from .hub import is_hub_id

    base_dir = (info.context or {}).get("base_dir")
    if is_hub_id(value, base_dir):
        return value  # "org/name": from the Hugging Face cache (hub.hub_snapshot)
    path = _resolve(Path(value), info)
    model_file = Path(value).suffix.lower() in (".yaml", ".yml", ".json")  # loading says it is missing
    if "/" not in value and os.sep not in value and not model_file and not path_problem(value) \
            and not path.exists():
        raise PydanticCustomError(
            "unknown_model", "unknown model {name}: the built-in models are {names}; else give a model "
            "folder, a model file (.yaml, .json) or a hub id (org/name)",
            {"name": repr(value), "names": ", ".join(BUILTIN_MODELS)})
    return os.path.normpath(path)  # one spelling of a path ("a/../m" is "m"): it keys the panels


ModelValue = Annotated[
    Annotated[Literal[BUILTIN_MODELS], Tag("@name")]  # type: ignore[valid-type]
    | Annotated[NonBlank, Tag("@folder")] | Annotated[FluxModel, Tag("@flux")],
    Discriminator(_model_tag),
    AfterValidator(_resolve_model),
    Field(description="A built-in model (" + ", ".join(BUILTIN_MODELS) + ": `anystory models` lists them), a "
          "local model folder, a model file (.yaml or .json holding the mapping below), a Hugging Face hub id "
          "('org/name', from the hub cache, downloaded once when online), or {base, redux, adapter} for "
          "FLUX.1 with the released AnyStory weights.", json_schema_extra=_any_of),
]


class Story(_Strict):
    title: Annotated[NonBlank, Field(max_length=200)] = "Untitled"
    model: ModelValue = "default"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    style: Style = Field(default_factory=Style)
    page: PageSettings = Field(default_factory=PageSettings)
    characters: dict[CharacterName, Character] = Field(default_factory=dict)
    panels: list[Panel] = Field(min_length=1, max_length=1000)

    def with_model_defaults(self, defaults: Mapping[str, Any]) -> Story:
        """This story with the model's sampling defaults (`model_loading.model_defaults`, e.g.
        FLUX's guidance 3.5) in the style settings the story does not set itself."""
        style = {k: v for k, v in defaults.items() if k in Style.model_fields and k not in self.style.model_fields_set}
        return self.model_copy(update={"style": self.style.model_copy(update=style)}) if style else self


def model_value(value: Any, source: str, base_dir: str | os.PathLike[str]) -> str | FluxModel:
    """A model named outside a story (`--model`, a model file), checked as a story's `model:` is,
    paths relative to `base_dir`; the text of an inline mapping ("{base: ..., redux: ...,
    adapter: ...}") is read as YAML. One ModelError line, "<source>: <field>: <problem>", else."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = yaml.load(value, Loader=UniqueKeyLoader)
        except yaml.MarkedYAMLError as exc:
            raise ModelError(f"{source}: not a valid mapping ({_describe_yaml_error(exc)})") from None
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ModelError(f"{source}: not a valid mapping ({exc})") from None
    return _validated_model(value, source, base_dir)


def load_model_file(path: str | os.PathLike[str]) -> FluxModel:
    """A model file (.yaml, .yml or .json): the mapping a story's `model:` holds, its paths relative
    to the file. One ModelError line naming the file and the field otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()[: MAX_MODEL_FILE_BYTES + 1]
    except OSError as exc:
        raise ModelError(f"model file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_MODEL_FILE_BYTES:
        raise ModelError(f"model file {path}: over {MAX_MODEL_FILE_BYTES // 1024} KiB; expected a small mapping "
                         "{base, redux, adapter}")
    try:
        data = yaml.load(raw.decode("utf-8-sig"), Loader=UniqueKeyLoader)  # JSON is YAML too
    except UnicodeDecodeError as exc:
        raise ModelError(f"model file {path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        raise ModelError(f"model file {path}: {_describe_yaml_error(exc)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ModelError(f"model file {path}: not valid YAML or JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise ModelError(f"model file {path}: expected a mapping {{base, redux, adapter}}, got {_kind_of(data)}")
    model = _validated_model(data, f"model file {path}", path.resolve().parent)
    assert isinstance(model, FluxModel)
    return model


_MODEL_VALUE = TypeAdapter(ModelValue)


def _validated_model(value: Any, source: str, base_dir: str | os.PathLike[str]) -> str | FluxModel:
    # Text no file can be named by (a control character, too long) is said as such, not as the
    # file system's error.
    texts = [("", value)] if isinstance(value, str) else list(value.items()) if isinstance(value, Mapping) else []
    for field, text in texts:
        problem = (text_problem(text) or path_problem(text)) if isinstance(text, str) else None
        if problem:
            raise ModelError(f"{source}: {field}: {problem}" if field else f"{source}: {problem}")
    try:
        return _MODEL_VALUE.validate_python(value, context={"base_dir": Path(base_dir).resolve()})
    except ValidationError as exc:
        # One line: an unknown key first, as a misspelt key also leaves a required one missing.
        error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc, message = _describe_pydantic_error(error)
        if error["type"] == "extra_forbidden":
            key, fields = str(error["loc"][-1]), list(FluxModel.model_fields)
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            message = f"unknown key {key!r} " + (f"(did you mean {close[0]!r}?)" if close else
                                                  f"(expected {', '.join(fields)})")
            loc = ()
        where = format_loc(loc)
        raise ModelError(f"{source}: {where}: {message}" if where else f"{source}: {message}") from None


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the story file (passed as context 'base_dir')."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def _resolve_font_entry(entry: str, info: ValidationInfo) -> str:
    """A font file relative to the story becomes a full path; a family name stays as it is."""
    entry = entry.strip()
    return str(_resolve(Path(entry), info)) if is_font_file_entry(entry) else entry


def story_json_schema() -> dict[str, Any]:
    """JSON Schema of the story format, for editors (`anystory schema`)."""
    schema = Story.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "AnyStory story"
    return schema


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document over one of the limits above; `node`, when known, locates it."""

    def __init__(self, problem: str, mark: yaml.Mark | None, node: yaml.Node | None = None):
        super().__init__(problem=problem, problem_mark=mark)
        self.node = node


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one silently,
    so a second `mira:` would replace the first character without a word), and documents over
    MAX_NESTING_DEPTH, MAX_EXPANDED_NODES (counted while parsing) or MAX_NUMBER_CHARS, with a
    YAMLLimitError as soon as the limit is passed.

    With `duplicates` set to a list, it records `(mapping_node, key_node, first_key_node)` and
    keeps the first definition instead of raising, so a caller can report every duplicate.
    """

    duplicates: list[tuple[yaml.Node, yaml.Node, yaml.Node]] | None = None

    def __init__(self, stream: Any):
        self._depth = 0
        self._nodes = 0
        super().__init__(stream)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_NESTING_DEPTH:
                raise YAMLLimitError(
                    f"the document is nested more than {MAX_NESTING_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            if self._nodes > MAX_EXPANDED_NODES:
                raise YAMLLimitError(f"the document has over {MAX_EXPANDED_NODES} nodes",
                                     self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's own constructors fail with bare Python errors on some values, most with an
        # explicit tag: `!!timestamp x` (AttributeError), `!!bool x` (KeyError), `!!int x`,
        # `2024-13-45` (ValueError). Say which value, where.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, KeyError, AttributeError, TypeError, IndexError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            shown = repr(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            readable = isinstance(exc, (ValueError, OverflowError)) and str(exc).strip()
            detail = f" ({str(exc).strip().splitlines()[0][:80]})" if readable else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as {kind}{detail}; quote it if it is meant as "
                "text", node.start_mark,
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        self._check_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        self._check_number(node)
        return super().construct_yaml_float(node)

    def _check_number(self, node: yaml.ScalarNode) -> None:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise YAMLLimitError(
                f"a number of {len(node.value)} characters; at most {MAX_NUMBER_CHARS} "
                "(quote it if it is meant as text)", node.start_mark, node,
            )

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self._drop_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _drop_duplicate_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, yaml.Node] = {}
        kept = []
        for key_node, value_node in node.value:
            # Merge keys (<<) are expanded by flatten_mapping; explicit keys may override them.
            if key_node.tag == "tag:yaml.org,2002:merge":
                kept.append((key_node, value_node))
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                if self.duplicates is None:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first on line "
                        f"{seen[key].start_mark.line + 1})", key_node.start_mark,
                    )
                self.duplicates.append((node, key_node, seen[key]))
                continue
            if isinstance(key, Hashable):
                seen[key] = key_node
            kept.append((key_node, value_node))
        node.value = kept


# SafeLoader's table maps these tags to its own functions; point this loader's copy at ours.
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", UniqueKeyLoader.construct_yaml_float)


def _node_paths(root: yaml.Node) -> dict[int, tuple]:
    """Location (as a pydantic-style loc tuple) of every node, by id; first path wins."""
    paths: dict[int, tuple] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = loc
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((value_node, (*loc, key)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                stack.append((item, (*loc, index)))
    return paths


def _expanded_size(root: yaml.Node) -> int | None:
    """Nodes after expanding aliases; None when an alias refers to its own ancestor."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order walk: deep documents must not hit Python's recursion limit.
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_EXPANDED_NODES:
                return sizes[id(node)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            return None
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return None
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _line_of(root: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the node at `loc`, walking down as far as the document goes."""
    node = root
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    child = value_node
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


class _Problems:
    """Collects `<file>: <path>: <message> (line N)` lines, once each; reported top to bottom."""

    def __init__(self, source: str, root: yaml.Node | None = None):
        self.source = source
        self.root = root
        self.found: list[tuple[int, str]] = []

    def add(
        self, loc: tuple, message: str, line: int | None = None, line_loc: tuple | None = None
    ) -> None:
        """`line_loc` (default `loc`) is where in the document the line number is looked up."""
        line_loc = loc if line_loc is None else line_loc
        if line is None and self.root is not None and line_loc:
            line = _line_of(self.root, line_loc)
        where = format_loc(loc)
        text = f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}"
        if line is not None:
            text += f" (line {line})"
        if all(text != seen for _, seen in self.found):
            self.found.append((line or 0, text))

    def raise_if_any(self) -> None:
        if self.found:
            # sorted() is stable: problems on one line keep the order they were found in.
            raise story_error([text for _, text in sorted(self.found, key=lambda f: f[0])])


def story_error(problems: list[str]) -> StoryError:
    """A StoryError whose message is the first problem plus a count; `.problems` has them all."""
    extra = len(problems) - 1
    message = problems[0]
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    error = StoryError(message)
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


def format_loc(loc: tuple) -> str:
    """('panels', 3, 'characters', 0) -> 'panels[3].characters[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):  # else quoted: 'a\n' shows
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def load_story(
    path: str | os.PathLike[str],
    *,
    max_characters: int = DEFAULT_MAX_CHARACTERS,
    check_images: bool = True,
) -> Story:
    """Read, parse and validate a story file; raise StoryError listing every problem."""
    source = str(path)
    text = _read_text(Path(path), source)
    problems = _Problems(source)
    loader = None
    paths: dict[int, tuple] = {}
    try:
        # The reader checks the characters as soon as the loader is built: keep it in the try.
        loader = UniqueKeyLoader(text)
        loader.duplicates = []
        root = loader.get_single_node()
        if root is None:
            problems.add((), "the story is empty; expected title, characters and panels")
            problems.raise_if_any()
        problems.root = root
        size = _expanded_size(root)
        if size is None:
            problems.add((), "an alias refers to a node that contains it (recursive document)")
        elif size > MAX_EXPANDED_NODES:
            problems.add((), f"the document expands to over {MAX_EXPANDED_NODES} nodes through "
                             "aliases (*name)")
        problems.raise_if_any()
        paths = _node_paths(root)
        data = loader.construct_document(root)
    except YAMLLimitError as exc:
        loc = paths.get(id(exc.node), ()) if exc.node is not None else ()
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        problems.add(loc, str(exc.problem), line=line)
        problems.raise_if_any()
        raise
    except yaml.reader.ReaderError as exc:
        problems.add((), _describe_reader_error(exc, text))
        problems.raise_if_any()
        raise
    except yaml.MarkedYAMLError as exc:
        problems.add((), _describe_yaml_error(exc))
        problems.raise_if_any()
        raise  # unreachable; keeps type checkers calm
    except yaml.YAMLError as exc:
        problems.add((), f"not valid YAML: {exc}")
        problems.raise_if_any()
        raise
    except (ValueError, OverflowError) as exc:
        # SafeLoader raises plain ValueError for impossible timestamps such as 2024-13-45.
        problems.add((), f"not valid YAML: {exc} (quote a value that is meant as text)")
        problems.raise_if_any()
        raise
    except RecursionError:
        problems.add((), "the document is nested too deeply")
        problems.raise_if_any()
        raise
    finally:
        if loader is not None:
            loader.dispose()

    for mapping_node, key_node, first in loader.duplicates:
        loc = paths.get(id(mapping_node), ())
        what = "character name" if loc == ("characters",) else "key"
        first_line = first.start_mark.line + 1
        problems.add(
            loc,
            f"duplicate {what} {key_node.value!r} (first defined on line {first_line})",
            line=key_node.start_mark.line + 1,
        )
    return _validate(data, problems, Path(path).resolve().parent, max_characters, check_images)


def validate_story(
    data: Any,
    *,
    source: str = "<story>",
    base_dir: str | os.PathLike[str] = ".",
    max_characters: int = DEFAULT_MAX_CHARACTERS,
    check_images: bool = True,
) -> Story:
    """Validate an already-parsed story (a dict); the same checks as `load_story`."""
    problems = _Problems(source)
    return _validate(data, problems, Path(base_dir).resolve(), max_characters, check_images)


def _read_text(path: Path, source: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_STORY_BYTES:
            raise story_error(
                [f"{source}: the file is {size / 1024 / 1024:.1f} MiB; a story must be at most "
                 f"{MAX_STORY_BYTES // (1024 * 1024)} MiB"]
            )
        with path.open("rb") as handle:
            raw = handle.read(MAX_STORY_BYTES + 1)
    except FileNotFoundError:
        raise story_error([f"{source}: no such file"]) from None
    except IsADirectoryError:
        raise story_error([f"{source}: is a directory, expected a YAML file"]) from None
    except OSError as exc:
        raise story_error([f"{source}: cannot read the file ({exc.strerror or exc})"]) from None
    if len(raw) > MAX_STORY_BYTES:  # the file grew between stat and read
        raise story_error([f"{source}: a story must be at most 1 MiB"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise story_error(
            [f"{source}: not UTF-8 text (byte {exc.start}); save the story as UTF-8"]
        ) from None


def _describe_reader_error(exc: yaml.reader.ReaderError, text: str) -> str:
    """PyYAML says 'in "<unicode string>", position 8'; say line and column instead."""
    position = max(0, min(exc.position, len(text)))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    character = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
    return (f"not valid YAML: line {line}, column {column}: unacceptable character {character} "
            f"({exc.reason}; remove it or write it as an escape in a quoted string)")


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    what = " ".join(str(p) for p in (exc.context, exc.problem) if p) or "invalid YAML"
    if mark is None:
        return f"not valid YAML: {what}"
    return f"not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {what}"


def _validate(
    data: Any, problems: _Problems, base_dir: Path, max_characters: int, check_images: bool
) -> Story:
    if not isinstance(data, dict):
        problems.add(
            (), f"expected a mapping (title, characters, panels) at the top, got {_kind_of(data)}"
        )
        problems.raise_if_any()
    # A string with a forbidden character, or a path too long for any file, gets that one line;
    # what else would be said about it (a bad name, an unknown character, a path not found, or
    # the file system's own error) is left out.
    refused = _text_problems(data) + _path_problems(data)
    for loc, message in refused:
        problems.add(loc, message)

    def add(loc: tuple, message: str, line_loc: tuple | None = None) -> None:
        if not any((line_loc or loc)[:len(bad)] == bad for bad, _ in refused):
            problems.add(loc, message, line_loc=line_loc)

    story = None
    try:
        story = Story.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        for error in exc.errors():
            loc, message = _describe_pydantic_error(error)
            add(loc, message, line_loc=_clean_loc(error["loc"]))
    except RecursionError:
        problems.add((), "the document is nested too deeply")
    # Cross-references are checked on the raw data so that they are reported even when some
    # other part of the story is malformed: the user sees every problem in one run.
    for loc, message in _cross_reference_problems(data, max_characters):
        add(loc, message)
    if check_images:
        for loc, message in _file_problems(data, base_dir):
            add(loc, message)
    problems.raise_if_any()
    assert story is not None
    return story


def _clean_loc(loc: tuple) -> tuple:
    """Drop the union tags and '[key]' markers pydantic puts in locations."""
    return tuple(p for p in loc if p not in _UNION_TAGS and p != "[key]")


def _describe_pydantic_error(error: Mapping[str, Any]) -> tuple[tuple, str]:
    loc = _clean_loc(error["loc"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return loc[:-1], _unknown_key_message(loc)
    if kind == "missing":
        return loc, "required but missing"
    if kind in {"model_type", "dict_type"}:
        return loc, f"expected a mapping, got {_kind_of(value)}"
    if kind == "list_type":
        return loc, f"expected a list, got {_kind_of(value)}"
    message = error["msg"]
    message = message[0].lower() + message[1:] if message[:1].isupper() else message
    if isinstance(value, (str, int, float, bool)) and kind not in {"character_name", "box_range", "unknown_model"}:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        message += f", got {shown}"
    return loc, message


def _kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (str, int, float, bool)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"{type(value).__name__} {shown}"
    return type(value).__name__


def _unknown_key_message(loc: tuple) -> str:
    key = str(loc[-1])
    allowed = _allowed_keys(loc[:-1])
    message = f"unknown key {key!r}"
    if allowed:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            return message + f" (did you mean {close[0]!r}?)"
        return message + f" (expected one of: {', '.join(allowed)})"
    return message


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model found at `loc` in a Story, for 'did you mean' hints."""
    model: Any = Story
    in_characters = False
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the item model was already chosen from the field
        if in_characters:  # `part` is a character name
            model, in_characters = Character, False
            continue
        if model is Story and part == "characters":
            in_characters = True
            continue
        model = _MODEL_OF_FIELD.get((model, part))
        if model is None:
            return []
    return [] if in_characters else list(model.model_fields)


_MODEL_OF_FIELD: dict[tuple[Any, str], Any] = {
    (Story, "style"): Style,
    (Story, "page"): PageSettings,
    (Story, "panels"): Panel,
    (Panel, "characters"): CharacterRef,
    (Panel, "dialogue"): DialogueLine,
    (CharacterRef, "at"): Box,
    (PageSettings, "size"): PixelSize,
}


def _cross_reference_problems(data: Any, max_characters: int) -> Iterator[tuple[tuple, str]]:
    if not isinstance(data, dict):
        return
    raw_characters = data.get("characters", {})
    known = (
        sorted(k for k in raw_characters if isinstance(k, str))
        if isinstance(raw_characters, dict)
        else None  # malformed: reported by pydantic; no basis for name checks
    )
    # Names become file names (out/characters/<name>.png); on macOS and Windows 'Mira' and
    # 'mira' are the same file, and one character's sheet would overwrite the other's.
    by_folded: dict[str, str] = {}
    in_file_order = raw_characters if known is not None else {}
    for name in (k for k in in_file_order if isinstance(k, str)):
        first = by_folded.setdefault(name.casefold(), name)
        if first != name:
            yield (("characters", name),
                   f"character name {name!r} differs from {first!r} only in case; names must "
                   "differ in more than case (they name files)")
    panels = data.get("panels")
    if not isinstance(panels, list):
        return
    for index, panel in enumerate(panels):
        if isinstance(panel, dict):
            yield from _panel_problems(index, panel, known, max_characters)


def _panel_problems(
    index: int, panel: dict, known: list[str] | None, max_characters: int
) -> Iterator[tuple[tuple, str]]:
    refs = panel.get("characters", [])
    in_panel: list[str] = []
    if isinstance(refs, list):
        if len(refs) > max_characters:
            yield (("panels", index, "characters"),
                   f"{len(refs)} characters, but the model supports at most {max_characters} "
                   "per panel")
        for slot, ref in enumerate(refs):
            name = ref.get("name") if isinstance(ref, dict) else ref
            if not isinstance(name, str):
                continue
            loc = ("panels", index, "characters", slot)
            if name in in_panel:
                yield loc, f"character {name!r} is listed twice in this panel"
            in_panel.append(name)
            if known is not None and name not in known:
                yield loc, _unknown_character(name, known)
    lines = panel.get("dialogue", [])
    if not isinstance(lines, list):
        return
    for number, line in enumerate(lines):
        who = line.get("who") if isinstance(line, dict) else None
        if not isinstance(who, str):
            continue
        loc = ("panels", index, "dialogue", number, "who")
        if known is not None and who not in known:
            yield loc, _unknown_character(who, known, role="speaker")
        elif isinstance(refs, list) and who not in in_panel:
            shown = ", ".join(in_panel) if in_panel else "none"
            yield loc, f"speaker {who!r} is not in this panel (its characters: {shown})"


def _unknown_character(name: str, known: list[str], role: str = "character") -> str:
    message = f"unknown {role} {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return message + f" (did you mean {close[0]!r}?)"
    if known:
        return message + f" (characters: {', '.join(known)})"
    return message + " (the story defines no characters)"


def _file_problems(data: Any, base_dir: Path) -> Iterator[tuple[tuple, str]]:
    if not isinstance(data, dict):
        return
    characters = data.get("characters")
    if isinstance(characters, dict):
        for name, character in characters.items():
            if not isinstance(character, dict):
                continue
            for field in ("image", "mask"):
                value = character.get(field)
                if isinstance(value, str) and value.strip():
                    problem = image_problem(_resolve_raw(value, base_dir))
                    if problem:
                        yield ("characters", name, field), problem
    page = data.get("page")
    fonts = page.get("font") if isinstance(page, dict) else None
    entries = [(("page", "font"), fonts)] if isinstance(fonts, str) else (
        [(("page", "font", n), f) for n, f in enumerate(fonts)] if isinstance(fonts, list) else [])
    for loc, entry in entries:
        if isinstance(entry, str) and entry.strip() and is_font_file_entry(entry.strip()):
            font = _resolve_raw(entry.strip(), base_dir)
            if not _os_says(font.is_file):
                yield loc, f"font file not found: {font}"
    style = data.get("style")
    loras = style.get("loras") if isinstance(style, dict) else None
    for index, lora in enumerate(loras if isinstance(loras, list) else []):
        value = lora.get("path") if isinstance(lora, dict) else None
        if isinstance(value, str) and value.strip():
            path = _resolve_raw(value, base_dir)
            if not _os_says(path.exists) and not looks_like_hub_id(value):
                yield ("style", "loras", index, "path"), f"LoRA file or folder not found: {path}"


def _os_says(question) -> bool:
    """`question()` (Path.exists, Path.is_file), False where the path cannot even be asked about
    (too long, a NUL: reported as such by `_validate`)."""
    try:
        return question()
    except (OSError, ValueError):
        return False


def _resolve_raw(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def image_problem(path: Path) -> str | None:
    """Why `path` is not a usable reference image, or None. Decodes it fully, exactly as the
    render will (`masks.load_image`), so a truncated, animated or oversized file is caught here
    rather than in the middle of a render."""
    try:
        if not path.exists():
            return f"file not found: {path}"
    except (OSError, ValueError):  # e.g. a NUL byte or an over-long name
        return f"not a valid path: {str(path)!r}"
    if not path.is_file():
        return f"not a file: {path}"
    try:
        load_image(path, max_pixels=MAX_REFERENCE_PIXELS)
    except ImageFileError as exc:
        return f"{exc.reason}: {path}"
    return None
