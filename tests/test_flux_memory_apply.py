"""Memory plans put into effect on diffusers' FluxPipeline (anystory_cli.flux.memory_apply), on the
tiny FLUX fixture on a CPU: torchao int8 weight-only through diffusers' quantization config, a GGUF
transformer written with the gguf package, and the one-line refusals."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from anystory_cli.errors import InputError
from anystory_cli.flux import memory
from anystory_cli.flux import memory_apply

FLUX = Path(__file__).parent / "data" / "flux_tiny" / "model" / "flux"
Q = memory.QUANTIZATIONS
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="latent", max_sequence_length=32)


def resident(transformer: memory.Quantization, offload: str = "none", tiling: bool = False) -> memory.Plan:
    return memory.Plan(f"test-{transformer.name}", transformer, Q["bf16"], offload, 1.0, vae_tiling=tiling)


def latents(pipe) -> torch.Tensor:
    return pipe("a red ball in a park", generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.fixture(scope="module")
def plain_latents():
    from diffusers import FluxPipeline
    return latents(FluxPipeline.from_pretrained(str(FLUX), dtype=torch.float32))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_weight_only_quantizes_the_transformer_and_stays_close(plain_latents):
    pytest.importorskip("torchao")
    pipe = memory_apply.load_flux_pipeline(FLUX, resident(Q["int8"]), dtype=torch.float32)
    kinds = {type(m.weight).__name__ for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Int8Tensor"}
    assert all(type(p) is torch.nn.Parameter for p in pipe.text_encoder_2.parameters())  # T5 kept as it was
    error = relative_error(latents(pipe), plain_latents)
    assert 0 < error < 0.02


def write_gguf(path: Path) -> None:
    from anystory_cli.testing import write_gguf_transformer
    write_gguf_transformer(FLUX, path)


def test_a_gguf_transformer_loads_quantized_and_draws_close(tmp_path, plain_latents):
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = tmp_path / "flux-tiny-Q8_0.gguf"
    write_gguf(path)
    transformer = memory_apply.load_gguf_transformer(path, FLUX, dtype=torch.float32)
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.weight, GGUFParameter)
    pipe = memory_apply.load_flux_pipeline(FLUX, resident(Q["gguf-q8"]), dtype=torch.float32,
                                           transformer=transformer)
    error = relative_error(latents(pipe), plain_latents)
    assert 0 < error < 0.02


def test_a_truncated_or_foreign_gguf_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "flux.gguf"
    write_gguf(path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("not a model")
    for bad in (truncated, foreign, tmp_path / "missing.gguf"):
        with pytest.raises(InputError) as raised:
            memory_apply.load_gguf_transformer(bad, FLUX)
        assert str(raised.value).startswith(str(bad)) and "\n" not in str(raised.value)


def test_a_gguf_plan_needs_its_file():
    with pytest.raises(InputError, match="GGUF transformer file"):
        memory_apply.load_flux_pipeline(FLUX, resident(Q["gguf-q4"]))


def test_a_missing_backend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(InputError) as raised:
        memory_apply.transformer_quantization_config(Q["int8"])
    assert 'pip install "anystory-cli[quant]"' in str(raised.value) and "torchao" in str(raised.value)


def test_bitsandbytes_without_cuda_is_one_line(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    for quantization in (Q["nf4"], Q["bnb-int8"]):
        with pytest.raises(InputError, match="needs a CUDA GPU") as raised:
            memory_apply.check_backend(quantization)
        assert "\n" not in str(raised.value)


def test_offload_plans_need_cuda_and_tiling_is_turned_on():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(FLUX), dtype=torch.float32)
    if not torch.cuda.is_available():
        for offload in ("model", "group", "sequential"):
            with pytest.raises(InputError, match="no CUDA device"):
                memory_apply.apply_plan(pipe, resident(Q["bf16"], offload), device="cpu")
    assert not pipe.vae.use_tiling
    memory_apply.apply_plan(pipe, resident(Q["bf16"], tiling=True), device="cpu")
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == memory.VAE_TILE


def test_a_plan_loads_the_anystory_pipeline_quantized_with_its_loras_landed():
    """The plan's quantization config through AnyStoryFluxPipeline.from_pretrained: the transformer is
    int8, the reference and router LoRAs land on it as on the full model, and apply_plan places it."""
    pytest.importorskip("torchao")
    from anystory_cli.flux import AnyStoryFluxPipeline

    model = FLUX.parent
    plan = memory.Plan("int8", Q["int8"], Q["bf16"], "none", 1.0)
    kwargs = dict(redux=model / "redux", adapter=model / "anystory_flux.bin", reference_size=64, device="cpu",
                  torch_dtype=torch.float32)
    quantized = AnyStoryFluxPipeline.from_pretrained(
        model / "flux", quantization_config=memory_apply.pipeline_quantization_config(plan), **kwargs)
    full = AnyStoryFluxPipeline.from_pretrained(model / "flux", **kwargs)
    assert memory_apply.apply_plan(quantized, plan, device="cpu") is quantized
    base = quantized.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert type(base).__name__ == "Int8Tensor"
    assert quantized.lora_layers == full.lora_layers and all(full.lora_layers.values())
