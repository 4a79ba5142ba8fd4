"""The embedded default model is a standard diffusers folder, loaded by the code that loads any
model folder; a folder with a broken tokenizer or a mismatched end-of-text id is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import tiny
from anystory_cli.errors import ModelError
from anystory_cli.model_loading import DEFAULT_MODEL_DIR, PANEL_LORA_FILE, load_base, load_pipeline


def test_the_default_model_loads_with_plain_diffusers_and_transformers():
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open
    from transformers import CLIPVisionModel

    pipe = DiffusionPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), local_files_only=True)
    assert type(pipe) is StableDiffusionPipeline
    # transformers 5 builds a 2-token tokenizer from a missing vocabulary without a word: the
    # saved one has every world word, and end-of-text is the id CLIPTextModel pools at.
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size > 200
    assert pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id == len(pipe.tokenizer) - 1
    assert pipe.tokenizer("two characters on a hill", add_special_tokens=False).input_ids.__len__() == 5
    encoder = CLIPVisionModel.from_pretrained(str(DEFAULT_MODEL_DIR / "image_encoder"), local_files_only=True)
    assert encoder.config.image_size == 64
    for part in ("unet", "vae", "text_encoder", "image_encoder"):  # fp16 on disk
        weights = next((DEFAULT_MODEL_DIR / part).glob("*.safetensors"))
        with safe_open(str(weights), "pt") as handle:
            assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16, part
    # the panel LoRA is a diffusers LoRA file: the standard call lands it on every layer it names
    with safe_open(str(DEFAULT_MODEL_DIR / PANEL_LORA_FILE), "pt") as handle:
        named = {key.rsplit(".lora_", 1)[0] for key in handle.keys()}
    pipe.load_lora_weights(str(DEFAULT_MODEL_DIR), weight_name=PANEL_LORA_FILE, adapter_name="panels")
    landed = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(landed) == len(named) > 50


def test_the_loader_swaps_the_panel_lora_in_for_wide_latents_only():
    base, _ = load_base(DEFAULT_MODEL_DIR)
    plain, _ = load_base(DEFAULT_MODEL_DIR, panel_lora=False)
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for size, same in (((16, 16), True), ((16, 32), False), ((16, 16), True)):
            latents = torch.randn(1, 8, *size, generator=torch.Generator().manual_seed(1))
            drawn = base.unet(latents, 500, context).sample
            assert torch.equal(drawn, plain.unet(latents, 500, context).sample) == same, size


def test_the_panel_weights_are_diffusers_own_lora_merge_and_the_unet_keeps_its_weights():
    base, _ = load_base(DEFAULT_MODEL_DIR)
    plain, _ = load_base(DEFAULT_MODEL_DIR, panel_lora=False)
    assert {n: p.requires_grad for n, p in base.unet.named_parameters()} == \
        {n: p.requires_grad for n, p in plain.unet.named_parameters()}
    fused, _ = load_base(DEFAULT_MODEL_DIR, panel_lora=False)
    fused.load_lora_weights(str(DEFAULT_MODEL_DIR), weight_name=PANEL_LORA_FILE, adapter_name="panels")
    fused.fuse_lora(adapter_names=["panels"])
    context = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for size, like in (((16, 32), fused), ((32, 16), fused), ((16, 16), plain)):
            latents = torch.randn(1, 8, *size, generator=torch.Generator().manual_seed(1))
            assert torch.equal(base.unet(latents, 500, context).sample, like.unet(latents, 500, context).sample), size
    kept = {n: p for n, p in base.unet.named_parameters()}
    assert all(torch.equal(p, kept[n]) for n, p in plain.unet.named_parameters())  # after a square: its own


def test_loading_the_default_model_imports_nothing_of_the_sprite_world():
    code = ("import sys; from anystory_cli.model_loading import load_pipeline; load_pipeline('default'); "
            "import anystory_cli.render; "
            "print(sorted(m for m in sys.modules if m.startswith(('anystory_cli.world', 'anystory_cli.lab'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == "[]"


def _tiny_folder(tmp_path):
    from anystory_cli.sd.weights import save_adapter

    folder = tmp_path / "mine"
    base, encoder = tiny.tiny_sd_pipeline(), tiny.tiny_image_encoder()
    base.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    save_adapter(tiny.tiny_adapter(base.unet, encoder), folder / "anystory_adapter.safetensors")
    return folder


def test_a_folder_whose_tokenizer_files_are_gone_is_refused(tmp_path):
    folder = _tiny_folder(tmp_path)
    assert load_pipeline(str(folder)).base.tokenizer is not None
    for path in (folder / "tokenizer").iterdir():
        if path.name != "tokenizer_config.json":
            path.unlink()
    with pytest.raises(ModelError, match=r"tokenizer") as error:
        load_pipeline(str(folder))
    assert "\n" not in str(error.value)


def test_a_text_encoder_that_pools_at_another_id_than_the_tokenizer_s_end_is_refused(tmp_path):
    folder = _tiny_folder(tmp_path)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = config["eos_token_id"] - 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="end-of-text id"):
        load_pipeline(str(folder))


def test_a_missing_part_of_the_default_model_says_it_is_not_complete(tmp_path, monkeypatch):
    from anystory_cli import model_loading

    copy = tmp_path / "default"
    shutil.copytree(DEFAULT_MODEL_DIR, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "model_index.json").unlink()
    monkeypatch.setattr(model_loading, "DEFAULT_MODEL_DIR", copy)
    with pytest.raises(ModelError, match="the embedded default model is not complete.*model_index.json"):
        load_pipeline("default")
