"""FLUX text encoders in a render: every panel's prompt is encoded before the first panel is
denoised, the embeddings are the ones a plain call computes, and with a plan whose text encoders
leave the device they and the transformer take turns on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import storykit
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli
from anystory_cli.flux import memory
from anystory_cli.flux.comic import FluxComicPipeline
from anystory_cli.flux.memory_apply import apply_plan, place_for_denoising, place_for_text

MODEL = storykit.FLUX_MODEL
SUBJECTS = storykit.FLUX_FIXTURE / "subjects"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from storykit.one_torch_thread()


def _watch(pipe, events: list, inputs: list | None = None):
    """Forward hooks that log which part ran, in order (and the transformer's text stream)."""
    handles = [pipe.text_encoder.register_forward_hook(lambda *a: events.append("clip")),
               pipe.text_encoder_2.register_forward_hook(lambda *a: events.append("t5"))]

    def transformer(_module, _args, kwargs):
        events.append("transformer")
        if inputs is not None:
            inputs.append(kwargs["encoder_hidden_states"].clone())
    handles.append(pipe.transformer.register_forward_pre_hook(transformer, with_kwargs=True))
    return handles


def write_story(folder: Path) -> Path:
    for name in ("red", "blue"):
        Image.open(SUBJECTS / f"{name}.png").save(folder / f"{name}.png")
        Image.open(SUBJECTS / f"{name}_mask.png").save(folder / f"{name}_mask.png")
    story = {
        "title": "Balls", "seed": 3,
        "model": {"base": str(MODEL / "flux"), "redux": str(MODEL / "redux"), "adapter": str(MODEL / "anystory_flux.bin")},
        "style": {"steps": 2, "resolution": 64}, "page": dict(storykit.PAGE),
        "characters": {n: {"image": f"{n}.png", "mask": f"{n}_mask.png"} for n in ("red", "blue")},
        "panels": [{"prompt": "red and blue play", "characters": ["red", "blue"]},
                   {"prompt": "red alone", "characters": ["red"]},
                   {"prompt": "blue alone", "characters": ["blue"]}],
    }
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def test_a_render_encodes_every_prompt_before_the_first_panel_is_denoised(tmp_path, monkeypatch):
    events: list[str] = []
    made = FluxComicPipeline.__init__

    def watched(self, pipe, model_id):
        made(self, pipe, model_id)
        _watch(pipe, events)

    monkeypatch.setattr(FluxComicPipeline, "__init__", watched)
    story = write_story(tmp_path)
    outs = {}
    for memory_option in ("bf16-text-off", None):
        events.clear()
        out = tmp_path / f"out-{memory_option}"
        args = ["render", str(story), "--out", str(out), "--cache", str(tmp_path / "cache"), "--json",
                "--device", "cpu"] + (["--memory", memory_option] if memory_option else [])
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)["stories"][0].get("memory_plan")
        assert (plan or {}).get("plan") == memory_option
        assert plan is None or (plan["text_encoders_leave"] and plan["offload"] == "none")
        first = events.index("transformer")
        assert "t5" not in events[first:] and "clip" not in events[first:]
        assert events[:first].count("t5") == 3  # each panel's prompt once
        outs[memory_option] = out
    for n in (1, 2, 3):  # the plan changes where the encoders are, not the pixels
        name = f"panels/panel-{n:03d}.png"
        assert (Image.open(outs["bf16-text-off"] / name).tobytes() == Image.open(outs[None] / name).tobytes())


@pytest.fixture(scope="module")
def comic():
    pipe = storykit.tiny_flux_pipeline()
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*storykit.flux_subject(n), generator=g) for n in ("red", "blue")]
    return FluxComicPipeline(pipe, "tiny"), characters


@pytest.mark.parametrize("leave", [False, True])
def test_the_embeddings_encoded_beforehand_are_the_ones_a_plain_call_uses(comic, leave):
    comic_pipe, characters = comic
    pipe = comic_pipe.pipe
    draw = {"num_inference_steps": 2, "height": 64, "width": 64, "characters": characters}
    plain_inputs, early_inputs, events = [], [], []
    handles = _watch(pipe, [], plain_inputs)
    plain = comic_pipe("red and blue play", generator=torch.Generator().manual_seed(1), **draw).images[0]
    for handle in handles:
        handle.remove()
    pipe.text_encoders_leave = leave
    handles = _watch(pipe, events, early_inputs)
    try:
        with comic_pipe.prompts_encoded(["red and blue play", "red alone", "red and blue play"]):
            assert events == ["clip", "t5", "clip", "t5"]
            early = comic_pipe("red and blue play", generator=torch.Generator().manual_seed(1), **draw).images[0]
    finally:
        pipe.text_encoders_leave = False
        for handle in handles:
            handle.remove()
    assert "t5" not in events[4:]  # the call used what was encoded
    assert len(plain_inputs) == len(early_inputs) == 3  # the reference pass and two steps
    assert all(torch.equal(a, b) for a, b in zip(plain_inputs, early_inputs))
    assert plain.tobytes() == early.tobytes()
    assert not comic_pipe._prompts  # forgotten after the render


def test_the_placement_takes_the_encoders_off_the_execution_device_it_is_given():
    """On this CPU the execution device is the CPU, and `meta` stands for where they go."""
    pipe = storykit.tiny_flux_pipeline()
    place_for_denoising(pipe, "cpu", away="meta")
    assert pipe.text_encoder.device.type == pipe.text_encoder_2.device.type == "meta"
    assert pipe.transformer.device.type == "cpu"
    other = storykit.tiny_flux_pipeline()
    place_for_text(other, "cpu", away="meta")  # the text phase: the transformer leaves the device
    assert other.transformer.device.type == "meta" and other.text_encoder_2.device.type == "cpu"


def test_apply_plan_keeps_the_transformer_back_until_the_prompts_are_encoded():
    pipe = storykit.tiny_flux_pipeline()
    pipe.transformer.to("meta")  # stands for the CPU it waits on: apply_plan must not move it
    apply_plan(pipe, memory.PLAN_NAMES["int8-text-off"], "cpu")
    assert pipe.text_encoders_leave and pipe.reference_kv_device is None
    assert pipe.transformer.device.type == "meta" and pipe.text_encoder_2.device.type == "cpu"


def test_the_ledger_does_not_count_the_text_encoders_while_denoising():
    shape, load, parts = memory.FluxShape(), memory.Workload(1024, 2), memory.Parts()
    text_encoders = 2 * (parts.t5["linear"] + parts.t5["other"] + parts.clip)
    for name in ("bf16", "int8"):
        stay, leave = memory.PLAN_NAMES[name], memory.PLAN_NAMES[f"{name}-text-off"]
        before, after = memory.phases(shape, stay, load), memory.phases(shape, leave, load)
        for phase in ("reference", "step", "decode"):
            assert after[phase] == pytest.approx(before[phase] - text_encoders)
        assert after["text"] == pytest.approx(before["text"] - memory.transformer_bytes(shape, stay.transformer)
                                              + 2 * shape.routing_adapter_params())
        assert leave.weights_key == stay.weights_key  # same pixels, same panel keys
    assert memory.choose_plan(24 * memory.GiB, load).plan.name == "int8-text-off"


def test_a_plain_flux_pipeline_gets_everything_on_the_device_under_a_text_off_plan():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(MODEL / "flux"))
    pipe.transformer.to("meta")  # would stay there if apply_plan held it back
    with pytest.raises(NotImplementedError, match="meta"):  # it tries to bring it to the device
        apply_plan(pipe, memory.PLAN_NAMES["bf16-text-off"], "cpu")


def test_under_model_offload_the_text_encoders_leave_before_the_first_step():
    """accelerate's hooks (placed on the CPU here: the hooks a GPU run gets) would move T5 off
    only when the Redux encoder starts, which a call with encoded characters never runs."""
    pipe = storykit.tiny_flux_pipeline()
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*storykit.flux_subject("red"), generator=g)]
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        events: list[str] = []
        for hook in pipe._all_hooks:
            name = next(n for n, part in pipe.components.items() if part is hook.model)
            hook.offload = (lambda made, name: lambda: (events.append(f"off {name}"), made())[1])(hook.offload, name)
        _watch(pipe, events)
        pipe("red plays", characters=characters, num_inference_steps=1, height=64, width=64, output_type="latent")
        first = events.index("transformer")
        assert "t5" in events[:first] and "off text_encoder_2" in events[events.index("t5"):first]
    finally:
        pipe.remove_all_hooks()


def test_a_device_named_without_its_index_is_the_one_a_module_reports():
    from anystory_cli.flux.memory_apply import _same_device

    assert _same_device("cuda", "cuda:0") and _same_device("cuda:1", "cuda") and _same_device("cpu", "cpu")
    assert not _same_device("cuda:0", "cuda:1") and not _same_device("cuda", "cpu")
    assert not _same_device("mps", "cpu")


def test_a_stored_bitsandbytes_t5_is_never_planned_to_leave():
    from anystory_cli.render.memory_plan import loading_plan, placements

    q = memory.QUANTIZATIONS
    assert not any(p.text_encoders_leave for p in placements({"text_encoder": (q["bnb-int8"], "t5")}))
    assert [p.name for p in placements({"text_encoder": (q["int8"], "t5")}) if p.text_encoders_leave] == \
        ["bf16-text-off", "int8-text-off"]
    gguf = memory.Quantization("gguf-q8_0", 34 / 32, "gguf", dequantizes_layers=True)
    leaving = [p for p in placements({"transformer": (gguf, "f.gguf")}) if p.text_encoders_leave]
    assert [p.name for p in leaving] == ["gguf-q8_0-text-off"]
    said = {**memory.Choice(leaving[0], 1.0, None).as_dict(), "already_quantized": ["transformer"]}
    assert loading_plan(said).text_encoders_leave  # what a render loads with keeps the placement
