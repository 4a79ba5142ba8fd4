"""Every way to name a model, on every command: the built-in `anystory-flux`, a model file, an
inline mapping, a saved FLUX pipeline folder; and the encoding cache that `encode-character` and
`render` share, on the tiny FLUX fixture (offline: the released model's hub ids are laid out in a
temporary Hugging Face cache)."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import storykit
import yaml
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli
from anystory_cli.hub import PUBLISHED_MODELS

MODEL = storykit.FLUX_MODEL
SUBJECTS = storykit.FLUX_FIXTURE / "subjects"
PARTS = {"base": MODEL / "flux", "redux": MODEL / "redux", "adapter": MODEL / "anystory_flux.bin"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def released_in_cache(hub_cache):
    """The tiny FLUX fixture in the cache under the released model's own hub ids."""
    revision = "0" * 40
    for field, hub_name in PUBLISHED_MODELS["anystory-flux"].parts.items():
        org, name, *inside = hub_name.split("/")
        repo = hub_cache / f"models--{org}--{name}"
        snapshot = repo / "snapshots" / revision
        if inside:
            snapshot.mkdir(parents=True)
            shutil.copy(PARTS[field], snapshot / "/".join(inside))
        else:
            shutil.copytree(PARTS[field], snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    return hub_cache


@pytest.fixture
def encodings(monkeypatch):
    """Counts the FLUX pipeline's character encodings, by name."""
    from anystory_cli.flux import AnyStoryFluxPipeline

    counted = Counter()
    encode = AnyStoryFluxPipeline.encode_character

    def counting(self, image, mask=None, generator=None, name=""):
        counted[name] += 1
        return encode(self, image, mask=mask, generator=generator, name=name)

    monkeypatch.setattr(AnyStoryFluxPipeline, "encode_character", counting)
    return counted


def model_file(folder: Path, name: str = "flux.yaml", **change) -> Path:
    """A model file naming the fixture's parts by paths relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {field: _relative(path, folder) for field, path in PARTS.items()}
    data.update(change)
    path = folder / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def _relative(path: Path, folder: Path) -> str:
    import os

    return os.path.relpath(path, folder)


def write_story(folder: Path, model, **style) -> Path:
    """One character from an image and a mask, two panels: drawn small and in two steps."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("red.png", "red_mask.png"):
        shutil.copy(SUBJECTS / name, folder / name)
    story = {"title": "Ball", "seed": 3, "style": {"steps": 2, "resolution": 64, **style},
             "page": dict(storykit.PAGE), "characters": {"red": {"image": "red.png", "mask": "red_mask.png"}},
             "panels": [{"prompt": "red alone", "characters": ["red"]}, {"prompt": "red again", "characters": ["red"]}]}
    if model is not None:
        story["model"] = model
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ---- the names ------------------------------------------------------------------------------


def test_models_lists_the_built_in_names_with_their_needs_and_whether_they_are_cached(hub_cache):
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.stderr
    listed = {entry["name"]: entry for entry in json.loads(result.stdout)["models"]}
    assert list(listed) == ["default", "anystory-flux"]
    flux = listed["anystory-flux"]
    assert flux["parts"] == {"base": "black-forest-labs/FLUX.1-dev", "redux": "black-forest-labs/FLUX.1-Redux-dev",
                             "adapter": "Junjie96/AnyStory/anystory_flux.bin"}
    assert flux["available"] is False and flux["missing"] == ["base", "redux", "adapter"]
    assert flux["defaults"] == {"steps": 28, "guidance": 3.5}
    assert listed["default"]["defaults"] == {"paste_references_at": 0.4}
    assert 30 < flux["memory_gib"] < 40 and 30 < flux["disk_gb"] < 45
    assert listed["default"]["available"] and 0 < listed["default"]["disk_gb"] < 1
    assert list(hub_cache.iterdir()) == []  # looked up, nothing fetched

    text = invoke("models")
    assert text.exit_code == 0 and "anystory-flux: the released AnyStory weights" in text.stdout
    assert "not cached: base, redux, adapter" in text.stdout


def test_models_says_when_the_released_model_is_in_the_cache(released_in_cache):
    listed = {e["name"]: e for e in json.loads(invoke("models", "--json").stdout)["models"]}
    assert listed["anystory-flux"]["available"] and listed["anystory-flux"]["here"] == "in the Hugging Face cache"
    shutil.rmtree(released_in_cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / ("0" * 40) / "vae")
    listed = {e["name"]: e for e in json.loads(invoke("models", "--json").stdout)["models"]}
    assert listed["anystory-flux"]["missing"] == ["base"]  # a pipeline folder without a part it names


def test_the_schema_lists_the_built_in_names():
    schema = json.loads(invoke("schema").stdout)
    choices = schema["properties"]["model"]["anyOf"]
    assert {"enum": ["default", "anystory-flux"], "type": "string"} in choices
    assert {"$ref": "#/$defs/FluxModel"} in choices


def test_a_story_keeps_a_built_in_name_and_takes_the_released_sampling_where_it_sets_none(tmp_path):
    from anystory_cli.model_loading import model_defaults
    from anystory_cli.plan import build_plan
    from anystory_cli.story import load_story

    story = load_story(write_story(tmp_path / "a", "anystory-flux"))
    assert story.model == "anystory-flux"
    unset = story.model_copy(update={"style": type(story.style)()})  # a style that sets nothing
    plan = build_plan(unset.with_model_defaults(model_defaults("anystory-flux")))[0]
    assert (plan.num_inference_steps, plan.guidance_scale) == (28, 3.5)  # the released code's
    own = build_plan(story.with_model_defaults(model_defaults("anystory-flux")))[0]
    assert (own.num_inference_steps, own.guidance_scale) == (2, 3.5)  # the story's own steps win
    mapping = {field: str(path) for field, path in PARTS.items()}
    assert model_defaults(load_story(write_story(tmp_path / "c", mapping)).model) == {"steps": 28, "guidance": 3.5}
    plain = load_story(write_story(tmp_path / "d", None))
    plain = plain.model_copy(update={"style": type(plain.style)()})
    plan = build_plan(plain.with_model_defaults(model_defaults("default")))[0]
    assert (plan.num_inference_steps, plan.guidance_scale) == (25, 7.5)


# ---- the shared cache -----------------------------------------------------------------------


def test_a_character_encoded_with_a_model_file_is_not_encoded_again_by_a_render_of_the_released_name(
        released_in_cache, encodings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_file(tmp_path / "models")
    story = write_story(tmp_path / "story", "anystory-flux")
    cache = tmp_path / "cache"
    encoded = invoke("encode-character", story.parent / "red.png", "--mask", story.parent / "red_mask.png",
                     "--name", "red", "--model", "models/flux.yaml", "--cache", cache, "--json")
    assert encoded.exit_code == 0, encoded.stderr
    summary = json.loads(encoded.stdout)
    assert summary["state"] == "encoded" and summary["model_id"].startswith("flux-")
    assert Image.open(tmp_path / "red-card.png").size[0] > 256 and encodings == {"red": 1}

    # the same parts named inline are the same model: already cached
    inline = "{" + ", ".join(f"{field}: {path}" for field, path in PARTS.items()) + "}"
    again = invoke("encode-character", story.parent / "red.png", "--mask", story.parent / "red_mask.png",
                   "--name", "red", "--model", inline, "--cache", cache, "--json", "--card", "again.png")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["state"] == "already cached" and encodings == {"red": 1}

    encodings.clear()
    rendered = invoke("render", story, "--out", tmp_path / "out", "--cache", cache, "--json")
    assert rendered.exit_code == 0, rendered.stderr
    drawn = json.loads(rendered.stdout)["stories"][0]
    assert not encodings and drawn["characters_encoded"] == [] and drawn["cache_hits"] == 1
    assert drawn["panels_rendered"] == [1, 2]
    assert max(Image.open(tmp_path / "out" / "panels" / "panel-001.png").size) == 64  # FLUX at the story's size


def test_render_and_validate_take_a_model_file_instead_of_the_story_model(hub_cache, encodings, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_file(tmp_path, "flux.json")
    story = write_story(tmp_path / "story", None)  # the embedded default model
    assert invoke("validate", story, "--model", "flux.json").exit_code == 0
    rendered = invoke("render", story, "--model", "flux.json", "--out", tmp_path / "out",
                      "--cache", tmp_path / "cache", "--json")
    assert rendered.exit_code == 0, rendered.stderr
    assert encodings == {"red": 1}  # drawn by FLUX, not by the default model
    # A story whose model: is that file draws the same panels: nothing to do.
    named = write_story(tmp_path / "named", "../flux.json")
    shutil.copytree(tmp_path / "out", tmp_path / "named-out")
    again = invoke("render", named, "--out", tmp_path / "named-out", "--cache", tmp_path / "cache", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["stories"][0]["panels_rendered"] == []


def test_validate_checks_the_released_name_against_the_cache_without_downloading(hub_cache, tmp_path):
    story = write_story(tmp_path, "anystory-flux")
    line = one_error_line(invoke("validate", story))
    assert "story.yaml: model: anystory-flux: base: model 'black-forest-labs/FLUX.1-dev' is not in the " \
           "Hugging Face cache" in line
    assert list(hub_cache.iterdir()) == []


def test_validate_passes_the_released_name_once_it_is_cached(released_in_cache, tmp_path):
    assert invoke("validate", write_story(tmp_path, "anystory-flux")).exit_code == 0


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["render", "validate", "encode-character"])
def test_an_unknown_built_in_name_is_one_line_listing_the_known_ones(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    story = write_story(tmp_path, None)
    args = {"render": ["render", story, "--out", tmp_path / "out"], "validate": ["validate", story],
            "encode-character": ["encode-character", story.parent / "red.png", "--name", "red"]}[command]
    line = one_error_line(invoke(*args, "--model", "anystory-fluxx"))
    assert "unknown model 'anystory-fluxx': the built-in models are default, anystory-flux" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "red-card.png").exists()


def test_an_unknown_name_in_a_story_is_one_line_naming_the_field(tmp_path):
    line = one_error_line(invoke("validate", write_story(tmp_path, "anystory-fluxx")))
    assert "story.yaml: model: unknown model 'anystory-fluxx': the built-in models are default, anystory-flux" in line


BAD_MODEL_FILES = {
    "not a mapping": ("- a\n- b\n", "expected a mapping {base, redux, adapter}, got list"),
    "an unknown key": (None, "unknown key 'extra' (expected base, redux, adapter"),
    "a missing part": (None, "redux: "),
    "a part left out": (None, "adapter: required but missing"),
    "not YAML": ("base: [\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
@pytest.mark.parametrize("command", ["render", "validate", "encode-character", "story"])
def test_a_bad_model_file_is_one_line_naming_the_file_and_field(case, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, expected = BAD_MODEL_FILES[case]
    models = tmp_path / "models"
    if text is not None:
        models.mkdir()
        (models / "bad.yaml").write_text(text)
    elif case == "an unknown key":
        model_file(models, "bad.yaml", extra="x")
    elif case == "a missing part":
        model_file(models, "bad.yaml", redux="no-such-redux")
    else:
        model_file(models, "bad.yaml")
        (models / "bad.yaml").write_text("\n".join(line for line in (models / "bad.yaml").read_text().splitlines()
                                                   if not line.startswith("adapter")))
    story = write_story(tmp_path / "story", "../models/bad.yaml" if command == "story" else None)
    args = {"render": ["render", story, "--out", tmp_path / "out", "--model", "models/bad.yaml"],
            "validate": ["validate", story, "--model", "models/bad.yaml"],
            "encode-character": ["encode-character", story.parent / "red.png", "--mask", story.parent / "red_mask.png",
                                 "--name", "red", "--model", "models/bad.yaml"],
            "story": ["render", story, "--out", tmp_path / "out"]}[command]
    line = one_error_line(invoke(*args))
    assert f"model file {models / 'bad.yaml'}: " in line and expected in line
    if case == "a missing part":
        assert "no-such-redux: FLUX.1-Redux folder not found" in line
    assert not (tmp_path / "out").exists()


def test_a_missing_model_file_and_a_bad_inline_mapping_are_one_line_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    story = write_story(tmp_path, None)
    line = one_error_line(invoke("validate", story, "--model", "nope.yaml"))
    assert f"model file {tmp_path / 'nope.yaml'} not found" in line
    line = one_error_line(invoke("validate", story, "--model", "{base: a, redux: b, adaptor: c}"))
    assert "--model {base: a, redux: b, adaptor: c}: unknown key 'adaptor' (did you mean 'adapter'?)" in line


def test_evaluate_adapter_refuses_a_flux_model_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_file(tmp_path)
    line = one_error_line(invoke("evaluate", "adapter", "--model", "flux.yaml", "--panels-per-count", "1"))
    assert "--model flux.yaml: a FLUX model; `evaluate adapter` grades UNet AnyStory models" in line
    line = one_error_line(invoke("evaluate", "adapter", "--model", "anystory-flux"))
    assert "a FLUX model" in line


# ---- a saved FLUX pipeline folder ----------------------------------------------------------------


def test_a_saved_flux_pipeline_folder_is_a_model_by_path_and_by_hub_id(hub_cache, encodings, tmp_path):
    from anystory_cli.model_loading import SavedFluxFolder, check_model, is_flux, model_fingerprint, model_source

    saved = tmp_path / "saved"
    storykit.tiny_flux_pipeline().save_pretrained(saved)
    assert model_source(str(saved)) == SavedFluxFolder(saved) and is_flux(str(saved))
    check_model(str(saved))  # not asked for a UNet folder's image_encoder/ and adapter
    snapshot = hub_cache / "models--someone--saved" / "snapshots" / ("0" * 40)
    shutil.copytree(saved, snapshot)
    (hub_cache / "models--someone--saved" / "refs").mkdir()
    (hub_cache / "models--someone--saved" / "refs" / "main").write_text("0" * 40)
    assert model_source("someone/saved") == SavedFluxFolder(snapshot)
    assert model_fingerprint("someone/saved") == model_fingerprint(str(saved))

    story = write_story(tmp_path / "story", "someone/saved")
    assert invoke("validate", story).exit_code == 0
    result = invoke("render", story, "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.stderr
    assert encodings == {"red": 1} and json.loads(result.stdout)["stories"][0]["panels_rendered"] == [1, 2]
    # The same folder by path: the same model, nothing to draw or encode.
    encodings.clear()
    again = invoke("render", story, "--model", saved, "--out", tmp_path / "out", "--cache", tmp_path / "cache",
                   "--json")
    assert again.exit_code == 0, again.stderr
    assert not encodings


def test_a_model_no_file_can_be_named_by_is_one_line_saying_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    story = write_story(tmp_path, None)
    long_name = "b" * 300
    line = one_error_line(invoke("validate", story, "--model", long_name))
    assert line.endswith("a file or folder name of 300 bytes ('bbbbbbbbbbbbbbbbbbbb'...); at most 255")
    model_file(tmp_path, "long.yaml", redux=long_name)
    line = one_error_line(invoke("render", story, "--model", "long.yaml", "--out", tmp_path / "out"))
    assert f"model file {tmp_path / 'long.yaml'}: redux: a file or folder name of 300 bytes" in line
    line = one_error_line(invoke("validate", story, "--model", "{base: a, redux: \"b\\x01\", adapter: c}"))
    assert "redux: control character U+0001" in line


def test_a_memory_plan_is_made_for_the_released_name_and_a_model_file(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_file(tmp_path)
    for story in (write_story(tmp_path / "a", "anystory-flux"), write_story(tmp_path / "b", "../flux.yaml")):
        result = invoke("render", story, "--dry-run", "--memory", "16GB", "--json")
        assert result.exit_code == 0, result.stderr
        plan = json.loads(result.stdout)["stories"][0]["memory_plan"]
        assert plan["plan"] and plan["estimated_peak_gib"] <= 16
    assert list(hub_cache.iterdir()) == []


def test_a_model_file_may_say_how_much_memory_to_plan_for(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_file(tmp_path, memory="16GB")
    result = invoke("render", write_story(tmp_path / "s", "../flux.yaml"), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stories"][0]["memory_plan"]["estimated_peak_gib"] <= 16
