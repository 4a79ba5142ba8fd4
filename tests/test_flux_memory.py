"""The FLUX memory ledger and plan chooser (anystory_cli.flux.memory): parameter counts against the
real models built on the meta device, the chooser against the ledger for the documented card
sizes, and the parsing of memory sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anystory_cli.errors import InputError
from anystory_cli.flux import memory

MODEL = Path(__file__).parent / "data" / "flux_tiny" / "model"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_weights(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_the_ledger_does_not_import_torch():
    code = "import sys; import anystory_cli.flux.memory, anystory_cli.render.memory_plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("config", ["flux1-dev", "tiny"])
def test_transformer_parameters_match_diffusers_flux(config):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    if config == "tiny":
        settings = json.loads((MODEL / "flux" / "transformer" / "config.json").read_text())
        settings = {k: v for k, v in settings.items() if not k.startswith("_")}
    else:
        settings = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with init_empty_weights():
        model = FluxTransformer2DModel(**settings)
    shape = memory.FluxShape.from_config(settings)
    linear, other = shape.transformer_params()
    assert linear == _linear_weights(model)
    assert linear + other == _params(model)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(shape.linears())


def test_other_parts_match_their_real_configurations():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import (CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config,
                              T5EncoderModel)

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768))
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    # T5's token embedding is shared with its encoder (one tensor in the file, one on the device).
    t5_unique = {id(p): p for p in t5.parameters()}
    t5_total = sum(p.numel() for p in t5_unique.values())
    if t5.shared.weight is not t5.encoder.embed_tokens.weight:
        t5_total -= t5.encoder.embed_tokens.weight.numel()
    assert memory.T5_XXL["linear"] == _linear_weights(t5)
    assert memory.T5_XXL["linear"] + memory.T5_XXL["other"] == t5_total
    assert memory.CLIP_L == _params(clip)
    assert memory.SIGLIP_SO400M == _params(siglip)
    assert memory.VAE == {"encoder": _params(vae.encoder), "decoder": _params(vae.decoder)}


def test_anystory_parts_match_the_checkpoint_layout():
    """The tiny fixture's anystory_flux.bin (the released layout, LoRA rank 8): the ledger's LoRA,
    routing-adapter and embedder counts are its tensors' sizes."""
    from anystory_cli.flux.weights import read_checkpoint, split_router

    settings = json.loads((MODEL / "flux" / "transformer" / "config.json").read_text())
    shape = memory.FluxShape.from_config(settings, lora_rank=8, siglip_width=16)
    parts = read_checkpoint(MODEL / "anystory_flux.bin")
    lora, adapters, router_embedder = split_router(parts["router"])
    assert shape.lora_params() == sum(v.numel() for part in (parts["ref"], lora) for v in part.values())
    assert shape.routing_adapter_params() == sum(v.numel() for block in adapters.values() for v in block.values())
    assert shape.embedder_params() == sum(v.numel() for v in parts["redux"].values()) + sum(
        v.numel() for v in router_embedder.values())


def test_flux1_dev_sizes_are_the_published_ones():
    shape = memory.FluxShape()
    linear, other = shape.transformer_params()
    assert (linear + other) * 2 / memory.GiB == pytest.approx(22.17, abs=0.01)
    assert shape.lora_params() * 2 / 1e9 == pytest.approx(1.86, abs=0.01)  # rank 128: "about 1.9 GB"
    assert memory.reference_kv_bytes(shape, 1) / memory.GiB == pytest.approx(0.668, abs=0.001)
    assert memory.reference_kv_bytes(shape, 3) == 3 * memory.reference_kv_bytes(shape, 1)


@pytest.mark.parametrize("gb", memory.TABLE_SIZES_GB)
@pytest.mark.parametrize("size", [512, 1024])
@pytest.mark.parametrize("characters", [1, 2, 3, 4])
def test_the_chooser_takes_the_fastest_plan_that_fits(gb, size, characters):
    shape, load, budget = memory.FluxShape(), memory.Workload(size, characters), gb * memory.GiB
    fits = [p for p in memory.PLANS if memory.peak(shape, p, load) + memory.HEADROOM <= budget]
    if not fits:
        with pytest.raises(memory.DoesNotFit, match=r"the smallest that works is [\d.]+GB") as refused:
            memory.choose_plan(budget, load, shape)
        least = float(str(refused.value).rsplit(" is ", 1)[1].split("GB")[0])
        assert least * memory.GiB > budget
        assert memory.choose_plan(least * memory.GiB, load, shape).plan in memory.PLANS
        return
    choice = memory.choose_plan(budget, load, shape)
    assert choice.plan == fits[0]
    assert choice.peak_bytes == memory.peak(shape, choice.plan, load)
    assert all(p.step_time >= choice.plan.step_time for p in fits)


def test_plans_are_ordered_fastest_first_and_the_ladder_makes_sense():
    times = [p.step_time for p in memory.PLANS]
    assert times == sorted(times)
    shape, load = memory.FluxShape(), memory.Workload(1024, 2)
    peaks = {p.name: memory.peak(shape, p, load) for p in memory.PLANS}
    assert peaks["bf16"] > peaks["bf16-offload"] > peaks["int8-offload"] > peaks["nf4-offload"]
    assert peaks["gguf-q8-offload"] > peaks["gguf-q4-offload"]
    assert peaks["group-offload"] < peaks["nf4-offload"]
    # more characters and larger panels never need less
    for plan in memory.PLANS:
        assert memory.peak(shape, plan, memory.Workload(1024, 3)) >= memory.peak(shape, plan, load)
        assert memory.peak(shape, plan, memory.Workload(1024, 1)) >= memory.peak(shape, plan, memory.Workload(512, 1))
    # an 80 GB card takes everything on the GPU; bf16 with model offload does not fit 24 GB
    assert memory.choose_plan(80 * memory.GiB, load).plan.name == "bf16"
    assert memory.peak(shape, memory.PLAN_NAMES["bf16-offload"], load) > 24 * memory.GiB


@pytest.mark.parametrize("text, gib", [("16GB", 16), ("12GiB", 12), ("24G", 24), ("512MB", 0.5), (" 7.5 gb ", 7.5),
                                       ("1TB", 1024)])
def test_sizes_parse_in_binary_units(text, gib):
    assert memory.parse_size(text) == gib * memory.GiB
    assert memory.parse_memory(text) == gib * memory.GiB


def test_auto_means_ask_the_device():
    assert memory.parse_memory("auto") is None
    assert memory.parse_memory("AUTO") is None


@pytest.mark.parametrize("bad", ["lots", "16", "GB", "-4GB", "0GB", "16 GBs", "", 16, True])
def test_a_non_size_is_one_line_naming_where(bad):
    with pytest.raises(InputError) as raised:
        memory.parse_memory(bad, "model.memory")
    message = str(raised.value)
    assert message.startswith("model.memory: ") and "\n" not in message
