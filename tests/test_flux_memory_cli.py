"""`anystory render --memory` and `--dry-run`: the memory plan said before any model loads, in the
terminal and in --json; sizes that are not sizes, budgets too small and plans today's FLUX pipeline
cannot follow are one line and exit 1."""
from __future__ import annotations

import importlib.util
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
    assert "memory plan: int8-offload (transformer int8, T5 bf16, model offload), estimated peak" in result.output
    assert "1024 px, 2 characters per panel at most" in result.output
    assert "panel 1 (page 1, red, blue): red and blue play" in result.output
    assert "panel 2 (page 1, red): red alone" in result.output
    assert not out.exists()


@pytest.mark.parametrize("size, plan, offload", [("80GB", "bf16", "none"), ("24GB", "int8-text-off", "none"),
                                                  ("9GiB", "group-offload", "group")])
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
    assert "memory plan: group-offload " in run(story, "--dry-run", "--memory", "9G").output


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots"], "--memory: expected a memory size such as 16GB"),
    (["--memory", "1GB"], "no memory plan fits 1GB for 2 characters at 1024 px; the smallest that works is"),
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
    assert ".memory: expected a memory size such as 16GB, 12GiB or 24G, auto, or a plan (bf16, " in result.output
    assert "int8, " in result.output and "got 'sixteen'" in result.output


@pytest.mark.parametrize("memory, line", [
    ("12GB", "memory plan nf4-offload offloads from a CUDA GPU; this render runs on cpu"),
    ("nf4-offload", "memory plan nf4-offload offloads from a CUDA GPU; this render runs on cpu"),
    ("gguf-q4-offload", "memory plan gguf-q4-offload offloads from a CUDA GPU"),
    ("sequential", "memory plan sequential offloads from a CUDA GPU; this render runs on cpu"),
])
def test_a_plan_this_machine_cannot_follow_is_refused_before_loading(tmp_path, no_model_loads, memory, line):
    story = write_story(tmp_path, HUB, resolution=1024)
    result = run(story, "--memory", memory, "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert line in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_quantization_library_that_is_missing_or_needs_cuda_is_one_line(tmp_path, no_model_loads, monkeypatch):
    from anystory_cli.flux import memory as ledger
    real = importlib.util.find_spec
    story = write_story(tmp_path, HUB, resolution=512)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    result = run(story, "--memory", "int8", "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert 'int8 quantization needs torchao, which is not installed (pip install "anystory-cli[quant]")' \
        in result.output
    # a bitsandbytes plan that does not offload (one a user could build from Python) on a CPU
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setitem(ledger.PLAN_NAMES, "nf4", ledger.Plan("nf4", ledger.QUANTIZATIONS["nf4"],
                                                              ledger.QUANTIZATIONS["bf16"], "none", 1.1))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    result = run(story, "--memory", "nf4", "--device", "cpu", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "nf4 quantization (bitsandbytes) needs a CUDA GPU" in result.output
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
    result = run(story, "--memory", "26GB", "--device", "cpu")
    assert result.exit_code == 1
    assert "memory plan bf16-offload offloads from a CUDA GPU; this render runs on cpu" in result.output


@pytest.mark.parametrize("name, keyed", [("bf16", False), ("bf16-offload", False), ("group-offload", False),
                                         ("sequential", False), ("int8", True), ("int8-offload", True),
                                         ("nf4-offload", True), ("gguf-q4-offload", True)])
def test_a_plan_is_in_the_model_key_only_where_it_changes_pixels(name, keyed):
    from anystory_cli.flux import memory as ledger
    plan = ledger.PLAN_NAMES[name]
    assert (ledger.weights_id("flux-1", plan) != "flux-1") == keyed
    assert ledger.weights_id("flux-1", None) == "flux-1"
    same_weights = [p for p in ledger.PLANS if p.weights_key == plan.weights_key]
    assert {ledger.weights_id("flux-1", p) for p in same_weights} == {ledger.weights_id("flux-1", plan)}


def test_a_tiny_flux_story_renders_with_the_int8_plan_keyed_apart_from_bf16(tmp_path, monkeypatch):
    """--memory int8: the transformer loads as torchao int8 through the one FLUX load path, the
    AnyStory LoRAs land on it as on bf16, its panels are close to the bf16 ones but keyed apart,
    and so are its character encodings."""
    pytest.importorskip("torchao")
    import numpy as np
    import torch
    from PIL import Image

    from anystory_cli.flux import AnyStoryFluxPipeline
    from anystory_cli.render.store import panel_path, stored_key

    loaded = []
    load = AnyStoryFluxPipeline.from_pretrained
    monkeypatch.setattr(AnyStoryFluxPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(load(*a, **k)) or loaded[-1]))
    story, cache = write_story(tmp_path, TINY), tmp_path / "cache"

    def render(out, *memory):
        result = run(story, *memory, "--json", "--device", "cpu", "--cache", cache, "--out", tmp_path / out)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["stories"][0]

    plain = render("bf16")
    assert plain["memory_plan"] is None and plain["cache_misses"] == 2
    quantized = render("int8", "--memory", "int8")
    chosen = quantized["memory_plan"]
    assert chosen["plan"] == "int8" and chosen["offload"] == "none" and chosen["budget_gib"] is None
    assert chosen["quantization"] == {"transformer": "int8", "text_encoder": "bf16"}
    assert quantized["panels_rendered"] == [1, 2]
    assert quantized["cache_misses"] == 2 and quantized["cache_hits"] == 0  # not the bf16 model's encodings

    full, int8 = (pipe.transformer for pipe in loaded)
    assert type(int8.transformer_blocks[0].attn.to_q.base_layer.weight).__name__ == "Int8Tensor"
    assert type(full.transformer_blocks[0].attn.to_q.base_layer.weight) is torch.nn.Parameter
    assert loaded[1].lora_layers == loaded[0].lora_layers and all(loaded[0].lora_layers.values())

    for index in (0, 1):
        a, b = (panel_path(tmp_path / out, index) for out in ("bf16", "int8"))
        assert stored_key(a) != stored_key(b)
        with Image.open(a) as x, Image.open(b) as y:
            difference = np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32))
        # of 255 (measured: 0.10 and 0.15 on average, 2 at most): close, not the same pixels
        assert 0 < difference.mean() < 1 and difference.max() <= 16, (difference.mean(), difference.max())

    again = render("int8", "--memory", "int8")  # the same plan: nothing to draw, the encodings cached
    assert again["panels_rendered"] == [] and len(loaded) == 2


def test_dry_run_plans_for_the_model_given_by_model_option(tmp_path, no_model_loads):
    story = write_story(tmp_path, "default")
    inline = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    result = run(story, "--dry-run", "--json", "--model", inline, "--memory", "8GB")
    assert result.exit_code == 0, result.output
    said = json.loads(result.output)["stories"][0]
    assert said["model"].startswith("FLUX ") and said["model"].endswith("anystory_flux.bin")
    assert said["memory_plan"]["plan"] == "bf16" and said["memory_plan"]["sizes"] == "flux's sizes"
    # and the other way round: a FLUX story drawn with --model default has no memory plan to make
    flux_story = write_story(tmp_path / "flux", TINY)
    refused = run(flux_story, "--dry-run", "--model", "default", "--memory", "8GB")
    assert refused.exit_code == 1 and "memory plans are for FLUX models; this story's model is 'default'" in refused.output
    plain = run(flux_story, "--dry-run", "--model", "default")
    assert plain.exit_code == 0 and "(model default; dry run" in plain.output
