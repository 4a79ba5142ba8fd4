"""AnyStoryFluxPipeline as a diffusers pipeline, on the tiny FLUX fixture: its parts are
registered components (save/load, from_pipe, offloading), per-call state lives for one call, and
the calls people make of FluxPipeline work the same way here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import storykit
import torch

FIXTURE = storykit.FLUX_FIXTURE
MODEL = storykit.FLUX_MODEL
CASES = storykit.flux_cases()
SIZE = CASES["reference_size"]
DRAW = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "latent"}
PARTS = ["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer",
         "redux_image_encoder", "redux_feature_extractor", "subject_embedder", "router_embedder", "anystory_adapter"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def pipe():
    return storykit.tiny_flux_pipeline()


subject = storykit.flux_subject


def characters(pipe, names=("red", "blue")):
    g = torch.Generator().manual_seed(0)
    return [pipe.encode_character(*subject(n), generator=g) for n in names]


def draw(pipe, cast=None, seed: int = 0, **kwargs):
    cast = characters(pipe) if cast is None else cast
    options = {**DRAW, **kwargs}
    return pipe("two balls", characters=cast, generator=torch.Generator().manual_seed(seed), **options).images


def plain_flux():
    from diffusers import FluxPipeline
    flux = FluxPipeline.from_pretrained(str(MODEL / "flux"))
    flux.set_progress_bar_config(disable=True)
    return flux


def plain_draw(flux):
    return flux("a ball", generator=torch.Generator().manual_seed(3), **DRAW).images


class Calls:
    """Records what each transformer call receives (a test's forward pre-hook, removed after)."""

    def __init__(self, transformer):
        self.seen = []
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        state = (kwargs.get("joint_attention_kwargs") or {}).get("anystory")
        self.seen.append({"text": kwargs["encoder_hidden_states"].shape[1], "state": state,
                          "subjects": 0 if state is None else state.subject_len,
                          "reference": state is not None and state.reference is not None,
                          "router": state is not None and state.begin_router is not None})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------- components
def test_every_part_is_a_registered_component(pipe):
    from diffusers import DiffusionPipeline, FluxPipeline
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe, DiffusionPipeline)
    components = pipe.components
    assert set(PARTS) <= set(components)
    assert all(components[name] is not None for name in PARTS)
    modules = {n for n, m in components.items() if isinstance(m, torch.nn.Module)}
    offloaded = set(pipe.model_cpu_offload_seq.split("->")) | set(pipe._exclude_from_cpu_offload)
    assert modules <= offloaded  # every module has a place in diffusers' offload plan
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_save_and_load_back_draws_the_same_latents(pipe, tmp_path):
    from safetensors.torch import load_file

    from anystory_cli.flux import AnyStoryFluxPipeline
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "AnyStoryFluxPipeline" and index["reference_size"] == SIZE
    assert index["anystory_adapter"] == ["anystory_cli.flux.adapter", "AnyStoryFluxAdapter"]
    assert index["subject_embedder"] == ["anystory_cli.flux.embedders", "SubjectEmbedder"]
    # The transformer is plain FLUX (its LoRAs are beside it, as diffusers LoRA files).
    weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_layer" in k or "processor" in k]
    assert sorted(p.name for p in (folder / "anystory_adapter").glob("*lora*")) == [
        "reference_lora.safetensors", "router_lora.safetensors"]

    loaded = AnyStoryFluxPipeline.from_pretrained(folder, device="cpu")
    assert loaded.lora_layers == pipe.lora_layers and loaded.reference_size == SIZE
    cast = characters(pipe)
    assert torch.equal(draw(loaded, characters(loaded)), draw(pipe, cast))
    assert torch.equal(loaded.anystory_adapter.double_blocks[0].to_q_routing_map_lora_A.weight,
                       pipe.anystory_adapter.double_blocks[0].to_q_routing_map_lora_A.weight)


def test_a_lora_with_alphas_survives_save_and_load(tmp_path):
    """The LoRA config (alpha, not only the weights) is saved with each LoRA file."""
    from anystory_cli.flux import AnyStoryFluxPipeline
    checkpoint = torch.load(MODEL / "anystory_flux.bin", weights_only=True)
    part = {}
    for key, value in checkpoint["ref"].items():
        part[key] = value * 2 if ".lora_B." in key else value
        if ".lora_B." in key:
            part[key.replace(".lora_B.weight", ".alpha")] = torch.tensor(value.shape[1] / 2.0)
    checkpoint["ref"] = part
    torch.save(checkpoint, tmp_path / "alphas.bin")
    halved = AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", redux=MODEL / "redux", adapter=tmp_path / "alphas.bin",
                                                  reference_size=SIZE, device="cpu")
    halved.save_pretrained(tmp_path / "saved")
    loaded = AnyStoryFluxPipeline.from_pretrained(tmp_path / "saved", device="cpu")
    one = characters(halved, ["red"])
    assert torch.equal(draw(loaded, characters(loaded, ["red"])), draw(halved, one))


def test_from_pipe_reuses_a_flux_pipeline_and_leaves_it_plain(pipe):
    from diffusers import FluxPipeline

    from anystory_cli.flux import AnyStoryFluxPipeline
    from anystory_cli.errors import ModelError
    flux = plain_flux()
    expected_plain = plain_draw(flux)
    with pytest.raises(ModelError, match="from_pipe of a FluxPipeline needs redux="):
        AnyStoryFluxPipeline.from_pipe(flux)
    ours = AnyStoryFluxPipeline.from_pipe(flux, redux=MODEL / "redux", adapter=MODEL / "anystory_flux.bin",
                                          reference_size=SIZE)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        assert getattr(ours, name) is getattr(flux, name)
    assert ours.transformer.x_embedder.base_layer.weight.data_ptr() == \
        flux.transformer.x_embedder.base_layer.weight.data_ptr()  # shared, not copied
    assert torch.equal(draw(ours, characters(ours)), draw(pipe, characters(pipe)))
    assert torch.equal(plain_draw(flux), expected_plain)  # the FluxPipeline still draws plain FLUX
    # Without characters our own loop is FluxPipeline's loop, bit for bit.
    assert torch.equal(ours("a ball", generator=torch.Generator().manual_seed(3), **DRAW).images, expected_plain)
    back = FluxPipeline.from_pipe(ours)
    assert type(back) is FluxPipeline and back.transformer is flux.transformer
    assert torch.equal(plain_draw(back), expected_plain)


def test_from_pipe_of_another_anystory_pipeline_shares_everything(pipe):
    from anystory_cli.flux import AnyStoryFluxPipeline
    twin = AnyStoryFluxPipeline.from_pipe(pipe)
    assert all(getattr(twin, n) is getattr(pipe, n) for n in PARTS if n != "scheduler")
    cast = characters(pipe)
    assert torch.equal(draw(twin, cast), draw(pipe, cast))


def test_model_offload_puts_a_hook_on_every_part_and_draws_the_same():
    """diffusers' own enable_model_cpu_offload, on the CPU here (the hooks are what a GPU uses):
    every part is hooked, the SigLIP encoder and the embedders too, or kept on the device."""
    pipe = storykit.tiny_flux_pipeline()
    cast = characters(pipe)
    before = draw(pipe, cast)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                assert hasattr(module, "_hf_hook") or name in pipe._exclude_from_cpu_offload, name
        assert pipe._exclude_from_cpu_offload == ["anystory_adapter"]
        assert hasattr(pipe.redux_image_encoder, "_hf_hook") and hasattr(pipe.subject_embedder, "_hf_hook")
        again = draw(pipe, characters(pipe))
        # Not bit-equal: a plain FluxPipeline offloaded on a CPU moves by ~2e-7 the same way.
        assert (again - before).abs().max().item() < 1e-5
    finally:
        pipe.remove_all_hooks()


def test_sequential_offload_hooks_every_layer_of_every_part():
    pipe = storykit.tiny_flux_pipeline()
    pipe.enable_sequential_cpu_offload(device="cpu")
    try:
        for name, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            params = [p for p in module.parameters()]
            if name in pipe._exclude_from_cpu_offload:
                assert all(p.device.type == "cpu" for p in params)
                continue
            assert hasattr(module, "_hf_hook"), name
            assert all(p.device.type == "meta" for p in params), name  # on the device only while used
    finally:
        pipe.remove_all_hooks()


def test_to_moves_every_part():
    pipe = storykit.tiny_flux_pipeline().to(torch.float64)
    for name in PARTS:
        module = getattr(pipe, name)
        if isinstance(module, torch.nn.Module):
            assert {p.dtype for p in module.parameters()} == {torch.float64}, name
    assert draw(pipe, characters(pipe)).dtype == torch.float64


# ---------------------------------------------------------------------- per-call state
def test_nothing_outlives_a_call(pipe):
    draw(pipe)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    for processor in pipe.transformer.attn_processors.values():
        assert set(vars(processor)) == {"name", "block"}  # no slot, no step state
    assert pipe.transformer.active_adapters() == []  # own LoRAs off the main streams again


def test_two_pipelines_on_one_transformer_do_not_see_each_other(pipe):
    from anystory_cli.flux import AnyStoryFluxPipeline
    # One transformer; a scheduler each (a scheduler keeps its step index: diffusers' from_pipe shares it).
    twin = AnyStoryFluxPipeline.from_pipe(pipe, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    assert twin.transformer is pipe.transformer
    cast = characters(pipe)
    alone = draw(twin, [])
    states = []

    def twin_draws_plain(p, step, t, tensors):  # in the middle of pipe's call
        states.append(draw(twin, []))
        return {}

    with_characters = draw(pipe, cast, callback_on_step_end=twin_draws_plain)
    assert all(torch.equal(s, alone) for s in states) and len(states) == DRAW["num_inference_steps"]
    assert torch.equal(with_characters, draw(pipe, cast))


def test_true_cfg_windows_follow_the_step_on_both_passes(pipe):
    """Ten steps, true CFG: the reference pass, then two transformer calls a step. Subject tokens
    (redux window 0.1-0.3: steps 1 and 2) only on the positive pass; reference and router (window
    0.2-0.5: steps 2, 3, 4) on both, stopping at the same step."""
    cast = characters(pipe)
    with Calls(pipe.transformer) as calls:
        out = draw(pipe, cast, num_inference_steps=10, negative_prompt="blurry", true_cfg_scale=2.0,
                   redux_window=(0.1, 0.3), reference_window=(0.2, 0.5), max_sequence_length=32)
    assert out.shape[0] == 1
    first, *steps = calls.seen
    assert first["text"] == 0 and first["state"].capture is not None  # the reference pass
    assert len(steps) == 20
    positive, negative = steps[0::2], steps[1::2]
    assert [s["subjects"] for s in positive] == [0, 162, 162, 0, 0, 0, 0, 0, 0, 0]
    assert [s["text"] for s in positive] == [32, 194, 194, 32, 32, 32, 32, 32, 32, 32]
    assert all(s["subjects"] == 0 and s["text"] == 32 for s in negative)
    window = [False, False, True, True, True, False, False, False, False, False]
    assert [s["reference"] for s in positive] == window and [s["reference"] for s in negative] == window
    assert [s["router"] for s in negative] == window  # two characters: the router is on
    states = [s["state"] for s in steps if s["state"] is not None]
    assert len({id(s) for s in states}) == len(states) == 4 + 3  # a new state for each call in a window


def test_without_a_negative_prompt_there_is_one_call_a_step(pipe):
    with Calls(pipe.transformer) as calls:
        draw(pipe, characters(pipe, ["red"]), num_inference_steps=4)
    assert len(calls.seen) == 1 + 4


# ---------------------------------------------------------------------- call conventions
def test_the_callback_runs_once_a_step_with_the_tensors_it_asks_for(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        assert p is pipe and tensors["latents"].shape[0] == 1
        return {"latents": tensors["latents"]}

    draw(pipe, num_inference_steps=4, callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [(i, ["latents", "prompt_embeds"]) for i in range(4)]


def test_the_callback_can_change_the_latents(pipe):
    cast = characters(pipe)

    def zero_at_the_end(p, step, timestep, tensors):
        return {"latents": tensors["latents"] * 0} if step == DRAW["num_inference_steps"] - 1 else {}

    assert not draw(pipe, cast, callback_on_step_end=zero_at_the_end).abs().any()


def test_two_images_per_prompt_are_two_draws_of_one_batch(pipe):
    cast = characters(pipe)
    two = draw(pipe, cast, num_images_per_prompt=2)
    one = draw(pipe, cast)
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1])
    assert (two[:1] - one).abs().max().item() < 1e-5  # the first image: the generator's first draw


def test_given_latents_and_output_types(pipe):
    cast = characters(pipe)
    latents = draw(pipe, cast)
    assert latents.shape == (1, 16, pipe.transformer.config.in_channels)
    start = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(draw(pipe, cast, latents=start, seed=1), draw(pipe, cast, latents=start, seed=2))
    pt = draw(pipe, cast, output_type="pt")
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    array = draw(pipe, cast, output_type="np")
    assert array.shape == (1, 64, 64, 3)
    assert abs(torch.from_numpy(array).permute(0, 3, 1, 2) - pt).max() < 1e-6
    images = draw(pipe, cast, output_type="pil")
    assert images[0].size == (64, 64)
    result = pipe("two balls", characters=cast, generator=torch.Generator().manual_seed(0), return_dict=False,
                  return_routing=True, **DRAW)
    assert isinstance(result, tuple) and torch.equal(result[0], latents) and result[1].shape == (1, 2, 64, 64)


def test_prompt_embeds_without_a_prompt_draw_as_the_prompt(pipe):
    cast = characters(pipe)
    with torch.no_grad():  # as inside a call (autograd picks other attention kernels)
        embeds, pooled, _ = pipe.encode_prompt("two balls", prompt_2=None, max_sequence_length=64)
    by_prompt = draw(pipe, cast, max_sequence_length=64)
    by_embeds = pipe(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, characters=cast,
                     generator=torch.Generator().manual_seed(0), **DRAW).images
    assert torch.equal(by_prompt, by_embeds)


def test_the_callers_joint_attention_kwargs_reach_the_transformer_beside_ours(pipe, tmp_path):
    """A LoRA scale of 0 given in joint_attention_kwargs switches a style LoRA off, while the
    characters (our own entry) still act."""
    from test_style_loras_flux import flux_lora
    cast = characters(pipe)
    without_style = draw(pipe, cast)
    pipe.load_lora_weights(flux_lora(pipe, tmp_path), adapter_name="ink")
    try:
        assert not torch.equal(draw(pipe, cast), without_style)
        assert torch.equal(draw(pipe, cast, joint_attention_kwargs={"scale": 0.0}), without_style)
    finally:
        pipe.unload_lora_weights()
    assert not torch.equal(without_style, draw(pipe, []))


# ---------------------------------------------------------------------- attention and LoRA
def test_an_attention_backend_set_on_the_transformer_reaches_our_processors():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    pipe = storykit.tiny_flux_pipeline()
    cast = characters(pipe)
    default = draw(pipe, cast)
    backend = AttentionBackendName._NATIVE_MATH
    original = _AttentionBackendRegistry._backends[backend]
    active = _AttentionBackendRegistry._active_backend
    used = []

    def counting(*args, **kwargs):
        used.append(kwargs["query"].shape)
        return original(*args, **kwargs)

    _AttentionBackendRegistry._backends[backend] = counting
    try:
        pipe.transformer.set_attention_backend(backend.value)
        assert {p._attention_backend for p in pipe.transformer.attn_processors.values()} == {backend}
        math = draw(pipe, cast)
    finally:
        _AttentionBackendRegistry._backends[backend] = original
        _AttentionBackendRegistry.set_active_backend(active)
    config = pipe.transformer.config
    blocks = config.num_layers + config.num_single_layers
    # every block, every call: the reference pass, then per step the main and the router attention
    assert len(used) == blocks + DRAW["num_inference_steps"] * blocks * 2
    assert (math - default).abs().max().item() < 1e-5


def test_a_dora_part_is_refused_in_one_line(tmp_path):
    from anystory_cli.errors import ModelError
    from anystory_cli.flux import AnyStoryFluxPipeline
    checkpoint = torch.load(MODEL / "anystory_flux.bin", weights_only=True)
    key = next(k for k in checkpoint["router"] if k.endswith("lora_B.weight") and "processor" not in k)
    checkpoint["router"][key.replace("lora_B.weight", "lora_magnitude_vector")] = \
        torch.ones(checkpoint["router"][key].shape[0])
    torch.save(checkpoint, tmp_path / "dora.bin")
    with pytest.raises(ModelError) as caught:
        AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", redux=MODEL / "redux", adapter=tmp_path / "dora.bin",
                                             reference_size=SIZE, device="cpu")
    assert "\n" not in str(caught.value) and "dora.bin" in str(caught.value) and "DoRA" in str(caught.value)


LOUD_LOAD = r"""
import sys, warnings
import importlib.util
import diffusers, transformers, peft, torch  # their import-time lines are not ours
if importlib.util.find_spec("torchao"):
    import torchao.quantization  # torch warns about its enums on import (the torchao extra)
sys.path.insert(0, "tests")
import storykit
from anystory_cli.errors import ModelError
from safetensors.torch import save_file
print("--- loading", file=sys.stderr, flush=True)
pipe = storykit.tiny_flux_pipeline()
save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)},
          sys.argv[1])
try:
    pipe.load_lora_weights(sys.argv[1])
except ModelError as exc:
    print(exc, file=sys.stderr)
"""


def test_loading_prints_nothing_and_a_lora_for_another_base_is_one_error(tmp_path, capfd):
    from safetensors.torch import save_file

    from anystory_cli.errors import ModelError
    capfd.readouterr()
    loaded = storykit.tiny_flux_pipeline()
    file = tmp_path / "sd.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(file))
    with pytest.raises(ModelError) as caught:
        loaded.load_lora_weights(file)
    assert "\n" not in str(caught.value) and "sd.safetensors" in str(caught.value)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.slow
def test_loading_is_quiet_and_a_lora_for_another_base_is_one_line(tmp_path):
    """As a new user meets it: a fresh process, imports included."""
    file = tmp_path / "sd.safetensors"
    result = subprocess.run([sys.executable, "-c", LOUD_LOAD, str(file)], capture_output=True, text=True,
                            timeout=300)
    after = result.stderr.split("--- loading\n", 1)[1].strip().splitlines()
    assert len(after) == 1 and "sd.safetensors" in after[0] and "another base model" in after[0], after


def test_a_quantization_config_goes_to_diffusers():
    """PipelineQuantizationConfig reaches diffusers' loader; the AnyStory LoRAs land on the
    quantized transformer and the characters still act (torchao int8 weights on a CPU)."""
    pytest.importorskip("torchao")
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from anystory_cli.flux import AnyStoryFluxPipeline
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    quantized = AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", redux=MODEL / "redux",
                                                     adapter=MODEL / "anystory_flux.bin", reference_size=SIZE,
                                                     device="cpu", quantization_config=config)
    layer = quantized.transformer.transformer_blocks[0].attn.to_q
    assert "AffineQuantized" in type(layer.base_layer.weight).__name__ or \
        type(layer.base_layer.weight) is not torch.nn.Parameter
    full = storykit.tiny_flux_pipeline()
    expected = draw(full, characters(full, ["red"]))
    got = draw(quantized, characters(quantized, ["red"]))
    assert ((got - expected).norm() / expected.norm()).item() < 0.02
    assert quantized.lora_layers == full.lora_layers


def test_a_saved_pipeline_loads_by_hub_id_from_the_cache(pipe, tmp_path, monkeypatch):
    import shutil

    from anystory_cli.errors import ModelError
    from anystory_cli.flux import AnyStoryFluxPipeline
    cache, revision = tmp_path / "hub", "0" * 40
    snapshot = cache / "models--someone--anystory-flux" / "snapshots" / revision
    pipe.save_pretrained(tmp_path / "saved")
    shutil.copytree(tmp_path / "saved", snapshot)
    (cache / "models--someone--anystory-flux" / "refs").mkdir()
    (cache / "models--someone--anystory-flux" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AnyStoryFluxPipeline.from_pretrained("someone/anystory-flux", device="cpu")
    assert torch.equal(draw(loaded, characters(loaded)), draw(pipe, characters(pipe)))
    with pytest.raises(ModelError, match="needs redux="):  # an id that is not a saved AnyStory pipeline
        AnyStoryFluxPipeline.from_pretrained("someone/not-cached", device="cpu")
