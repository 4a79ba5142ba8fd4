"""A story drawn with the FLUX model end to end through `anystory render`: a `model:` mapping,
characters from a mask file, an alpha channel and a description, routing maps saved."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import storykit
import yaml
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli

MODEL = Path(__file__).parent / "data" / "flux_tiny" / "model"
SUBJECTS = Path(__file__).parent / "data" / "flux_tiny" / "subjects"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


def write_story(folder: Path, **style) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.open(SUBJECTS / "red.png").save(folder / "red.png")
    Image.open(SUBJECTS / "red_mask.png").save(folder / "red_mask.png")
    blue = Image.open(SUBJECTS / "blue.png").convert("RGBA")
    blue.putalpha(Image.open(SUBJECTS / "blue_mask.png"))
    blue.save(folder / "blue.png")
    story = {
        "title": "Balls", "seed": 3,
        "model": {"base": str(MODEL / "flux"), "redux": str(MODEL / "redux"), "adapter": str(MODEL / "anystory_flux.bin")},
        "style": {"steps": 2, "resolution": 64, **style},
        "page": dict(storykit.PAGE),
        "characters": {"red": {"image": "red.png", "mask": "red_mask.png"}, "blue": {"image": "blue.png"},
                       "green": {"description": "a green ball"}},
        "panels": [
            {"prompt": "red and blue play", "characters": ["red", "blue"], "dialogue": [{"who": "red", "text": "Hi!"}]},
            {"prompt": "red alone", "characters": ["red"]},
            {"prompt": "green and red", "characters": ["green", "red"], "span": "wide"},
        ],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def test_a_flux_story_renders_with_each_character_encoded_once(tmp_path, monkeypatch):
    from anystory_cli.flux import AnyStoryFluxPipeline

    encoded = Counter()
    encode = AnyStoryFluxPipeline.encode_character

    def counting(self, image, mask=None, generator=None, name=""):
        encoded[name] += 1
        return encode(self, image, mask=mask, generator=generator, name=name)

    monkeypatch.setattr(AnyStoryFluxPipeline, "encode_character", counting)
    story = write_story(tmp_path / "story")
    out = tmp_path / "out"
    args = ["render", str(story), "--out", str(out), "--save-routing", "--cache", str(tmp_path / "cache"), "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    assert encoded == {"red": 1, "blue": 1, "green": 1}
    summary = json.loads(result.stdout)["stories"][0]
    assert sorted(summary["characters_encoded"]) == ["blue", "green", "red"]
    assert sorted(p.name for p in (out / "pages").glob("page-*.png")) == ["page-001.png", "page-002.png"]
    assert (out / "characters" / "green.png").is_file()  # the sheet FLUX drew for the description
    panel = Image.open(out / "panels" / "panel-001.png")
    assert max(panel.size) == 64
    maps = np.load(out / "panels" / "panel-001-routing.npy")
    assert maps.shape[0] == 3  # red, blue, background
    assert np.allclose(maps[:2].sum(axis=0), 1.0, atol=0.02)  # the router sends each pixel somewhere

    # Again: nothing is drawn or encoded, the encodings come from the cache.
    encoded.clear()
    again = CliRunner().invoke(cli.app, args)
    assert again.exit_code == 0, again.stderr
    assert not encoded and json.loads(again.stdout)["stories"][0]["panels_rendered"] == []


def test_a_flux_story_with_a_missing_redux_folder_fails_in_one_line(tmp_path):
    story = write_story(tmp_path / "story")
    data = yaml.safe_load(story.read_text())
    data["model"]["redux"] = str(tmp_path / "FLUX.1-Redux-dev")
    story.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli.app, ["render", str(story), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLUX.1-Redux-dev" in lines[0] and "not found" in lines[0]


def test_style_resolution_sets_the_long_side_on_every_model():
    from types import SimpleNamespace

    from anystory_cli.flux.comic import FluxComicPipeline
    from anystory_cli.render.model import image_size as _image_size

    flux = FluxComicPipeline.__new__(FluxComicPipeline)
    assert _image_size(flux, (1.0, 1.0)) == (512, 512)  # the released app's size
    assert _image_size(flux, (1.5, 1.0), 768) == (768, 512)
    assert _image_size(flux, (1.0, 2.0), 300) == (144, 304)  # FLUX's 16-pixel grid
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=64, block_out_channels=(32, 64)))
    sd = SimpleNamespace(vae_scale_factor=8, unet=unet)  # a UNet pipeline: its own parts
    assert _image_size(sd, (1.5, 1.0)) == (768, 512)  # the model's own size times the shape
    assert _image_size(sd, (1.5, 1.0), 384) == (384, 256)


def test_validate_names_a_missing_flux_adapter(tmp_path):
    story = write_story(tmp_path / "story")
    data = yaml.safe_load(story.read_text())
    data["model"]["adapter"] = "missing.bin"
    story.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli.app, ["validate", str(story)])
    assert result.exit_code == 1
    assert "missing.bin: AnyStory adapter not found" in result.stderr


@pytest.fixture
def flux_hub(tmp_path, monkeypatch):
    """The fixture's three parts in a Hugging Face cache, as the hub lays it out, offline."""
    import shutil

    cache = tmp_path / "hub"
    revision = "0" * 40
    for repo, source in (("bfl--flux", MODEL / "flux"), ("bfl--redux", MODEL / "redux"),
                         ("someone--anystory", None)):
        snapshot = cache / f"models--{repo}" / "snapshots" / revision
        if source is None:
            snapshot.mkdir(parents=True)
            shutil.copy(MODEL / "anystory_flux.bin", snapshot / "anystory_flux.bin")
        else:
            shutil.copytree(source, snapshot)
        (cache / f"models--{repo}" / "refs").mkdir()
        (cache / f"models--{repo}" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"base": "bfl/flux", "redux": "bfl/redux", "adapter": "someone/anystory/anystory_flux.bin"}


def test_flux_parts_named_by_hub_id_load_from_the_cache_and_key_as_the_folders_do(flux_hub, tmp_path):
    from types import SimpleNamespace

    from anystory_cli.flux import AnyStoryFluxPipeline
    from anystory_cli.model_loading import model_fingerprint
    from anystory_cli.render import story_problems

    folders = SimpleNamespace(base=str(MODEL / "flux"), redux=str(MODEL / "redux"),
                              adapter=str(MODEL / "anystory_flux.bin"))
    assert model_fingerprint(SimpleNamespace(**flux_hub)) == model_fingerprint(folders)
    pipe = AnyStoryFluxPipeline.from_pretrained(flux_hub["base"], redux=flux_hub["redux"],
                                                adapter=flux_hub["adapter"], device="cpu")
    assert pipe.transformer is not None
    story = write_story(tmp_path / "story")
    data = yaml.safe_load(story.read_text())
    data["model"] = dict(flux_hub)
    story.write_text(yaml.safe_dump(data))
    assert story_problems(story) == []
    data["model"]["redux"] = "bfl/not-cached"
    story.write_text(yaml.safe_dump(data))
    problems = story_problems(story)
    assert len(problems) == 1 and "'bfl/not-cached' is not in the Hugging Face cache" in problems[0]


def test_offload_puts_every_flux_part_behind_a_hook_the_siglip_encoder_too():
    """What `--offload` asks for (diffusers' model CPU offload), placed on the CPU here: the hooks
    are the ones a GPU run uses."""
    from types import SimpleNamespace

    from anystory_cli.devices import Runtime
    from anystory_cli.model_loading import load_pipeline

    model = SimpleNamespace(base=str(MODEL / "flux"), redux=str(MODEL / "redux"),
                            adapter=str(MODEL / "anystory_flux.bin"))
    comic = load_pipeline(model, runtime=Runtime("cpu", "float32", offload=True))
    pipe = comic.pipe
    hooked = {name for name, part in pipe.components.items() if hasattr(part, "_hf_hook")}
    modules = {name for name, part in pipe.components.items() if hasattr(part, "parameters")}
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "redux_image_encoder", "subject_embedder",
            "router_embedder"} <= hooked
    assert modules - hooked == set(pipe._exclude_from_cpu_offload) == {"anystory_adapter"}
    pipe.remove_all_hooks()
