"""A hub id ("org/name") names a model in the Hugging Face cache: loaded offline from a cache in
the hub's own layout; one clear line when it is neither cached nor reachable."""

from __future__ import annotations

import pytest

import storykit
import tiny
from anystory_cli.errors import ModelError
from anystory_cli.hub import is_hub_id
from anystory_cli.model_loading import load_pipeline, model_fingerprint, resolve_model_dir

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE holding `tiny-org/tiny-sd` as the hub writes it: blobs are not needed for
    a snapshot read (files may lie in the snapshot itself), refs/main names the revision."""
    from anystory_cli.sd.weights import save_adapter

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-sd"
    snapshot = repo / "snapshots" / REVISION
    base, encoder = tiny.tiny_sd_pipeline(), tiny.tiny_image_encoder()
    base.save_pretrained(snapshot)
    encoder.save_pretrained(snapshot / "image_encoder")
    save_adapter(tiny.tiny_adapter(base.unet, encoder), snapshot / "anystory_adapter.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_a_hub_id_loads_from_the_cache_offline(hub_cache, tmp_path):
    assert is_hub_id("tiny-org/tiny-sd") and not is_hub_id("./tiny-org/tiny-sd") and not is_hub_id("a/b/c")
    assert resolve_model_dir("tiny-org/tiny-sd") == hub_cache
    pipe = load_pipeline("tiny-org/tiny-sd")
    assert pipe.base.unet.config.cross_attention_dim == 32
    assert model_fingerprint("tiny-org/tiny-sd") == model_fingerprint(str(hub_cache))
    # a story names it the same way, and renders
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}],
                                 model="tiny-org/tiny-sd")
    from anystory_cli.render import render_story

    summary = render_story(story, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert summary.panels_rendered == [1] and summary.model_loaded


def test_a_local_folder_of_the_same_name_wins_over_the_hub(hub_cache, tmp_path):
    (tmp_path / "tiny-org" / "tiny-sd").mkdir(parents=True)
    assert not is_hub_id("tiny-org/tiny-sd", tmp_path)
    assert resolve_model_dir("tiny-org/tiny-sd", tmp_path) == tmp_path / "tiny-org" / "tiny-sd"


def test_an_unknown_id_offline_is_one_line(hub_cache):
    with pytest.raises(ModelError) as error:
        load_pipeline("nobody/no-such-model")
    message = str(error.value)
    assert "'nobody/no-such-model' is not in the Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert str(hub_cache.parents[2]) in message and "\n" not in message


def test_an_unreachable_hub_is_one_line(hub_cache, monkeypatch):
    """Online, but the hub cannot be reached (this machine has no network): no traceback."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelError, match="'nobody/no-such-model' is not in the Hugging Face cache .* cannot be downloaded"):
        load_pipeline("nobody/no-such-model")


def test_the_cli_says_an_unknown_id_in_one_line_with_rc_1(hub_cache, tmp_path):
    from typer.testing import CliRunner

    from anystory_cli.cli import app

    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}],
                                 model="nobody/no-such-model")
    result = CliRunner().invoke(app, ["render", str(story), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("stories", "["))]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and "nobody/no-such-model" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_part_may_be_a_hub_id_or_a_folder_inside_one(hub_cache, tmp_path):
    from anystory_cli.hub import model_part_dir

    assert model_part_dir("tiny-org/tiny-sd") == hub_cache
    assert model_part_dir("tiny-org/tiny-sd/image_encoder") == hub_cache / "image_encoder"
    assert model_part_dir("./tiny-org/tiny-sd", tmp_path) == tmp_path / "tiny-org" / "tiny-sd"  # local, said so
    (tmp_path / "tiny-org" / "tiny-sd").mkdir(parents=True)
    assert model_part_dir("tiny-org/tiny-sd", tmp_path) == tmp_path / "tiny-org" / "tiny-sd"  # a local one wins
    with pytest.raises(ModelError, match="'nobody/none/image_encoder' is not in the Hugging Face cache"):
        model_part_dir("nobody/none/image_encoder")


def test_an_adapter_named_by_hub_id_replaces_the_models_own(hub_cache, tmp_path):
    """`evaluate adapter --adapter org/name`: the snapshot's adapter file is used, and keyed."""
    from pathlib import Path

    from anystory_cli.sd.weights import save_adapter

    repo = hub_cache.parents[2] / "models--tiny-org--tiny-adapter"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    own = load_pipeline("tiny-org/tiny-sd")
    save_adapter(tiny.tiny_adapter(own.base.unet, own.image_encoder, seed=5), snapshot / "anystory_adapter.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    theirs = load_pipeline("tiny-org/tiny-sd", adapter=Path("tiny-org/tiny-adapter"))
    assert theirs.model_id != own.model_id
    weights = {k: v for k, v in theirs.adapter.state_dict().items()}
    assert any((weights[k] != v).any() for k, v in own.adapter.state_dict().items())


def test_a_training_recipe_names_its_base_by_hub_id(hub_cache, tmp_path):
    from anystory_cli.train.loop import load_components, load_recipe

    recipe_file = tmp_path / "recipe.yaml"
    (tmp_path / "data.jsonl").write_text("")
    recipe_file.write_text("kind: adapter\nstage: 1\ndata: data.jsonl\noutput_dir: out\nsteps: 1\n"
                           "pipeline: tiny-org/tiny-sd\nimage_encoder: tiny-org/tiny-sd/image_encoder\n")
    recipe = load_recipe(recipe_file)
    assert str(recipe.data) == str(tmp_path / "data.jsonl")  # local paths stay relative to the recipe
    components = load_components(recipe)
    assert components.pipe.unet.config.cross_attention_dim == 32
    assert components.image_encoder.config.hidden_size == tiny.tiny_image_encoder().config.hidden_size


def test_validate_says_an_uncached_id_cannot_be_fetched_offline_and_accepts_a_cached_one(hub_cache, tmp_path):
    from anystory_cli.render import story_problems

    cached = storykit.write_story(tmp_path / "a", [{"prompt": "mira", "characters": ["mira"]}], model="tiny-org/tiny-sd")
    assert story_problems(cached) == []
    missing = storykit.write_story(tmp_path / "b", [{"prompt": "mira", "characters": ["mira"]}],
                                   model="nobody/no-such-model")
    problems = story_problems(missing)
    assert len(problems) == 1 and "'nobody/no-such-model' is not in the Hugging Face cache" in problems[0]
    assert "HF_HUB_OFFLINE=1" in problems[0]


def test_online_a_pipeline_repository_is_fetched_by_diffusers_and_a_part_alone(hub_cache, monkeypatch, tmp_path):
    """What is downloaded when online (no network here: the two download calls are stood in for).
    A pipeline repository goes through DiffusionPipeline.download, which fetches only what its
    model_index.json names (FLUX.1-dev also holds 30 GB of single-file checkpoints); a named part
    alone through snapshot_download's patterns."""
    import diffusers
    import huggingface_hub

    from anystory_cli.hub import model_part_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    fetched = tmp_path / "fetched"
    (fetched / "image_encoder").mkdir(parents=True)

    def pipeline_download(repo_id, **kwargs):
        calls.append(("pipeline", repo_id, kwargs.get("cache_dir")))
        return str(fetched)

    def snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        calls.append(("snapshot", repo_id, kwargs.get("allow_patterns")))
        return str(fetched)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", staticmethod(pipeline_download))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert model_part_dir("bfl/flux-dev", pipeline=True) == fetched
    assert model_part_dir("h94/ip/image_encoder") == fetched / "image_encoder"
    assert calls == [("pipeline", "bfl/flux-dev", str(hub_cache.parents[2])),
                     ("snapshot", "h94/ip", ["image_encoder", "image_encoder/*"])]
    with pytest.raises(ModelError, match="hub repository 'h94/ip' has no 'missing.bin'"):
        model_part_dir("h94/ip/missing.bin")
