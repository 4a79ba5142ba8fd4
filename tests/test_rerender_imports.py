"""A render that draws no panel imports no torch, diffusers or transformers and loads no model.

The story is drawn once by the shipped default model (one panel, one step); then the real
command re-renders it in fresh processes: unchanged, with a new caption and line of dialogue,
and with a page setting that only recomposes the page. Each process reports the modules it
imported (an unchanged story does not even render review.html again: no Jinja2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import storykit

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers")

# The real command, then the heavy modules it imported (also after a failure).
WRAPPER = """
import json, os, sys
from anystory_cli import cli, devices
if os.environ.get("AS_GPU_BUILD"):  # a torch built for CUDA: `auto` is not known without asking torch
    devices.gpu_build = lambda: True
try:
    cli.app(sys.argv[2:], prog_name="anystory")
except SystemExit as stop:
    code = stop.code or 0
top = {name.split(".")[0] for name in sys.modules}
heavy = sorted(top & {"torch", "diffusers", "transformers"})
open(sys.argv[1], "w").write(json.dumps({"code": code, "heavy": heavy, "jinja2": "jinja2" in top}))
"""


def rerender(story: Path, out: Path, cache: Path, tmp_path: Path, *options: str,
             gpu_build: bool = False) -> tuple[dict, dict]:
    report = tmp_path / "report.json"
    env = {**os.environ, "ANYSTORY_CACHE": str(cache), "PYTHONPATH": str(ROOT), "NO_COLOR": "1",
           "ANYSTORY_DEVICE": "", "ANYSTORY_DTYPE": "", "AS_GPU_BUILD": "1" if gpu_build else ""}
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(report), "render", str(story), "--out", str(out),
                           "--json", *options], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    result = json.loads(report.read_text())
    assert result["code"] == 0, done.stderr
    return result, json.loads(done.stdout)["stories"][0]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A one-panel story with a character, drawn once by the default model."""
    from anystory_cli.render import render_story

    folder = tmp_path_factory.mktemp("story")
    story = storykit.write_story(folder, [{
        "prompt": "one character on a hill during the day , it is standing in the center",
        "characters": ["mira"], "caption": "One windy morning.",
        "dialogue": [{"who": "mira", "text": "What a sky!"}]}], model="default")
    out, cache = folder / "out", folder / "cache"
    with contextmanager(storykit.one_torch_thread)():
        summary = render_story(story, out, cache_dir=cache)
    assert summary.panels_rendered == [1] and summary.runtime["device"] == "cpu"
    return story, out, cache


def edit(story: Path, change) -> None:
    data = yaml.safe_load(story.read_text())
    change(data)
    story.write_text(yaml.safe_dump(data, sort_keys=False))


def test_an_unchanged_story_is_checked_without_torch(drawn, tmp_path):
    story, out, cache = drawn
    before = storykit.snapshot(out)
    modules, summary = rerender(story, out, cache, tmp_path)
    assert modules["heavy"] == []
    assert not modules["jinja2"]  # review.html's key is unchanged: the page is not rendered again
    assert summary["panels_rendered"] == [] and summary["model_loaded"] is False
    assert summary["runtime"]["device"] == "cpu"
    assert storykit.snapshot(out) == before


def test_lettering_and_page_edits_recompose_without_torch(drawn, tmp_path):
    story, out, cache = drawn
    panel = storykit.snapshot(out / "panels")
    page = storykit.snapshot(out / "pages")

    def new_words(data):
        data["panels"][0]["caption"] = "A calm evening."
        data["panels"][0]["dialogue"][0]["text"] = "What a quiet sky!"

    edit(story, new_words)
    modules, summary = rerender(story, out, cache, tmp_path)
    assert modules["heavy"] == [] and summary["model_loaded"] is False
    assert summary["panels_rendered"] == [] and summary["pages_written"] == [1]
    assert sorted(summary["exports_written"]) == ["story.cbz", "story.pdf"]
    assert storykit.snapshot(out / "panels") == panel and storykit.snapshot(out / "pages") != page

    edit(story, lambda data: data["page"].update(border=2.0))
    modules, summary = rerender(story, out, cache, tmp_path, "--device", "cpu")
    assert modules["heavy"] == [] and summary["pages_written"] == [1] and summary["panels_rendered"] == []


def test_auto_on_a_gpu_build_takes_the_recorded_kind_until_a_panel_must_be_drawn(drawn, tmp_path):
    """With a torch that could reach a GPU, `auto` is not known without torch: an unchanged story
    is keyed with the kind of device recorded beside its panels, and torch is asked only when a
    panel is to be drawn. A recorded kind torch does not confirm rekeys the panels: a panel drawn
    on the CPU is never taken for a CUDA one."""
    story, out, cache = drawn
    record = out / ".anystory" / "runtime.json"
    assert json.loads(record.read_text()) == {"device": "cpu", "dtype": "float32"}
    before = storykit.snapshot(out)
    modules, summary = rerender(story, out, cache, tmp_path, gpu_build=True)
    assert modules["heavy"] == [] and summary["panels_rendered"] == [] and summary["model_loaded"] is False
    assert summary["runtime"]["device"] == "cpu" and "assumed" in summary["runtime"]
    assert storykit.snapshot(out) == before

    record.write_text(json.dumps({"device": "cuda", "dtype": "bfloat16"}))  # as if drawn on a GPU
    modules, summary = rerender(story, out, cache, tmp_path, gpu_build=True)
    assert "torch" in modules["heavy"]  # CUDA keys match no stored panel: torch is asked
    assert summary["runtime"] == {"device": "cpu", "dtype": "float32", "offload": False}
    assert summary["panels_rendered"] == [] and summary["model_loaded"] is False  # rekeyed for the CPU
    assert json.loads(record.read_text()) == {"device": "cpu", "dtype": "float32"}
