"""The story format: loading, every bad-input case, one message per problem with its location."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anystory_cli.errors import InputError, StoryError
from anystory_cli.story import (
    Character,
    Story,
    UniqueKeyLoader,
    load_story,
    story_json_schema,
    validate_story,
)

STORIES = Path(__file__).resolve().parent.parent / "stories"

GOOD = """\
title: The Lost Kite
characters:
  mira: {image: mira.png}
  bolt: {description: "a small round robot"}
panels:
  - prompt: "mira and bolt on a hill"
    characters: [mira, {name: bolt, at: right}]
    dialogue: [{who: mira, text: "Look, a kite!"}]
"""


def write_png(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, (200, 40, 40, 255)).save(path)
    return path


@pytest.fixture
def story_dir(tmp_path, monkeypatch):
    """A folder holding mira.png; the test's cwd, so messages start with 'story.yaml: '."""
    write_png(tmp_path / "mira.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(text: str, name: str = "story.yaml", **kwargs) -> list[str]:
    Path(name).write_text(text, encoding="utf-8")
    with pytest.raises(StoryError) as caught:
        load_story(name, **kwargs)
    error = caught.value
    assert isinstance(error, InputError)
    assert str(error).startswith(error.problems[0])
    return error.problems


# --------------------------------------------------------------------------------------------
# Good stories
# --------------------------------------------------------------------------------------------


def test_good_story_loads_with_paths_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "book"
    write_png(folder / "mira.png")
    (folder / "story.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)  # paths must resolve against the file, not the cwd
    story = load_story("book/story.yaml")
    assert isinstance(story, Story)
    assert story.characters["mira"].image == (folder / "mira.png").resolve()
    assert story.characters["bolt"].image is None
    ref = story.panels[0].characters[1]
    assert (ref.name, ref.at) == ("bolt", "right")
    assert story.panels[0].characters[0].name == "mira"
    assert story.page.layout == "auto" and story.page.reading_order == "ltr"


def test_demo_story_is_valid_once_its_reference_images_exist(tmp_path):
    shutil.copy(STORIES / "demo.yaml", tmp_path / "demo.yaml")
    for name in ("mira", "bolt", "pip"):
        write_png(tmp_path / "characters" / f"{name}.png")
    story = load_story(tmp_path / "demo.yaml")
    assert set(story.characters) == {"mira", "bolt", "pip"}
    counts = {len(panel.characters) for panel in story.panels}
    assert {1, 2, 3} <= counts
    assert any(p.caption for p in story.panels) and any(p.dialogue for p in story.panels)
    assert any(p.page_break for p in story.panels)


def test_demo_story_reports_missing_reference_images(tmp_path):
    shutil.copy(STORIES / "demo.yaml", tmp_path / "demo.yaml")
    with pytest.raises(StoryError) as caught:
        load_story(tmp_path / "demo.yaml")
    assert len(caught.value.problems) == 3
    assert "characters.mira.image: file not found" in caught.value.problems[0]


def test_text_only_story_has_a_character_without_image():
    story = load_story(STORIES / "text_only.yaml")
    assert all(c.image is None and c.description for c in story.characters.values())


def test_validate_story_accepts_a_dict(tmp_path):
    write_png(tmp_path / "mira.png")
    story = validate_story(yaml.safe_load(GOOD), base_dir=tmp_path)
    assert story.title == "The Lost Kite"


def test_json_schema_describes_the_format():
    schema = story_json_schema()
    json.dumps(schema)  # serialisable
    assert schema["additionalProperties"] is False
    assert {"title", "characters", "panels", "page", "style", "seed", "model"} <= set(
        schema["properties"]
    )
    panel = schema["$defs"]["Panel"]
    assert panel["additionalProperties"] is False
    assert {"prompt", "caption", "dialogue", "span", "page_break"} <= set(panel["properties"])
    # A panel's characters may be written as a bare name.
    item_types = json.dumps(panel["properties"]["characters"]["items"])
    assert '"string"' in item_types and "CharacterRef" in item_types


def test_story_modules_do_not_import_torch():
    code = (
        "import sys; import anystory_cli.story, anystory_cli.plan, anystory_cli.layout, "
        "anystory_cli.export; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Bad stories: each gives a StoryError naming the file and the field
# --------------------------------------------------------------------------------------------

PANEL = "  - prompt: sky\n"

BAD_CASES = {
    "malformed yaml": (
        "title: [unclosed\npanels: []\n",
        "story.yaml: not valid YAML: line 2, column",
    ),
    "not a mapping": ("- a\n- b\n", "story.yaml: expected a mapping"),
    "empty file": ("", "story.yaml: the story is empty"),
    "unknown top-level key": (
        "titel: x\npanels:\n" + PANEL,
        "story.yaml: unknown key 'titel' (did you mean 'title'?)",
    ),
    "unknown panel key": (
        "panels:\n  - prompt: sky\n    captoin: hi\n",
        "story.yaml: panels[0]: unknown key 'captoin' (did you mean 'caption'?)",
    ),
    "unknown character": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n  - prompt: hill\n"
        "    characters: [mria]\n",
        "story.yaml: panels[1].characters[0]: unknown character 'mria' (did you mean 'mira'?)",
    ),
    "unknown character in a mapping ref": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [{name: zed, at: left}]\n",
        "story.yaml: panels[0].characters[0]: unknown character 'zed'",
    ),
    "unknown dialogue speaker": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [mira]\n    dialogue: [{who: mirra, text: hi}]\n",
        "story.yaml: panels[0].dialogue[0].who: unknown speaker 'mirra' (did you mean 'mira'?)",
    ),
    "speaker not in the panel": (
        "characters: {mira: {image: mira.png}, bolt: {description: robot}}\npanels:\n"
        "  - prompt: sky\n    characters: [bolt]\n    dialogue: [{who: mira, text: hi}]\n",
        "story.yaml: panels[0].dialogue[0].who: speaker 'mira' is not in this panel",
    ),
    "duplicate character names": (
        "characters:\n  mira: {image: mira.png}\n  mira: {description: again}\npanels:\n" + PANEL,
        "story.yaml: characters: duplicate character name 'mira' (first defined on line 2)",
    ),
    "duplicate panel keys": (
        "panels:\n  - prompt: sky\n    prompt: hill\n",
        "story.yaml: panels[0]: duplicate key 'prompt'",
    ),
    "empty prompt": ("panels:\n  - prompt: '  '\n", "story.yaml: panels[0].prompt: must not be empty"),
    "missing prompt": ("panels:\n  - caption: hi\n", "story.yaml: panels[0].prompt: required"),
    "no panels": ("title: x\npanels: []\n", "story.yaml: panels: list should have at least 1 item"),
    "missing image file": (
        "characters: {pip: {image: pics/pip.png}}\npanels:\n" + PANEL,
        "story.yaml: characters.pip.image: file not found:",
    ),
    "missing mask file": (
        "characters: {mira: {image: mira.png, mask: nomask.png}}\npanels:\n" + PANEL,
        "story.yaml: characters.mira.mask: file not found:",
    ),
    "character without image or description": (
        "characters: {mira: {}}\npanels:\n" + PANEL,
        "story.yaml: characters.mira: a character needs an image or a description",
    ),
    "mask without image": (
        "characters: {mira: {mask: mira.png, description: x}}\npanels:\n" + PANEL,
        "story.yaml: characters.mira: a mask needs an image",
    ),
    "bad character name": (
        "characters: {'my mira': {description: x}}\npanels:\n" + PANEL,
        "story.yaml: characters['my mira']: character name 'my mira' must start with a letter",
    ),
    "too many characters in a panel": (
        "characters: {a: {description: x}, b: {description: x}, c: {description: x}}\npanels:\n"
        "  - prompt: sky\n    characters: [a, b, c]\n",
        "story.yaml: panels[0].characters: 3 characters, but the model supports at most 2",
    ),
    "character twice in a panel": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [mira, mira]\n",
        "story.yaml: panels[0].characters[1]: character 'mira' is listed twice",
    ),
    "bad placement word": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [{name: mira, at: top}]\n",
        "story.yaml: panels[0].characters[0].at: input should be 'left', 'right' or 'center'",
    ),
    "bad placement box": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [{name: mira, at: {box: [0.5, 0, 0.2, 1]}}]\n",
        "story.yaml: panels[0].characters[0].at.box: box must satisfy 0 <= x0 < x1 <= 1",
    ),
    "placement of the wrong type": (
        "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n"
        "    characters: [{name: mira, at: 3}]\n",
        "story.yaml: panels[0].characters[0].at: expected left, right, center or {box:",
    ),
    "unknown layout template": (
        "page: {layout: grid-7}\npanels:\n" + PANEL,
        "story.yaml: page.layout: input should be 'auto', 'splash'",
    ),
    "unknown page size": (
        "page: {size: A3}\npanels:\n" + PANEL,
        "story.yaml: page.size: input should be 'A4', 'A5', 'Letter', 'B5' or 'square', got 'A3'",
    ),
    "margins fill the page": (
        "page: {size: {width: 300, height: 300}, margin: 60}\npanels:\n" + PANEL,
        "story.yaml: page: margins of 60.0 mm leave no room",
    ),
    "negative seed": (
        "panels:\n  - prompt: sky\n    seed: -1\n",
        "story.yaml: panels[0].seed: input should be greater than or equal to 0, got -1",
    ),
    "not-a-number guidance": (
        "style: {guidance: .nan}\npanels:\n" + PANEL,
        "story.yaml: style.guidance: input should be a finite number",
    ),
    "guidance interval upside down": (
        "style: {guidance_interval: [0.8, 0.2]}\npanels:\n" + PANEL,
        "story.yaml: style.guidance_interval: guidance_interval must satisfy 0 <= low < high <= 1, got [0.8, 0.2]",
    ),
    "paste above pure noise": (
        "style: {paste_references_at: 1.5}\npanels:\n" + PANEL,
        "story.yaml: style.paste_references_at: input should be less than or equal to 1",
    ),
    "guidance interval of one number": (
        "style: {guidance_interval: [0.5]}\npanels:\n" + PANEL,
        "story.yaml: style.guidance_interval:",
    ),
    "python object tag": (
        "title: !!python/object/apply:os.system ['echo hi']\npanels:\n" + PANEL,
        "story.yaml: not valid YAML: line 1",
    ),
    "impossible date": ("title: 2024-13-45\npanels:\n" + PANEL, "story.yaml: not valid YAML"),
    "panel is not a mapping": ("panels:\n  - 5\n", "story.yaml: panels[0]: expected a mapping, got int 5"),
    "dialogue is not a list": (
        "panels:\n  - prompt: sky\n    dialogue: hello\n",
        "story.yaml: panels[0].dialogue: expected a list, got str 'hello'",
    ),
}


@pytest.mark.parametrize("text, expected", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_story_gives_one_clear_line_per_problem(story_dir, text, expected):
    problems = problems_of(text, max_characters=2)
    assert any(p.startswith(expected) for p in problems), problems
    assert all(p.startswith("story.yaml: ") for p in problems)
    assert all("\n" not in p for p in problems)


def test_problems_carry_their_line_number(story_dir):
    text = "characters: {mira: {image: mira.png}}\npanels:\n  - prompt: sky\n  - prompt: hill\n    characters: [mria]\n"
    (problem,) = problems_of(text)
    assert problem.endswith("(line 5)")


def test_every_problem_is_reported_at_once(story_dir):
    text = textwrap.dedent(
        """\
        titel: x
        characters:
          mira: {image: mira.png}
          pip: {image: nothing.png}
        panels:
          - prompt: ""
            characters: [mria]
          - prompt: hill
            dialogue: [{who: bob, text: hi}]
        """
    )
    Path("story.yaml").write_text(text)
    with pytest.raises(StoryError) as caught:
        load_story("story.yaml")
    problems = caught.value.problems
    expected = [
        "story.yaml: unknown key 'titel'",
        "story.yaml: characters.pip.image: file not found",
        "story.yaml: panels[0].prompt: must not be empty",
        "story.yaml: panels[0].characters[0]: unknown character 'mria'",
        "story.yaml: panels[1].dialogue[0].who: unknown speaker 'bob'",
    ]
    assert len(problems) == len(expected)
    for prefix, problem in zip(expected, problems):  # top to bottom, as in the file
        assert problem.startswith(prefix), problems
    assert str(caught.value) == f"{problems[0]} (and 4 more problems)"


def test_max_characters_is_a_parameter(story_dir):
    text = "characters: {a: {description: x}, b: {description: y}}\npanels:\n  - prompt: sky\n    characters: [a, b]\n"
    Path("story.yaml").write_text(text)
    assert len(load_story("story.yaml").panels[0].characters) == 2
    with pytest.raises(StoryError, match="at most 1 per panel"):
        load_story("story.yaml", max_characters=1)


# --------------------------------------------------------------------------------------------
# Files and images
# --------------------------------------------------------------------------------------------


def test_missing_story_file(story_dir):
    with pytest.raises(StoryError, match=r"^nope\.yaml: no such file$"):
        load_story("nope.yaml")


def test_story_file_over_the_size_limit(story_dir):
    Path("story.yaml").write_text("title: x\n" + "# padding\n" * 110_000)
    with pytest.raises(StoryError, match=r"^story\.yaml: the file is 1\.0 MiB; a story must be at most 1 MiB"):
        load_story("story.yaml")


def test_story_that_is_not_utf8(story_dir):
    Path("story.yaml").write_bytes(b"title: caf\xe9\npanels: [{prompt: sky}]\n")
    with pytest.raises(StoryError, match=r"^story\.yaml: not UTF-8"):
        load_story("story.yaml")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height (its pixel data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    )


def _truncated_png(path: Path) -> None:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_text("not an image"), "not an image"),
        (lambda p: p.write_bytes(b""), "not an image"),
        (_truncated_png, "corrupt or truncated image"),
        (lambda p: _png_header_only(p, 5000, 5000), "image is too large (5000x5000)"),
        (lambda p: _png_header_only(p, 30000, 30000), "image is too large"),
        (lambda p: p.mkdir(), "not a file"),
    ],
    ids=["text file", "empty file", "truncated png", "large", "decompression bomb", "folder"],
)
def test_bad_reference_image(story_dir, make, expected):
    make(story_dir / "ref.png")
    problems = problems_of("characters: {mira: {image: ref.png}}\npanels:\n" + PANEL)
    assert problems[0].startswith(f"story.yaml: characters.mira.image: {expected}"), problems


def test_image_checks_can_be_skipped(story_dir):
    Path("story.yaml").write_text("characters: {mira: {image: later.png}}\npanels:\n" + PANEL)
    story = load_story("story.yaml", check_images=False)
    assert story.characters["mira"].image == story_dir.resolve() / "later.png"


# --------------------------------------------------------------------------------------------
# YAML safety
# --------------------------------------------------------------------------------------------


def test_unique_key_loader_refuses_duplicate_keys():
    with pytest.raises(yaml.YAMLError, match="found duplicate key 'a'"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=UniqueKeyLoader)
    # Overriding a merged key is not a duplicate.
    merged = yaml.load("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 5\n", Loader=UniqueKeyLoader)
    assert merged["d"] == {"x": 5, "y": 2}


def test_alias_bomb_is_refused(story_dir):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    problems = problems_of("\n".join(lines) + "\npanels: [{prompt: sky}]\n")
    assert "expands to over" in problems[0]


def test_recursive_alias_is_refused(story_dir):
    problems = problems_of("title: &t [*t]\npanels: [{prompt: sky}]\n")
    assert "recursive" in problems[0]


def test_deep_nesting_is_refused(story_dir):
    problems = problems_of("title: " + "[" * 5000 + "]" * 5000 + "\n")
    assert problems[0].startswith("story.yaml: ")


# --------------------------------------------------------------------------------------------
# Fuzzing: load_story returns a Story or raises StoryError, nothing else
# --------------------------------------------------------------------------------------------

_KEYS = [
    "title", "model", "seed", "style", "page", "characters", "panels", "prompt", "who", "text",
    "name", "at", "image", "mask", "description", "caption", "dialogue", "span", "page_break",
    "page_layout", "size", "layout", "box", "mira", "bolt", "steps", "guidance", "dpi",
]
_WORDS = ["left", "auto", "wide", "A4", "mira", "bolt", "grid-4", "rtl", "mira.png", "", " "]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(),
    st.text(max_size=8), st.sampled_from(_WORDS),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)
_structured = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6).map(
    lambda d: yaml.safe_dump(d, allow_unicode=True)
)
_TOKENS = [
    "title: x\n", "panels:\n", "  - prompt: sky\n", "    characters: [mira]\n", "characters:\n",
    "  mira: {image: mira.png}\n", "  mira: {description: d}\n", "    dialogue: [{who: mira, text: hi}]\n",
    "&a ", "*a", "<<: ", "!!python/object:os.system ", "2024-13-45", "{", "}", "[", "]", ":", "-",
    " ", "\n", "\t", "'", '"', "#", "|", ">", "?", "%", "@", "`", "\x00", "\ufeff", "é", "0x1F",
]
_tokens = st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join)


_name = st.sampled_from(["mira", "bolt", "mria", "zed", "", 3])
_placement = st.one_of(
    st.none(), st.sampled_from(["left", "right", "center", "top"]),
    st.fixed_dictionaries({"box": st.lists(st.floats(-0.5, 1.5), min_size=0, max_size=5)}),
)
_ref = st.one_of(_name, st.fixed_dictionaries({"name": _name}, optional={"at": _placement}))
_panel = st.fixed_dictionaries(
    {"prompt": st.sampled_from(["sky", "hill at night", "", " "])},
    optional={
        "characters": st.lists(_ref, max_size=5),
        "dialogue": st.lists(st.fixed_dictionaries({"who": _name, "text": st.text(max_size=6)}), max_size=3),
        "caption": st.text(max_size=10),
        "seed": st.integers(-5, 2**33),
        "span": st.sampled_from(["wide", "normal", "huge"]),
        "page_break": st.booleans(),
        "page_layout": st.sampled_from(["auto", "grid-4", [1, 2], [0], "nope"]),
    },
)
_plausible = st.fixed_dictionaries(
    {
        "characters": st.dictionaries(
            st.sampled_from(["mira", "bolt", "pip"]),
            st.fixed_dictionaries({}, optional={"image": st.sampled_from(["mira.png", "none.png"]),
                                                "description": st.text(max_size=5)}),
            max_size=3,
        ),
        "panels": st.lists(_panel, max_size=4),
    },
    optional={"page": st.fixed_dictionaries({}, optional={
        "layout": st.sampled_from(["auto", "splash", [2, 2], [5]]),
        "size": st.sampled_from(["A4", "A3", {"width": 500, "height": 700}]),
        "reading_order": st.sampled_from(["ltr", "rtl", "up"]),
    })},
).map(lambda d: yaml.safe_dump(d, allow_unicode=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(_structured, _tokens, _plausible))
def test_load_story_returns_a_story_or_raises_story_error(story_dir, document):
    path = story_dir / "fuzz.yaml"
    path.write_text(document, encoding="utf-8", errors="surrogatepass")
    try:
        story = load_story(path)
    except StoryError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
    else:
        assert isinstance(story, Story)
        assert all(isinstance(c, Character) for c in story.characters.values())
