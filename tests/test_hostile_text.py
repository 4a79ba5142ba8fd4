"""Hostile text in every text field of a story: one clear line, or files that all parse.

A story's title, captions, dialogue, prompts, character names and descriptions get strings of
control characters, markup, bidirectional controls, combining marks, very long words, mixed
scripts, emoji, lone surrogates and non-characters. Rendered through the CLI with a tiny real
pipeline, each story either is refused (`anystory validate` and `render` say the same one line,
exit 1, and the earlier output is untouched) or renders (exit 0) and every file written parses:
the PNGs, the PDF (its title read back), the CBZ (its ComicInfo.xml as XML, its title read
back), the JSON. Never a traceback, never an "unexpected" error. Storyboard imports get the
same strings. The rule itself (which characters, the message) is checked directly.
"""

from __future__ import annotations

import functools
import io
import json
import xml.etree.ElementTree as ET
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import storykit
import tiny
from anystory_cli import cli
from anystory_cli.errors import InputError, StoryError
from anystory_cli.export import comic_info_xml, write_cbz
from anystory_cli.render.compose import MAX_STEM_BYTES, export_stem
from anystory_cli.story import forbidden_characters, forbidden_kind, load_story, text_problem, validate_story, without_forbidden
from anystory_cli.storyboard import import_storyboard

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


# --------------------------------------------------------------------------------------------
# Hostile strings
# --------------------------------------------------------------------------------------------

CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
MARKUP = ["<b>", "</ComicInfo>", "&amp;", "&", "<![CDATA[", "]]>", "<!--", '"', "'", "\\", "(", ")",
          "<script>alert(1)</script>", "%s", "{title}", "${x}", "\\u0000", "#", ": ", "- ", "*a", "&a"]
BIDI = ["\u202e", "\u202d", "\u202a", "\u202b", "\u202c", "\u2066", "\u2067", "\u2068", "\u2069",
        "\u200e", "\u200f", "\u061c"]
COMBINING = ["e\u0301", "a" + "\u0301" * 30, "\u0489", "\u20dd", "\u0300\u0316"]
SCRIPTS = ["Ωμέγα", "Кириллица", "עברית", "العربية", "हिन्दी", "ไทย", "한국어", "日本語", "中文",
           "😀", "👩\u200d👩\u200d👧", "🇫🇷", "\u2028", "\u2029", "\ufeff", "\u00a0", "\u200b", "\ue000"]
ODD = ["\ud800", "\udfff", "\ud83d\ude00", "\ufffe", "\uffff", "\ufdd0", "\U0001fffe", "\U0010ffff"]
LONG_WORDS = ["W" * 300, "supercalifragilistic" * 12, "長" * 200]

pieces = st.one_of(
    st.sampled_from(CONTROLS + MARKUP + BIDI + COMBINING + SCRIPTS + ODD + LONG_WORDS),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=4),  # any code point
    st.text("abc xyz", min_size=1, max_size=8),
)
hostile = st.lists(pieces, min_size=1, max_size=5).map("".join)


def test_the_strategy_reaches_every_kind_of_character():
    # A cheap check that the pieces above are what their names say.
    assert all(forbidden_kind(c) == "control character" for c in CONTROLS if c not in "\t\n")
    assert forbidden_kind("\t") is forbidden_kind("\n") is None
    assert [forbidden_kind(c[0]) for c in ODD] == ["lone surrogate"] * 3 + ["non-character"] * 4 + [
        "non-character"]
    assert not any(forbidden_kind(c) for text in MARKUP + BIDI + COMBINING + SCRIPTS for c in text)


# --------------------------------------------------------------------------------------------
# Through the CLI: refused in one line, or every file parses
# --------------------------------------------------------------------------------------------

PAGE = {**storykit.PAGE, "layout": [2]}  # both panels on one page: one page to compose


def base_story() -> dict:
    """Two panels on one page, both characters drawn from reference images (no sheets)."""
    return {
        "title": "Test Story", "seed": 5, "style": dict(storykit.STYLE), "page": dict(PAGE),
        "characters": {"mira": {"image": "characters/mira.png", "description": "a red fox"},
                       "bolt": {"image": "characters/bolt.png"}},
        "panels": [
            {"prompt": "mira on a hill", "characters": ["mira"], "caption": "One windy morning.",
             "dialogue": [{"who": "mira", "text": "What a sky!"}]},
            {"prompt": "mira and bolt", "characters": ["mira", "bolt"],
             "dialogue": [{"who": "bolt", "text": "Where is the kite?"}]},
        ],
    }


def _set(story: dict, field: str, value: str) -> None:
    """Put `value` into the story at `field` (a character's name everywhere it is used)."""
    if field == "name":
        story["characters"] = {value if k == "bolt" else k: v for k, v in story["characters"].items()}
        story["panels"][1]["characters"][1] = value
        story["panels"][1]["dialogue"][0]["who"] = value
        return
    target = story
    *path, last = [int(p) if p.isdigit() else p for p in field.split(".")]
    for part in path:
        target = target[part]
    target[last] = value


# Fields whose text only recomposes the page or the exports (picked twice as often: they cost
# no new panel), then fields that change what a panel is drawn from.
COMPOSED = ["title", "panels.0.caption", "panels.0.dialogue.0.text", "panels.1.dialogue.0.text"]
DRAWN = ["panels.0.prompt", "panels.1.prompt", "style.prompt_prefix", "characters.mira.description",
         "name"]
# Plain names too, so that a renamed character is drawn (a hostile one is almost always refused).
values = st.one_of(hostile, st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,39}", fullmatch=True))


@pytest.fixture(scope="module")
def workspace(seam, tmp_path_factory):
    """A story folder with the reference sprites and an output folder rendered once."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "characters").mkdir()
    for seed, who in enumerate(("mira", "bolt")):
        tiny.sprite(storykit.COLOURS[who], seed=seed).save(root / "characters" / f"{who}.png")
    story = root / "story.yaml"
    story.write_text(yaml.safe_dump(base_story(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    result = runner.invoke(cli.app, ["render", str(story), "--out", str(root / "out")])
    assert result.exit_code == 0, result.stderr
    return root


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def check_outputs(out: Path, title: str) -> None:
    """Every file of the output folder opens as what its name says."""
    import pikepdf

    pages = sorted((out / "pages").glob("page-*.png"))
    for path in out.rglob("*.png"):
        with Image.open(path) as image:
            image.load()
            assert all(isinstance(v, str) for v in image.text.values())
    with zipfile.ZipFile(out / "story.cbz") as archive:
        assert archive.testzip() is None
        info = ET.fromstring(archive.read("ComicInfo.xml"))
        assert info.findtext("Title") == title
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        assert len(names) == len(pages) == int(info.findtext("PageCount"))
        for name in names:
            Image.open(io.BytesIO(archive.read(name))).load()
    with pikepdf.open(out / "story.pdf") as pdf:
        assert str(pdf.docinfo["/Title"]) == title
        assert len(pdf.pages) == len(pages)
    for path in out.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(COMPOSED * 2 + DRAWN), values), min_size=1, max_size=2))
def test_hostile_text_is_refused_in_one_line_or_every_file_parses(workspace, changes):
    story = base_story()
    for field, value in changes:
        _set(story, field, value)
    path, out = workspace / "story.yaml", workspace / "out"
    path.write_text(yaml.safe_dump(story, allow_unicode=True, sort_keys=False), encoding="utf-8")
    before = storykit.snapshot(out)

    checked = runner.invoke(cli.app, ["validate", str(path)])
    rendered = runner.invoke(cli.app, ["render", str(path), "--out", str(out), "--json"])
    problems, (refusal, *more) = error_lines(checked), error_lines(rendered) or [None]
    assert not more and rendered.exit_code in (0, 1), rendered.stderr
    assert checked.exit_code == (1 if problems else 0), checked.stderr
    event("refused" if rendered.exit_code else "rendered")
    if rendered.exit_code == 1:
        event(refusal.split(": ", 3)[-1][:40])
        assert "unexpected" not in refusal, refusal
        assert storykit.snapshot(out) == before  # nothing written, nothing destroyed
        # validate says the same: its first line, and render's count of the others.
        assert problems and refusal.startswith(problems[0]), (problems, refusal)
        assert json.loads(rendered.stdout)["ok"] is False
        return
    assert not problems and refusal is None, (problems, refusal)
    title = load_story(path).title
    summary = json.loads(rendered.stdout)
    assert summary["ok"] is True and summary["stories"][0]["title"] == title
    check_outputs(out, title)


def test_a_nul_in_the_title_is_refused_in_one_line_and_the_earlier_comic_is_kept(workspace):
    # As a new user would try it: a YAML escape in a quoted title.
    path, out = workspace / "nul.yaml", workspace / "out-nul"
    text = yaml.safe_dump(base_story(), allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    assert runner.invoke(cli.app, ["render", str(path), "--out", str(out)]).exit_code == 0
    before = storykit.snapshot(out)
    path.write_text(text.replace("title: Test Story", 'title: "Lost \\u0000 Kite"'), encoding="utf-8")
    expected = (f"error: {path}: title: control character U+0000 at character 6 is not allowed in "
                "text (no control characters but tab and newline, no lone surrogates, no "
                "non-characters); remove it (line 1)")
    for command in (["validate", str(path)], ["render", str(path), "--out", str(out)]):
        result = runner.invoke(cli.app, command)
        assert result.exit_code == 1 and error_lines(result) == [expected], result.stderr
        assert result.stderr.strip() == expected
    assert storykit.snapshot(out) == before


def test_a_story_file_with_a_long_name_gets_its_exports(workspace):
    # 120 two-byte letters: the story's file name fits (245 bytes), '.<name>.pdf.<random>.tmp'
    # would not.
    path = workspace / ("é" * 120 + ".yaml")
    path.write_text(yaml.safe_dump(base_story(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    out = workspace / "out-long"
    result = runner.invoke(cli.app, ["render", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    stem = "é" * (MAX_STEM_BYTES // 2)
    assert export_stem(path) == stem and len(stem.encode()) == MAX_STEM_BYTES
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["review.html", f"{stem}.cbz", f"{stem}.pdf"]
    assert export_stem("a/tale.yaml") == "tale" and export_stem("...yaml") == ".."


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("char, kind", [
    ("\x00", "control character"), ("\x1b", "control character"), ("\r", "control character"),
    ("\x7f", "control character"), ("\x85", "control character"), ("\x9f", "control character"),
    ("\ud800", "lone surrogate"), ("\udfff", "lone surrogate"), ("\ufdd0", "non-character"),
    ("\ufdef", "non-character"), ("\ufffe", "non-character"), ("\U0001ffff", "non-character"),
    ("\U0010fffe", "non-character"),
    ("\t", None), ("\n", None), (" ", None), ("\xa0", None), ("\u202e", None), ("\u2028", None),
    ("\ufeff", None), ("\ufffd", None), ("\ue000", None), ("\U0001f600", None), ("\U0010fffd", None),
])
def test_which_characters_no_text_may_hold(char, kind):
    assert forbidden_kind(char) == kind
    assert without_forbidden(f"a{char}b") == ("ab" if kind else f"a{char}b")


def test_the_scan_finds_exactly_the_characters_the_rule_names():
    planes = [chr(plane << 16 | low) for plane in range(1, 17) for low in (0, 0xFFFD, 0xFFFE, 0xFFFF)]
    text = "".join(map(chr, range(0x10000))) + "".join(planes)
    assert [c for _, c in forbidden_characters(text)] == [c for c in text if forbidden_kind(c)]


def test_the_problem_says_what_where_and_how_many():
    assert text_problem("tab\tand\nnewline") is None
    assert text_problem("A\x00B\x07C\x1b") == (
        "control character U+0000 at character 2 (and 2 more) is not allowed in text (no control "
        "characters but tab and newline, no lone surrogates, no non-characters); remove it")
    # YAML keeps "\\ud83d\\ude00" as two lone surrogates (JSON would join them): say how to write it.
    assert text_problem("\ud83d\ude00").endswith(
        "remove it and write a character beyond U+FFFF as one escape (\\U0001F600), not as a pair "
        "of \\u escapes")


@pytest.mark.parametrize("field", ["title", "style.prompt_prefix", "style.negative_prompt",
                                   "panels.0.prompt", "panels.0.caption", "panels.0.dialogue.0.text",
                                   "characters.mira.description", "page.font", "model"])
def test_every_text_field_follows_the_rule_in_one_line(field):
    story = base_story()
    _set(story, field, "x\x1by")
    with pytest.raises(StoryError) as caught:
        validate_story(story, source="s.yaml", check_images=False)
    assert caught.value.problems == [
        f"s.yaml: {field.replace('.0', '[0]')}: control character U+001B at character 2 is not "
        "allowed in text (no control characters but tab and newline, no lone surrogates, no "
        "non-characters); remove it"]


def test_a_forbidden_name_is_one_line_at_each_place_it_is_used():
    story = base_story()
    _set(story, "name", "bo\x00lt")
    with pytest.raises(StoryError) as caught:
        validate_story(story, source="s.yaml", check_images=False)
    assert [p.split(": control character U+0000 at character 3 ")[0] for p in caught.value.problems] == [
        "s.yaml: characters['bo\\x00lt']", "s.yaml: panels[1].characters[1]",
        "s.yaml: panels[1].dialogue[0].who"]


def test_line_breaks_of_a_windows_editor_are_not_control_characters(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(b'title: "Lost\r\n  Kite"\r\npanels:\r\n  - prompt: |\r\n      sky\r\n      blue\r\n')
    story = load_story(path)
    assert story.title == "Lost Kite" and story.panels[0].prompt == "sky\nblue\n"


@pytest.mark.parametrize("name, expected", [
    ("b" * 300, "a file or folder name of 300 bytes ('bbbbbbbbbbbbbbbbbbbb'...); at most 255"),
    ("é" * 130, "a file or folder name of 260 bytes ('éééééééééééééééééééé'...); at most 255"),
    ("/".join(["b" * 200] * 25), "a path of 5024 bytes; at most 4096"),
])
def test_a_path_too_long_for_any_file_is_one_line_in_every_path_field(tmp_path, name, expected):
    # The file system's own error (ENAMETOOLONG) would come from the first look at the file.
    fields = {"model": name, "style": {"loras": [{"path": name}]}, "page": {"font": f"{name}.ttf"},
              "characters": {"mira": {"image": name, "mask": name}},
              "panels": [{"prompt": "sky", "characters": ["mira"]}]}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(fields, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(cli.app, ["validate", str(path)])
    assert result.exit_code == 1
    font = expected.replace("300 bytes", "304 bytes").replace("260 bytes", "264 bytes").replace(
        "5024 bytes", "5028 bytes")
    lines = [line.split(f"{path}: ", 1)[1].rsplit(" (line", 1)[0] for line in error_lines(result)]
    assert sorted(lines) == sorted([f"characters.mira.image: {expected}", f"characters.mira.mask: {expected}",
                                    f"model: {expected}", f"page.font: {font}",
                                    f"style.loras[0].path: {expected}"])
    flux = {"model": {"base": name, "redux": name, "adapter": name}, "panels": [{"prompt": "sky"}]}
    with pytest.raises(StoryError) as caught:
        validate_story(flux, source="s.yaml")
    assert caught.value.problems == [f"s.yaml: model.{part}: {expected}" for part in ("base", "redux", "adapter")]


# --------------------------------------------------------------------------------------------
# Exports on their own: never a file no reader opens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("title", ["a\x00b", "\ud800", "\uffff"])
def test_comic_info_refuses_what_xml_cannot_hold_and_keeps_the_earlier_archive(tmp_path, title):
    page = Image.new("RGB", (8, 8))
    path = write_cbz([page], tmp_path / "comic.cbz", "Kite")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"^ComicInfo.xml cannot hold U\+"):
        write_cbz([page], path, title)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["comic.cbz"]


def test_comic_info_holds_every_other_text_as_it_is():
    title = "<b>&amp;</b> ]]> \u202eevil\u202c e\u0301 日本語 😀 \x85\ufdd0 tab\t nl\n" + "W" * 300
    assert ET.fromstring(comic_info_xml(title, [(1, 1, 1)])).findtext("Title") == title


# --------------------------------------------------------------------------------------------
# Storyboard imports: forbidden characters removed with a warning, the rest kept
# --------------------------------------------------------------------------------------------


def _script(role_name, alias, prompt, shot_prompt, narration, synopsis) -> dict:
    return {"故事梗概": synopsis,
            "角色表": [{"角色名": role_name, "alias": alias, "simple_prompt": prompt}],
            "分镜头": [{"prompt": shot_prompt, "act_roles": [alias], "旁白": narration}]}


@settings(max_examples=60, deadline=None)
@given(texts=st.tuples(hostile, hostile, hostile, hostile, hostile, hostile))
def test_hostile_storyboard_text_imports_cleanly_or_is_one_clear_error(texts):
    role_name, alias, prompt, shot_prompt, narration, synopsis = texts
    try:
        result = import_storyboard(_script(role_name, alias, prompt, shot_prompt, narration, synopsis),
                                   "script.json")
    except InputError as error:
        assert "\n" not in str(error) and not any(forbidden_kind(c) for c in str(error))
        return
    for warning in result.warnings:
        assert "\n" not in warning and not any(forbidden_kind(c) for c in warning)
    # What it writes reads back as exactly the story it checked: no text, not even a role name
    # in the header comments, adds or changes a key.
    assert yaml.safe_load(result.yaml_text) == result.story
    validate_story(result.story, check_images=False)
    removed = any(forbidden_kind(c) for text in texts for c in text)
    assert removed == any("no story text may hold removed" in w for w in result.warnings)


def test_a_storyboard_removes_forbidden_characters_and_says_where():
    result = import_storyboard(_script("Mi\x1bra", "ROLE-A", "a fox\x00", "ROLE-A runs\ufffe",
                                       "Go\x07!", "Kite\ud800"), "script.json")
    assert result.story["title"] == "Kite" and result.story["characters"] == {"mira": {"description": "a fox"}}
    assert result.story["panels"] == [{"prompt": "mira runs", "characters": ["mira"], "caption": "Go!"}]
    assert result.warnings == [
        "script.json: 角色表[0].simple_prompt: 1 character(s) no story text may hold removed (first: "
        "control character U+0000 at character 6)",
        "script.json: 角色表[0].角色名: 1 character(s) no story text may hold removed (first: control "
        "character U+001B at character 3)",
        "script.json: 分镜头[0].prompt: 1 character(s) no story text may hold removed (first: "
        "non-character U+FFFE at character 12)",
        "script.json: 分镜头[0].旁白: 1 character(s) no story text may hold removed (first: control "
        "character U+0007 at character 3)",
        "script.json: 故事梗概: 1 character(s) no story text may hold removed (first: lone surrogate "
        "U+D800 at character 5)",
    ]


def test_a_role_name_with_a_line_break_stays_inside_its_comment():
    result = import_storyboard(_script("Mira\u2028seed: 7", "ROLE-A", "a fox", "ROLE-A runs", "Go!",
                                       "Kite"), "script.json")
    assert "seed" not in yaml.safe_load(result.yaml_text)
    assert yaml.safe_load(result.yaml_text) == result.story


# --------------------------------------------------------------------------------------------
# The evaluation report (the HTML page the project writes)
# --------------------------------------------------------------------------------------------


class _Shown(HTMLParser):
    """The start tags and the text of an HTML page, as a browser's parser reads them."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text = ""
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text += data


@functools.cache
def _plain_report_tags() -> list[str]:
    from anystory_cli.lab import evaluate
    from test_evaluate_adapter import _report_result

    return _Shown(evaluate._adapter_html(_report_result())).tags


@settings(max_examples=12, deadline=None)
@given(model_id=hostile, variant=hostile)
def test_the_evaluation_report_shows_any_text_escaped(model_id, variant):
    from anystory_cli.lab import evaluate
    from test_evaluate_adapter import _report_result

    html = evaluate._adapter_html(_report_result(variants=("anystory", variant), model_id=model_id))
    html.encode("utf-8")  # writable as the UTF-8 its <meta charset> says
    shown = _Shown(html)
    # The elements of a plain report, and the text itself (forbidden characters as escapes).
    assert shown.tags == _plain_report_tags()
    escaped = "".join(c.encode("unicode_escape").decode() if forbidden_kind(c) else c for c in model_id)
    assert f"Model {escaped}." in shown.text
