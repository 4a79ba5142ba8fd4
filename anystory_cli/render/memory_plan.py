"""The memory plan of a FLUX story: the panels to draw give the workload (largest panel, most
characters in one panel), `--memory` or the story's `model.memory` the budget, the ledger
(`flux.memory`) the plan. Nothing here loads a model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from ..flux import memory
from ..plan import PanelPlan
from ..story import FluxModel, Story

FLUX_RESOLUTION = 512  # a FLUX panel's long side when the story does not set one (the released app's)
_PARTS_NOTE = "FLUX.1-dev's sizes"


def story_memory(story: Story, option: str | None) -> str | None:
    """The memory asked for: --memory wins over the story's model.memory."""
    if option is not None:
        return option
    return getattr(flux_parts(story), "memory", None)  # a mapping's or a model file's


def flux_parts(story: Story):
    """The story's FLUX model: its parts (base, redux, adapter and maybe a GGUF transformer),
    however named (a mapping, a built-in name such as anystory-flux, a model file), or a saved
    AnyStoryFluxPipeline folder (model_loading.model_source, nothing downloaded); None for
    another model."""
    from ..errors import AnyStoryError
    from ..model_loading import FluxParts, SavedFluxFolder, model_source

    if isinstance(story.model, FluxModel):
        return model_source(story.model)
    try:
        source = model_source(story.model, download=False)
    except AnyStoryError:
        return None  # a missing or broken model: loading it says what is wrong
    return source if isinstance(source, (FluxParts, SavedFluxFolder)) else None


def workload(plans: Sequence[PanelPlan]) -> memory.Workload:
    """The heaviest panel's needs: the largest long side (as a square: the worst case of that side)
    and the most characters in one panel."""
    size = max((p.resolution or FLUX_RESOLUTION) for p in plans)
    return memory.Workload(size=size, characters=max(len(p.characters) for p in plans))


def model_shape(model) -> tuple[memory.FluxShape, memory.Parts, str]:
    """The transformer's sizes from the local FLUX folder's config, the other parts counted from
    their safetensors headers; FLUX.1-dev's when the folder is not on disk (a hub id)."""
    saved = getattr(model, "folder", None)  # a saved AnyStoryFluxPipeline holds every part
    base = Path(saved if saved is not None else model.base)
    siglip = base / "redux_image_encoder" if saved is not None else Path(model.redux) / "image_encoder"
    config = base / "transformer" / "config.json"
    if not config.is_file():
        return memory.FluxShape(), memory.Parts(), _PARTS_NOTE
    try:
        shape = memory.FluxShape.from_config(json.loads(config.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{config}: not a FLUX transformer config ({exc})") from None
    t5 = _counted(base / "text_encoder_2")
    vae = _counted(base / "vae")
    parts = memory.Parts(t5={"linear": t5[0], "other": t5[1]}, clip=sum(_counted(base / "text_encoder")),
                         vae={"encoder": sum(vae), "decoder": 0}, siglip=sum(_counted(siglip)))
    return shape, parts, f"{base.name}'s sizes"


def stored_parts(model, shape: memory.FluxShape) -> dict[str, tuple[memory.Quantization, str]]:
    """The parts the model brings quantized, each with where from: "transformer" (a GGUF file: its
    type and its tensors' bytes from the header; or a folder, a saved AnyStoryFluxPipeline or the
    base FLUX folder, whose transformer config carries a quantization_config, as save_pretrained
    writes it for a quantized pipeline) and "text_encoder" (T5 saved quantized likewise). A part
    not named comes in full precision, and a plan may quantize it."""
    from ..model_loading import gguf_file

    stored = {}
    folder = Path(getattr(model, "folder", None) or model.base)  # a saved AnyStoryFluxPipeline, else base
    if getattr(model, "transformer", None) is not None:
        from ..flux.gguf_file import read_gguf_transformer

        path = gguf_file(model, download=False)  # a plan downloads nothing
        if path is None:  # a hub file not cached yet: counted as FLUX.1-dev's Q8_0 would be
            stored["transformer"] = memory.QUANTIZATIONS["gguf-q8"], str(model.transformer)
        else:
            gguf = read_gguf_transformer(path)
            linear, other = shape.transformer_params()
            per_weight = max(gguf.tensor_bytes - 2 * other, 0) / linear  # the ledger then counts the file's bytes
            stored["transformer"] = memory.Quantization(
                f"gguf-{gguf.quant_type.lower()}", per_weight, "gguf", dequantizes_layers=True,
                label=f"GGUF {gguf.quant_type} from {path.name}"), str(path)
    else:
        quantization = _saved_quantization(folder / "transformer", "transformer")
        if quantization is not None:
            stored["transformer"] = quantization, str(folder / "transformer")
    quantization = _saved_quantization(folder / "text_encoder_2", "T5")
    if quantization is not None:
        stored["text_encoder"] = quantization, str(folder / "text_encoder_2")
    return stored


def _saved_quantization(part: Path, what: str) -> memory.Quantization | None:
    """The ledger's quantization for the quantization_config in a part's config.json (torchao
    int8, bitsandbytes); None without one."""
    try:
        config = json.loads((part / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # loading the folder says what is wrong with it
    if not config:
        return None
    method = config.get("quant_method")
    if method == "torchao":
        quant_type = config.get("quant_type")
        kind = quant_type.get("default", {}).get("_type", "") if isinstance(quant_type, dict) else str(quant_type)
        if kind in ("Int8WeightOnlyConfig", "int8_weight_only", "int8wo"):
            return memory.QUANTIZATIONS["int8"]
        raise InputError(f"{part}: the {what} is stored as torchao {kind or quant_type}, which memory plans "
                         f"do not count (they know torchao Int8WeightOnlyConfig); render it without --memory")
    if method == "bitsandbytes":
        return memory.QUANTIZATIONS["nf4" if config.get("load_in_4bit") else "bnb-int8"]
    raise InputError(f"{part}: the {what} is stored quantized with {method!r}, which memory plans do not "
                     f"count (they know torchao int8 and bitsandbytes); render it without --memory")


def placements(stored: dict) -> tuple[memory.Plan, ...]:
    """The plans to choose from: all of them; for a stored transformer, its placements only; for a
    stored T5, those that leave T5 as it comes."""
    plans = memory.PLANS if "transformer" not in stored else memory.stored_plans(stored["transformer"][0])
    if "text_encoder" in stored:
        t5 = stored["text_encoder"][0]
        # A bitsandbytes T5 cannot be moved between devices: it stays, so no plan moves it away.
        plans = tuple(replace(p, text_encoder=t5, stored=(*p.stored, "text_encoder"))
                      for p in plans if p.text_encoder.backend is None
                      and not (p.text_encoders_leave and t5.backend == "bitsandbytes"))
    return plans


def follow_named(named: memory.Plan, stored: dict, where: str) -> memory.Plan:
    """A named plan (--memory int8, bf16-offload, ...) with what the model brings quantized: its
    placement; InputError when it would quantize a stored part to another kind."""
    plan = named
    if "transformer" in stored:
        quantization, source = stored["transformer"]
        plan = memory.stored_plan(named, quantization)
        if plan is None:
            raise InputError(f"{where}: plan {named.name} quantizes the transformer to {named.transformer.name}, "
                             f"but this model's transformer comes as {quantization.label or quantization.name} "
                             f"({source}); give a size, auto, or a plan that keeps the transformer as it is "
                             f"(bf16, bf16-offload, group-offload, sequential)")
    if "text_encoder" in stored:
        quantization, source = stored["text_encoder"]
        if plan.text_encoder.backend is not None and plan.text_encoder != quantization:
            raise InputError(f"{where}: plan {named.name} quantizes T5 to {plan.text_encoder.name}, but this "
                             f"model's T5 comes as {quantization.name} ({source}); give a size, auto, or a plan "
                             f"that keeps T5 in bf16")
        plan = replace(plan, text_encoder=quantization, stored=(*plan.stored, "text_encoder"))
    return plan


def _counted(folder: Path) -> tuple[int, int]:
    """(2-D weights, other parameters) in a folder's safetensors files, from their headers."""
    linear = other = 0
    for file in sorted(folder.glob("*.safetensors")):
        for name, numel, dims in _header(file):
            if dims == 2 and name.endswith(".weight") and "embed" not in name and "shared" not in name:
                linear += numel
            else:
                other += numel
    return linear, other


def _header(file: Path):
    import struct
    with open(file, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    for name, entry in header.items():
        if name != "__metadata__":
            numel = 1
            for d in entry["shape"]:
                numel *= d
            yield name, numel, len(entry["shape"])


def device_budget(device: str) -> float | None:
    """The free memory of a CUDA device in bytes; None where there is none (CPU, MPS)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return float(free)


def choose(story: Story, plans: Sequence[PanelPlan], asked: str, device: str, where: str = "--memory") -> dict:
    """The plan for drawing `plans` of a FLUX story with the memory `asked` ('auto', a size, or a
    plan's name: that plan, whatever the memory). A dict for --json and the terminal; DoesNotFit
    (one line, exit 1) when nothing fits."""
    flux = flux_parts(story)
    if flux is None:
        raise InputError(f"{where}: memory plans are for FLUX models; this story's model is {story.model!r}")
    forced = memory.named_plan(asked)
    budget = None if forced is not None else memory.parse_memory(asked, where)
    load = workload(plans)
    shape, parts, sizes = model_shape(flux)
    stored = stored_parts(flux, shape)
    candidates = placements(stored)
    comes_as = {} if not stored else {"already_quantized": list(stored),
                                      **{f"{part}_from": source for part, (_, source) in stored.items()}}
    source = f"{where} {asked}"
    if forced is not None:
        followed = follow_named(forced, stored, source)
        choice = memory.Choice(followed, memory.peak(shape, followed, load, parts), None)
    else:
        if budget is None:
            budget = device_budget(device)
            if budget is None:
                why = "MPS shares its memory with the CPU" if device.startswith("mps") else "no CUDA device"
                said = {"quantization": {part: q.name for part, (q, _) in stored.items()}, **comes_as} if stored else {}
                return {"plan": None, "memory": source, "panel_px": load.size, "characters": load.characters,
                        **said, "note": f"{why} ({device}): no memory plan, the model runs on {device} as it is"}
            source = f"{where} auto: {memory.format_size(budget)} free on {device}"
        candidates = memory.plans_for(device, candidates)
        if not candidates:
            raise InputError(f"{where} {asked}: no memory plan for this model runs on {device}")
        choice = memory.choose_plan(budget, load, shape, parts, candidates)
    offload_need = memory.peak(shape, memory.PLAN_NAMES["bf16-offload"], load, parts) + memory.HEADROOM
    return {**choice.as_dict(), "memory": source, "panel_px": load.size, "characters": load.characters,
            "description": choice.plan.describe(), "sizes": sizes, **comes_as,
            "bf16_offload_needs_gib": round(offload_need / memory.GiB, 1)}


def describe(plan: dict) -> str:
    """One line for the terminal."""
    if plan.get("plan") is None:
        return f"memory plan: none ({plan['note']})"
    budget = "" if plan["budget_gib"] is None else f" of {plan['budget_gib']} GiB"
    return (f"memory plan: {plan['plan']} ({plan['description']}), estimated peak {plan['estimated_peak_gib']} GiB"
            f"{budget} ({plan['memory']}; {plan['panel_px']} px, {plan['characters']} "
            f"character{'s' if plan['characters'] != 1 else ''} per panel at most)")


def check_applicable(plan: dict, runtime) -> None:
    """InputError, before any model loads, for a plan this render cannot follow: offload without
    a CUDA device (or text encoders leaving for the CPU on MPS), a quantization library that is
    missing or cannot run here (a GGUF plan for a model without a GGUF transformer file), bf16
    weights counted for a float32 render on a GPU (`flux.memory.check_plan_on`)."""
    chosen = loading_plan(plan)
    if chosen is None:
        return
    name = chosen.name
    memory.check_plan_on(chosen, runtime.device, runtime.dtype)
    if chosen.transformer.backend == "gguf" and "transformer" not in chosen.stored:
        raise InputError(f"memory plan {name} draws with a GGUF transformer file; give the model one "
                         f"(transformer: path/to/flux1-dev-Q4_K_S.gguf in its mapping) or another --memory")
    from ..flux.memory_apply import check_backend

    for quantization in (chosen.transformer, chosen.text_encoder):
        check_backend(quantization, runtime.device)


def loading_plan(plan: dict | None) -> memory.Plan | None:
    """The ledger's plan a render's model loads with (model_loading.load_pipeline); None without one."""
    if plan is None or plan.get("plan") is None:
        return None
    stored = tuple(plan.get("already_quantized", ()))
    if not stored:
        return memory.PLAN_NAMES[plan["plan"]]

    def quantization(name: str) -> memory.Quantization:  # a GGUF file's type is not in the table
        return memory.QUANTIZATIONS.get(name) or memory.Quantization(name, 0.0, "gguf", dequantizes_layers=True)
    return memory.Plan(plan["plan"], quantization(plan["quantization"]["transformer"]),
                       quantization(plan["quantization"]["text_encoder"]), plan["offload"],
                       plan["relative_step_time"], vae_tiling=plan["vae_tiling"], stored=stored,
                       text_encoders_leave=plan["text_encoders_leave"])


def plan_for_render(story: Story, source: str, option: str | None, runtime, *, pages=None, panels=None,
                    steps: int | None = None) -> dict | None:
    """The plan a render follows (None without --memory or model.memory), checked against what
    this machine can do; before the model is looked at."""
    asked = story_memory(story, option)
    if asked is None:
        return None
    plan = choose(story, selected_panels(story, source, pages, panels, steps=steps), asked, runtime.device,
                  "--memory" if option is not None else "model.memory")
    check_applicable(plan, runtime)
    return plan


def selected_panels(story: Story, source: str, pages=None, panels=None, seed: int | None = None,
                    steps: int | None = None) -> list[PanelPlan]:
    """The panels --pages / --panels choose (planned without the model's keys)."""
    from ..plan import build_plan
    from .validate import select_panels

    plans = build_plan(story, seed=seed, steps=steps)
    try:
        return [plans[i] for i in sorted(select_panels(plans, pages, panels))]
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def dry_run(story_path: str | Path, *, pages=None, panels=None, seed: int | None = None, steps: int | None = None,
            memory: str | None = None, device: str = "cpu", model=None) -> dict:
    """What `render` would do, without loading a model or writing a file: the panels it would draw
    (those chosen; whether they are already up to date needs the model's key) and, for a FLUX
    story with --memory or model.memory, the memory plan. `model` (e.g. --model) replaces the
    story's `model:` as in a render."""
    from .validate import check_story

    story = check_story(story_path)
    if model is not None:
        story = story.model_copy(update={"model": model})
    selected = selected_panels(story, str(story_path), pages, panels, seed, steps)
    asked = story_memory(story, memory)
    plan = None if asked is None else choose(story, selected, asked, device,
                                             "--memory" if memory is not None else "model.memory")
    return {"story": str(story_path), "title": story.title, "model": str(story.model), "memory_plan": plan,
            "panels": [{"panel": p.index + 1, "page": p.page + 1, "prompt": p.prompt,
                        "characters": [c.name for c in p.characters], "steps": p.num_inference_steps,
                        "resolution": p.resolution} for p in selected]}
