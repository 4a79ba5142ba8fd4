"""FLUX on devices other than a CUDA GPU: which memory plans, precisions and quantizations each
takes (Apple's MPS shares its memory with the CPU). Decisions on device strings: no MPS here."""
from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from anystory_cli.errors import InputError
from anystory_cli.flux import memory
from anystory_cli.flux.memory_apply import check_backend
from anystory_cli.flux.pipeline import default_dtype
from anystory_cli.render import memory_plan

PLANS = memory.PLAN_NAMES


def test_mps_takes_only_the_plans_that_keep_every_part_where_it_is():
    assert [p.name for p in memory.plans_for("mps")] == ["bf16", "int8"]
    assert [p.name for p in memory.plans_for("mps:0")] == ["bf16", "int8"]
    assert memory.plans_for("cuda") == memory.plans_for("cuda:1") == memory.PLANS


@pytest.mark.parametrize("name", ["bf16-offload", "int8-offload", "nf4-offload", "gguf-q4-offload", "group-offload",
                                  "sequential"])
def test_an_offloading_plan_is_refused_on_mps_and_the_cpu_in_one_line(name):
    for device, reason in (("mps", "offloading frees nothing"), ("cpu", "")):
        with pytest.raises(InputError) as refused:
            memory.check_plan_on(PLANS[name], device, "bfloat16")
        message = str(refused.value)
        assert message.startswith(f"memory plan {name} offloads from a CUDA GPU; this render runs on {device}")
        assert reason in message and "\n" not in message
    memory.check_plan_on(PLANS[name], "cuda:1", "bfloat16")


def test_text_encoders_leaving_for_the_cpu_is_refused_on_mps():
    with pytest.raises(InputError, match="frees nothing in MPS's shared memory; use int8$"):
        memory.check_plan_on(PLANS["int8-text-off"], "mps", "bfloat16")
    memory.check_plan_on(PLANS["int8-text-off"], "cuda", "bfloat16")


@pytest.mark.parametrize("dtype, ok", [("bfloat16", True), ("float16", True), ("float32", False)])
def test_mps_draws_flux_in_half_precision(dtype, ok):
    for name in ("bf16", "int8"):
        if ok:
            memory.check_plan_on(PLANS[name], "mps", dtype)
        else:
            with pytest.raises(InputError, match="counts bfloat16 weights; this render asks for float32"):
                memory.check_plan_on(PLANS[name], "mps", dtype)
    memory.check_plan_on(PLANS["int8"], "cpu", "float32")  # a CPU computes in float32
    assert default_dtype("mps") == default_dtype("cuda:0") == torch.bfloat16
    assert default_dtype("cpu") == torch.float32


def test_bitsandbytes_is_refused_off_cuda_and_torchao_and_gguf_are_not():
    nf4 = memory.Plan("nf4-here", memory.QUANTIZATIONS["nf4"], memory.QUANTIZATIONS["bf16"], "none", 1.0)
    for device in ("mps", "cpu"):
        with pytest.raises(InputError, match=r"nf4 quantization \(bitsandbytes\) needs a CUDA GPU"):
            memory.check_plan_on(nf4, device, "bfloat16")
        with pytest.raises(InputError) as refused:  # missing here, or needing CUDA: one line either way
            check_backend(memory.QUANTIZATIONS["nf4"], device)
        assert "\n" not in str(refused.value) and "nf4 quantization" in str(refused.value)
    for name in ("int8", "gguf-q8"):
        quantization = memory.QUANTIZATIONS[name]
        if importlib.util.find_spec(quantization.backend) is not None:
            check_backend(quantization, "mps")


def test_a_memory_size_on_mps_picks_among_its_plans_and_auto_gives_none(monkeypatch):
    load = memory.Workload(512, 1)
    chosen = memory.choose_plan(32 * memory.GiB, load, plans=memory.plans_for("mps"))
    assert chosen.plan.name == "int8"
    assert memory.choose_plan(32 * memory.GiB, load).plan.name == "bf16-text-off"  # on CUDA
    with pytest.raises(memory.DoesNotFit) as refused:  # nf4 with offload would fit on CUDA
        memory.choose_plan(16 * memory.GiB, load, plans=memory.plans_for("mps"))
    int8 = memory.peak(memory.FluxShape(), PLANS["int8"], load) + memory.HEADROOM
    assert f"the smallest that works is {math.ceil(int8 / memory.GiB * 10) / 10:g}GB" in str(refused.value)

    story = SimpleNamespace(model=SimpleNamespace(base="black-forest-labs/FLUX.1-dev", redux="r", adapter="a"))
    monkeypatch.setattr(memory_plan, "flux_parts", lambda story: story.model)
    panels = [SimpleNamespace(resolution=512, characters=["red"])]
    auto = memory_plan.choose(story, panels, "auto", "mps")
    assert auto["plan"] is None and "MPS shares its memory with the CPU" in auto["note"]
    assert memory_plan.choose(story, panels, "32GB", "mps")["plan"] == "int8"
