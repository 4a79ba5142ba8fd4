"""`anystory render --memory` and `--dry-run`: the memory plan said before any model loads, in the
terminal and in --json; sizes that are not sizes, budgets too small and plans today's FLUX pipeline
cannot follow are one line and exit 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import storykit
import yaml
from typer.testing import CliRunner

from anystory_cli import cli

MODEL = Path(__file__).parent / "data" / "flux_tiny" / "model"
SUBJECTS = Path(__file__).parent / "data" / "flux_tiny" / "subjects"
HUB = {"base": "black-forest-labs/FLUX.1-dev", "redux": "black-forest-labs/FLUX.1-Redux-dev",
       "adapter": "Junjie96/AnyStory/anystory_flux.bin"}
TINY = {"base": str(MODEL / "flux"), "redux": str(MODEL / "redux"), "adapter": str(MODEL / "anystory_flux.bin")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


def write_story(folder: Path, model: dict | str, resolution: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    story = {
        "title": "Balls", "seed": 3, "model": model,
        "style": {"steps": 2, "resolution": resolution}, "page": dict(storykit.PAGE),
        "characters": {"red": {"image": str(SUBJECTS / "red.png"), "mask": str(SUBJECTS / "red_mask.png")},
                       "blue": {"image": str(SUBJECTS / "blue.png"), "mask": str(SUBJECTS / "blue_mask.png")}},
        "panels": [{"prompt": "red and blue play", "characters": ["red", "blue"]},
                   {"prompt": "red alone", "characters": ["red"]}],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    from anystory_cli.flux import AnyStoryFluxPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(AnyStoryFluxPipeline, "from_pretrained", refuse)


def run(*args):
    return CliRunner().invoke(cli.app, ["render", *map(str, args)])


def test_dry_run_says_the_plan_and_the_panels_and_writes_nothing(tmp_path, no_model_loads):
    story = write_story(tmp_path, HUB, resolution=1024)
    out = tmp_path / "out"
    result = run(story, "--dry-run", "--memory", "16GB", "--out", out)
    assert result.exit_code == 0, result.output
    assert "memory plan: nf4-offload (transformer nf4, T5 bnb-int8, model offload), estimated peak" in result.output
    assert "1024 px, 2 characters per panel at most" in result.output
    assert "panel 1 (page 1, red, blue): red and blue play" in result.output
    assert "panel 2 (page 1, red): red alone" in result.output
    assert not out.exists()


@pytest.mark.parametrize("size, plan, offload", [("80GB", "bf16", "none"), ("24GB", "int8-offload", "model"),
                                                  ("10GiB", "group-offload", "group")])
def test_dry_run_json_carries_quantization_offload_and_peak(tmp_path, no_model_loads, size, plan, offload):
    story = write_story(tmp_path, HUB, resolution=1024)
    result = run(story, "--dry-run", "--memory", size, "--json", "--panels", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    chosen = data["stories"][0]["memory_plan"]
    assert chosen["plan"] == plan and chosen["offload"] == offload
    assert set(chosen["quantization"]) == {"transformer", "text_encoder"}
    assert 0 < chosen["estimated_peak_gib"] < chosen["budget_gib"]
    assert [p["panel"] for p in data["stories"][0]["panels"]] == [1]


def test_the_story_can_carry_the_memory_and_the_option_replaces_it(tmp_path, no_model_loads):
    story = write_story(tmp_path, {**HUB, "memory": "80GB"}, resolution=512)
    assert "memory plan: bf16 " in run(story, "--dry-run").output
    assert "memory plan: group-offload " in run(story, "--dry-run", "--memory", "10G").output


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots"], "--memory: expected a memory size such as 16GB"),
    (["--memory", "2GB"], "no memory plan fits 2GB for 2 characters at 1024 px; the smallest that works is"),
])
def test_a_bad_or_too_small_memory_is_one_line(tmp_path, no_model_loads, args, message):
    story = write_story(tmp_path, HUB, resolution=1024)
    for extra in ([], ["--dry-run"]):
        result = run(story, *args, *extra)
        assert result.exit_code == 1
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_a_story_memory_that_is_not_a_size_is_a_story_error(tmp_path):
    story = write_story(tmp_path, {**HUB, "memory": "sixteen"})
    result = CliRunner().invoke(cli.app, ["validate", str(story)])
    assert result.exit_code == 1
    assert ".memory: expected a memory size such as 16GB, 12GiB or 24G, or auto, got 'sixteen'" in result.output


def test_a_plan_todays_flux_pipeline_cannot_follow_is_refused_before_loading(tmp_path, no_model_loads):
    story = write_story(tmp_path, HUB, resolution=1024)
    result = run(story, "--memory", "16GB", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "memory plan nf4-offload" in result.output and "not applied to AnyStory FLUX pipelines yet" in result.output
    assert not (tmp_path / "out").exists()


def test_memory_on_a_model_that_is_not_flux_is_refused(tmp_path, no_model_loads):
    story = write_story(tmp_path, "default")
    result = run(story, "--dry-run", "--memory", "16GB")
    assert result.exit_code == 1
    assert "memory plans are for FLUX models" in result.output


def test_a_tiny_flux_story_renders_with_its_plan_in_the_json(tmp_path):
    """The tiny model fits everything on the device: the plan is said, followed, and reported."""
    story = write_story(tmp_path, TINY)
    result = run(story, "--memory", "8GB", "--json", "--panels", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["stories"][0]
    chosen = summary["memory_plan"]
    assert chosen["plan"] == "bf16" and chosen["offload"] == "none"
    assert chosen["quantization"] == {"transformer": "bf16", "text_encoder": "bf16"}
    assert chosen["sizes"] == "flux's sizes" and chosen["estimated_peak_gib"] < 0.1
    assert summary["panels_rendered"] == [2]


def test_model_offload_plan_needs_a_cuda_gpu(tmp_path, no_model_loads):
    story = write_story(tmp_path, HUB, resolution=512)
    result = run(story, "--memory", "32GB", "--device", "cpu")
    assert result.exit_code == 1
    assert "memory plan bf16-offload offloads from a CUDA GPU; this render runs on cpu" in result.output
