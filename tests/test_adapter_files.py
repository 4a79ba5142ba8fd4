"""An AnyStory adapter is a diffusers model (ModelMixin/ConfigMixin): a standard folder written by
`save_pretrained`, or the single safetensors file with its config in the metadata that
`anystory train` writes; both load, and draw the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny
from anystory_cli.errors import ModelError
from anystory_cli.model_loading import DEFAULT_MODEL_DIR, load_pipeline
from anystory_cli.sd.adapter import AnyStoryAdapter, AnyStoryConfig
from anystory_cli.sd.pipeline import AnyStoryPipeline
from anystory_cli.sd.weights import load_adapter, save_adapter


@pytest.fixture(scope="module")
def parts():
    base, encoder = tiny.tiny_sd_pipeline(), tiny.tiny_image_encoder()
    return base, encoder, tiny.tiny_adapter(base.unet, encoder, seed=3)


def _same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _draw(base, encoder, adapter):
    pipe = AnyStoryPipeline.from_pipe(base, encoder, adapter)
    character = pipe.encode_character(tiny.sprite(), name="mira")
    return pipe("mira on grass", characters=[character], num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_save_pretrained_writes_a_diffusers_folder_that_draws_what_the_file_draws(parts, tmp_path):
    base, encoder, adapter = parts
    adapter.save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["_class_name"] == "AnyStoryAdapter" and config["num_subject_tokens"] == 4
    assert "reference_net" not in config  # a module, not a setting
    loaded = AnyStoryAdapter.from_pretrained(tmp_path / "folder")
    assert loaded.spec == adapter.spec
    assert {k: v for k, v in loaded.config.items() if not k.startswith('_')} == \
        {k: v for k, v in adapter.config.items() if not k.startswith('_')}
    assert _same_weights(loaded, adapter) and loaded.fingerprint() == adapter.fingerprint()
    save_adapter(adapter, tmp_path / "adapter.safetensors")
    from_file = load_adapter(tmp_path / "adapter.safetensors")
    assert np.array_equal(_draw(base, encoder, from_file), _draw(base, encoder, load_adapter(tmp_path / "folder")))


def test_save_adapter_to_a_folder_path_writes_the_folder_in_the_asked_precision(parts, tmp_path):
    _, _, adapter = parts
    save_adapter(adapter, tmp_path / "half", dtype=torch.float16)
    loaded = load_adapter(tmp_path / "half")  # loaded as float32 by default
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    assert all(torch.equal(v, adapter.state_dict()[k].half().float()) for k, v in loaded.state_dict().items())
    with pytest.raises(ModelError, match="not an adapter folder"):
        load_adapter(tmp_path)


def test_a_file_in_the_single_file_format_loads(parts, tmp_path):
    """The format `anystory train` writes: weights, metadata {format, config}; written here
    without the newer router-context fields, as older adapters (the shipped one too) were."""
    _, _, adapter = parts
    config = adapter.spec.to_dict()
    for key in ("router_context_layers", "router_context_dim"):
        config.pop(key)
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path),
              metadata={"format": "anystory-adapter/1", "config": json.dumps(config, sort_keys=True)})
    loaded = load_adapter(path)
    assert _same_weights(loaded, adapter) and loaded.spec.router_context_layers == 0
    again = load_adapter(save_adapter(loaded, tmp_path / "again.safetensors"))  # written in the same format
    assert _same_weights(again, adapter) and again.spec == adapter.spec


def test_the_shipped_default_adapter_file_loads_and_round_trips_through_a_folder(tmp_path):
    shipped = load_adapter(DEFAULT_MODEL_DIR / "anystory_adapter.safetensors")
    shipped.save_pretrained(tmp_path / "adapter")
    again = AnyStoryAdapter.from_pretrained(tmp_path / "adapter")
    assert _same_weights(again, shipped) and again.fingerprint() == shipped.fingerprint()
    assert isinstance(again.spec, AnyStoryConfig) and again.spec.max_characters == shipped.config.max_characters


def test_a_model_folder_may_hold_its_adapter_as_a_folder(parts, tmp_path):
    base, encoder, adapter = parts
    folder = tmp_path / "mine"
    base.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    adapter.save_pretrained(folder / "anystory_adapter")
    pipe = load_pipeline(str(folder))
    assert _same_weights(pipe.adapter, adapter)
    save_adapter(adapter, tmp_path / "elsewhere")  # --adapter FOLDER in place of the model's own
    assert _same_weights(load_pipeline(str(folder), adapter=tmp_path / "elsewhere").adapter, adapter)
