"""The reference keys and values of an AnyStory FLUX call: recorded once (no second copy while
they are regrouped per block), and stored where the memory plan puts them."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import storykit
import torch

from anystory_cli.flux import memory
from anystory_cli.flux.reference import prepare_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flux_memory as bench  # noqa: E402  (the memory benchmark's slice builder and profiler)

# Narrow but deep: with 24 blocks the recorded keys and values outweigh the reference pass's
# activations several times, so a second copy of them would show in the pass's peak.
DEEP = memory.FluxShape(heads=2, head_dim=64, double_blocks=1, single_blocks=23, text_width=64, pooled_dim=32,
                        lora_rank=8, routing_rank=8, embedder_rank=8, siglip_width=16, reference_size=256)


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
    pipe, characters = deep
    marks: list[int] = []
    # From the start of the reference pass to the start of the denoising step: the pass, and
    # whatever the pipeline does with what it recorded before the loop.
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(time.time_ns()))

    def call():
        with torch.no_grad():
            pipe("a red ball and a blue ball", characters=characters, num_inference_steps=1, height=64, width=64,
                 output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0))

    try:
        _, windows = bench.allocation_peak(call, marks)
    finally:
        handle.remove()
    measured = windows[0]
    kv = memory.reference_kv_bytes(DEEP, 2)
    ledger = memory.reference_pass_bytes(DEEP, 2)
    assert kv <= measured <= 1.1 * ledger
    assert measured < 1.5 * kv  # a second copy of the keys and values would make it 2 x kv at least
