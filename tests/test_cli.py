"""The `anystory` command, through typer's CliRunner, with a tiny real pipeline in the seam.

Bad input of every kind gives exit 1, one line on stderr naming the file and the field, no
traceback, and leaves the output of an earlier successful render byte-identical.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import storykit
import tiny
from anystory_cli import __version__, cli, model_loading

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def rendered(seam, tmp_path_factory):
    """A story rendered once, successfully: (story folder, output folder, file hashes)."""
    root = tmp_path_factory.mktemp("good")
    story = storykit.write_story(root / "story")
    out = root / "out"
    result = invoke("render", str(story), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return story.parent, out, storykit.snapshot(out)


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert lines[0].startswith("error: ") and "\x1b[" not in lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Instant commands
# --------------------------------------------------------------------------------------------


def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"anystory {__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("render", "validate", "schema", "encode-character"):
        assert command in result.stdout


def test_importing_the_cli_and_asking_for_help_loads_no_model_library():
    code = (
        "import sys\n"
        "from anystory_cli.cli import app\n"
        "for args in (['--version'], ['--help'], ['render', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'diffusers', 'transformers', 'safetensors'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_schema_is_json_schema_of_the_story():
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"title", "model", "seed", "style", "page", "characters", "panels"} <= set(schema["properties"])
    assert "panels" in schema["required"]


def test_validate_ok_and_every_problem_on_its_own_line(tmp_path):
    good = storykit.write_story(tmp_path / "good")
    result = invoke("validate", str(good))
    assert result.exit_code == 0 and result.stdout.strip() == f"ok: {good}"
    panels = storykit.panels()
    panels[0]["prompt"] = " "
    panels[1]["characters"][0]["name"] = "mria"
    panels[2]["colour"] = "red"
    bad = storykit.write_story(tmp_path / "bad", panels)
    result = invoke("validate", str(bad))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith(f"error: {bad}: panels[") for line in lines)
    assert "panels[0].prompt: must not be empty" in lines[0]
    assert "panels[1].characters[0]: unknown character 'mria' (did you mean 'mira'?)" in lines[1]
    assert "panels[2]: unknown key 'colour'" in lines[2]


def test_usage_errors_exit_2(tmp_path):
    assert invoke("render").exit_code == 2
    assert invoke("render", "x.yaml", "--pages", "2-1").exit_code == 2
    assert invoke("render", "x.yaml", "--steps", "0").exit_code == 2
    assert invoke("encode-character", "x.png", "--name", "../evil").exit_code == 2
    assert invoke("frobnicate").exit_code == 2


def test_error_colour_only_on_a_terminal_without_no_color(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for no_color, coloured in (("", True), ("1", False)):
        stream = Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("TERM", "xterm-256color")
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        else:
            monkeypatch.delenv("NO_COLOR", raising=False)
        cli.output.print_error("panels[3]: bad\nthing")
        text = stream.getvalue()
        assert ("\x1b[" in text) is coloured
        assert "error: panels[3]: bad thing" in text and text.count("\n") == 1


# --------------------------------------------------------------------------------------------
# encode-character
# --------------------------------------------------------------------------------------------


def test_encode_character_stores_the_encoding_and_writes_a_card(seam, tmp_path):
    image = tmp_path / "mira.png"
    tiny.sprite().save(image)
    card = tmp_path / "cards" / "mira.png"
    result = invoke("encode-character", str(image), "--name", "mira", "--card", str(card),
                    "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.stderr
    entries = list((tmp_path / "cache" / "encodings").glob("*.safetensors"))
    assert len(entries) == 1 and str(entries[0]) in result.stdout and "mira: encoded" in result.stdout
    assert Image.open(card).size == (2 * 256 + 24, 256 + 16)
    again = invoke("encode-character", str(image), "--name", "mira", "--card", str(card),
                   "--cache", str(tmp_path / "cache"))
    assert again.exit_code == 0 and "already cached" in again.stdout


def test_encode_character_without_transparency_or_mask_says_what_to_do(seam, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    seam.calls = 0
    line = one_error_line(invoke("encode-character", str(image), "--name", "mira"))
    assert str(image) in line and "no transparency" in line and "mask" in line
    assert seam.calls == 0  # the model was not even loaded
    mask = tmp_path / "mask.png"
    Image.new("L", (40, 40), 255).save(mask)
    result = invoke("encode-character", str(image), "--name", "mira", "--mask", str(mask),
                    "--card", str(tmp_path / "card.png"))
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------


def test_render_writes_pages_pdf_cbz_and_panels(rendered):
    _, out, files = rendered
    assert {"pages/page-001.png", "pages/page-002.png", "story.pdf", "story.cbz",
            "panels/panel-001.png", "panels/panel-002.png", "panels/panel-003.png"} <= set(files)


def test_rerunning_an_unchanged_story_draws_nothing_and_says_so(rendered, seam):
    story, out, files = rendered
    seam.calls = 0
    result = invoke("render", str(story / "story.yaml"), "--out", str(out))
    assert result.exit_code == 0
    assert "up to date, nothing to do" in result.stdout and seam.calls == 0
    assert storykit.snapshot(out) == files


def test_json_summary_and_one_changed_panel(seam, tmp_path):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    result = invoke("render", str(story), "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    (first,) = summary["stories"]
    assert first["panels_rendered"] == [1, 2, 3] and first["cache_misses"] + first["cache_hits"] == 3
    assert {"total", "render"} <= set(first["timings"])
    assert any(f.endswith("story.cbz") for f in first["files_written"])

    panels = storykit.panels()
    panels[1]["prompt"] = "mira and bolt at night"
    storykit.write_story(tmp_path / "s", panels)
    summary = json.loads(invoke("render", str(story), "--out", str(out), "--json").stdout)
    assert summary["stories"][0]["panels_rendered"] == [2]
    assert summary["stories"][0]["panels_skipped"] == [1, 3]


def test_json_reports_failures_too(seam, tmp_path):
    result = invoke("render", str(tmp_path / "missing.yaml"), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and "missing.yaml" in summary["error"]


def test_pages_option_and_save_routing(seam, tmp_path):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    result = invoke("render", str(story), "--out", str(out), "--pages", "2", "--save-routing")
    assert result.exit_code == 0, result.stderr
    assert "1 panel(s) drawn" in result.stdout and "page(s) 1 incomplete" in result.stdout
    assert (out / "panels" / "panel-003-routing.npy").is_file()
    assert (out / "panels" / "panel-003-routing.png").is_file()
    assert not (out / "story.pdf").exists()


def test_several_stories_share_one_model_load(seam, tmp_path):
    first = storykit.write_story(tmp_path / "a", [{"prompt": "mira", "characters": ["mira"]}])
    second = storykit.write_story(tmp_path / "b", [{"prompt": "bolt", "characters": ["bolt"]}],
                                  name="other.yaml")
    seam.calls = 0
    result = invoke("render", str(first), str(second), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "story" / "story.pdf").is_file()
    assert (tmp_path / "out" / "other" / "other.pdf").is_file()
    assert seam.calls == 1


def test_an_unexpected_error_is_one_line_with_a_debug_hint(seam, tmp_path, monkeypatch):
    def broken(model, story_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", broken)
    story = storykit.write_story(tmp_path / "s")
    result = invoke("render", str(story), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    # Progress lines come first (the failure is in the middle of the run); one error line last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert "unexpected RuntimeError: boom" in errors[0] and "--debug" in errors[0]
    result = invoke("--debug", "render", str(story), "--out", str(tmp_path / "out"))
    assert isinstance(result.exception, RuntimeError)


# --------------------------------------------------------------------------------------------
# Bad input: exit 1, one line naming file and field, earlier output intact
# --------------------------------------------------------------------------------------------


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (IHDR patched, CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = bytearray(data[16:29])
    header[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return bytes(data[:16] + header + crc + data[33:])


def edit_data(change):
    def apply(folder: Path) -> None:
        path = folder / "story.yaml"
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return apply


def write_text(text):
    return lambda folder: (folder / "story.yaml").write_text(text)


def mira_bytes(make):
    return lambda folder: (folder / "characters" / "mira.png").write_bytes(make(folder))


def truncated(folder: Path) -> bytes:
    buffer = io.BytesIO()
    tiny.sprite(size=64).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def duplicate_character(folder: Path) -> None:
    path = folder / "story.yaml"
    text = path.read_text()
    path.write_text(text.replace("  bolt:\n", "  mira:\n    image: characters/bolt.png\n  bolt:\n", 1))


def more_characters(data) -> None:
    for name in ("ada", "ben"):
        data["characters"][name] = {"description": f"{name} the tall"}
    data["panels"][2]["characters"] += ["ada", "ben"]


BAD_INPUT = {
    "malformed yaml": (write_text("title: [unclosed\npanels: ]\n"), "not valid YAML"),
    "not a mapping": (write_text("- just\n- a list\n"), "expected a mapping"),
    "unknown key": (edit_data(lambda d: d["panels"][0].update(colour="red")),
                    "panels[0]: unknown key 'colour'"),
    "missing image": (lambda f: (f / "characters" / "mira.png").unlink(),
                      "characters.mira.image: file not found"),
    "corrupt image": (mira_bytes(lambda f: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20),
                      "characters.mira.image"),
    "truncated image": (mira_bytes(truncated), "characters.mira.image: corrupt or truncated"),
    "not an image": (mira_bytes(lambda f: b"hello, I am text"), "characters.mira.image: not an image"),
    "zero-size image": (mira_bytes(lambda f: png_claiming_size(0, 0)), "characters.mira.image"),
    "gigantic image": (mira_bytes(lambda f: png_claiming_size(100_000, 100_000)),
                       "characters.mira.image: image is too large"),
    "unknown character in panel": (
        edit_data(lambda d: d["panels"][0].update(characters=["mria"])),
        "panels[0].characters[0]: unknown character 'mria' (did you mean 'mira'?)"),
    "unknown speaker": (
        edit_data(lambda d: d["panels"][1]["dialogue"][0].update(who="blot")),
        "panels[1].dialogue[0].who: unknown speaker 'blot'"),
    "too many characters": (edit_data(more_characters),
                            "panels[2].characters: 5 characters, but the model supports at most 4"),
    "empty prompt": (edit_data(lambda d: d["panels"][1].update(prompt="")),
                     "panels[1].prompt: must not be empty"),
    "duplicate names": (duplicate_character, "characters: duplicate character name 'mira'"),
    "undrawable text": (edit_data(lambda d: d["panels"][0].update(caption="Stars \U0010fffd")),
                        "panels[0].caption: no lettering font draws"),
    "missing font": (edit_data(lambda d: d["page"].update(font="No Such Family Sans")),
                     "page.font: no installed font is named 'No Such Family Sans'"),
    "missing model folder": (edit_data(lambda d: d.update(model="models/nope")),
                             "model: model folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_1_and_earlier_output_is_kept(case, rendered, tmp_path, monkeypatch):
    good_story, out, before = rendered
    folder = tmp_path / "story"
    shutil.copytree(good_story, folder)
    damage, expected = BAD_INPUT[case]
    damage(folder)
    if case == "missing model folder":
        monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", None)  # the real loader
    result = invoke("render", str(folder / "story.yaml"), "--out", str(out))
    assert result.exit_code == 1, (case, result.stdout, result.stderr)
    line = one_error_line(result)
    assert str(folder / "story.yaml") in line, line
    assert expected in line, line
    assert storykit.snapshot(out) == before


def test_missing_story_file(rendered):
    _, out, before = rendered
    line = one_error_line(invoke("render", "no/such/story.yaml", "--out", str(out)))
    assert "no/such/story.yaml: no such file" in line
    assert storykit.snapshot(out) == before


def test_unwritable_output_folder(rendered, tmp_path):
    story, out, before = rendered
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_error_line(invoke("render", str(story / "story.yaml"), "--out", str(blocker / "out")))
    assert str(blocker / "out") in line and "output folder" in line
    assert blocker.read_text() == "not a folder"
    assert storykit.snapshot(out) == before


def test_default_model_not_shipped_says_how_to_point_at_a_folder(rendered, tmp_path, monkeypatch):
    story, out, before = rendered
    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", None)
    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", tmp_path / "empty")
    line = one_error_line(invoke("render", str(story / "story.yaml"), "--out", str(out)))
    assert "story.yaml: model: the embedded default model is not complete in this build" in line
    assert "model_index.json" in line and "anystory_adapter.safetensors" in line
    assert storykit.snapshot(out) == before
    fresh = tmp_path / "never-made"
    one_error_line(invoke("render", str(story / "story.yaml"), "--out", str(fresh)))
    assert not fresh.exists()  # a failed render leaves no empty output folder


def test_render_draws_each_guidance_setting_of_the_story(seam, tmp_path):
    """Through `anystory render`: the story's guidance, its interval and reference guidance each
    change the drawn panel (guidance above 1, so that all three act)."""
    style = {"steps": 4, "guidance": 3.0, "guidance_interval": [0.0, 0.7], "reference_strength": 1.0,
             "reference_guidance": True}
    variants = {"base": {}, "guidance": {"guidance": 5.0}, "interval": {"guidance_interval": [0.0, 1.0]},
                "reference_guidance": {"reference_guidance": False}}
    drawn = {}
    for name, change in variants.items():
        story = storykit.write_story(tmp_path / name, [storykit.panels()[1]], style={**style, **change})
        result = invoke("render", str(story), "--out", str(tmp_path / f"out-{name}"))
        assert result.exit_code == 0, result.stderr
        drawn[name] = np.asarray(Image.open(tmp_path / f"out-{name}" / "panels" / "panel-001.png"), dtype=int)
    for name in ("guidance", "interval", "reference_guidance"):
        assert np.abs(drawn[name] - drawn["base"]).max() > 0, name
