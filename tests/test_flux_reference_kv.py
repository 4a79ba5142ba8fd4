"""The reference keys and values of an AnyStory FLUX call: recorded once (no second copy while
they are regrouped per block), and stored where the memory plan puts them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import storykit
import torch

from anystory_cli.flux import memory
from anystory_cli.flux.reference import prepare_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flux_memory as bench  # noqa: E402  (the memory benchmark's slice builder and profiler)

DEEP = bench.DEEP


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = bench.build_slice(tmp_path_factory.mktemp("deep"), DEEP)
    pipe = bench.load_pipeline(root, "bf16", reference_size=DEEP.reference_size)
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*prepare_reference(*bench._subject(c, b)), generator=g)
                  for c, b in bench.SUBJECTS[:2]]
    return pipe, characters


def test_the_reference_pass_holds_its_keys_and_values_once(deep):
    measured = bench.reference_pass_peak(*deep)
    kv = memory.reference_kv_bytes(DEEP, 2)
    ledger = memory.reference_pass_bytes(DEEP, 2)
    assert kv <= measured <= 1.1 * ledger
    assert measured < 1.5 * kv  # a second copy of the keys and values would make it 2 x kv at least


# ---------------------------------------------------------------------------------------- placement
@pytest.fixture(scope="module")
def tiny():
    pipe = storykit.tiny_flux_pipeline()
    g = torch.Generator().manual_seed(0)
    return pipe, [pipe.encode_character(*storykit.flux_subject(n), generator=g) for n in ("red", "blue")]


def _draw(pipe, characters):
    return pipe("a red ball and a blue ball", characters=characters, num_inference_steps=2, height=64, width=64,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_the_cache_is_stored_where_the_pipeline_says(tiny):
    pipe, characters = tiny
    assert pipe.reference_kv_device is None
    pooled = torch.zeros(1, pipe.transformer.config.pooled_projection_dim)
    made_here = pipe._reference_pass(characters, pooled, 3.5, True, 0.0)
    pipe.reference_kv_device = "meta"  # a device other than the execution device (the CPU here)
    try:
        stored = pipe._reference_pass(characters, pooled, 3.5, True, 0.0)
    finally:
        pipe.reference_kv_device = None
    assert made_here.kv.keys() == stored.kv.keys() and len(stored.kv) == 2
    for name, pair in stored.kv.items():
        assert all(t.device.type == "meta" for t in pair)
        assert all(t.device.type == "cpu" for t in made_here.kv[name])
        assert [t.shape for t in pair] == [t.shape for t in made_here.kv[name]]
    assert stored.mask_bias.device.type == "cpu"  # small: it stays with the call


def test_a_cache_kept_on_the_cpu_draws_the_same_latents(tiny):
    pipe, characters = tiny
    on_device = _draw(pipe, characters)
    pipe.reference_kv_device = "cpu"
    try:
        kept = _draw(pipe, characters)
    finally:
        pipe.reference_kv_device = None
    assert torch.equal(on_device, kept)


def test_the_processor_moves_a_blocks_cache_to_the_hidden_states_device(tiny):
    """The attention layer on the meta device, the cache on the CPU: the layer's keys and values
    come to the hidden states' device (a cat of meta and CPU tensors would raise)."""
    import copy

    from anystory_cli.flux.processors import ReferenceKV, StepState

    pipe, _ = tiny
    attn = copy.deepcopy(pipe.transformer.transformer_blocks[0].attn).to("meta")
    heads, dim = attn.heads, pipe.transformer.config.attention_head_dim
    width = heads * dim
    reference = ReferenceKV(kv={"double.0": (torch.randn(1, 5, heads, dim), torch.randn(1, 5, heads, dim))},
                            mask_bias=torch.zeros(1, 5))
    state = StepState(text_len=3, subject_len=0, characters=1, reference=reference)
    image, text = attn.processor(attn, torch.randn(2, 4, width, device="meta"),
                                 torch.randn(2, 3, width, device="meta"), anystory=state)
    assert image.device.type == text.device.type == "meta"
    assert image.shape == (2, 4, width) and text.shape == (2, 3, width)
    assert all(t.device.type == "cpu" for t in reference.kv["double.0"])  # the cache itself stays


def test_the_ledger_counts_the_cache_where_it_lives():
    shape = memory.FluxShape()
    one, four = memory.Workload(512, 1), memory.Workload(512, 4)
    kv = memory.reference_kv_bytes(shape, 3)
    resident = memory.phases(shape, memory.PLAN_NAMES["bf16"], four)["decode"] - \
        memory.phases(shape, memory.PLAN_NAMES["bf16"], one)["decode"]
    assert resident == kv  # kept on the device through the decode
    for name in ("bf16-offload", "group-offload", "sequential"):
        plan = memory.PLAN_NAMES[name]
        assert memory.phases(shape, plan, four)["decode"] == memory.phases(shape, plan, one)["decode"]
        step = memory.phases(shape, plan, four)["step"] - memory.phases(shape, plan, one)["step"]
        assert step < kv / 2  # one block's pair in flight, and the larger step
