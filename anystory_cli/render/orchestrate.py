"""`render_story`: one story file to pages, in numbered steps (see the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..devices import Request, Runtime, request_runtime, settled
from ..errors import AnyStoryError, InputError
from ..plan import build_plan, group_pages
from .characters import Characters, character_keys
from .compose import compose_pages, done_message, export_stem, prune, write_exports, write_routing_outputs
from .events import ProgressEvent, RenderSummary
from .model import (
    Model,
    check_model_fits,
    generator,
    image_size,
    prompts_encoded,
    story_loras,
    style_loras_on,
    warn_unknown_words,
)
from .memory_plan import describe as describe_plan
from .memory_plan import loading_plan, plan_for_render, story_memory
from .ranks import Ranks
from .signals import Interrupted, at_safe_points, check_stop, stop_requested
from .review import write_review
from .store import (PanelJob, as_stored, check_output_dir, frame_sizes, is_current, panel_job, panel_path,
                    record_runtime, recorded_device)
from .takes import Scorer, check_scorer, draw_takes, prune_takes, with_takes
from .validate import check_story, select_panels


class _Clock:
    """Accumulates seconds per stage: `with clock("render"): ...`."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def first_runtime(request: Request | Runtime, out_dir: Path, asks_memory: bool) -> tuple[Runtime, bool]:
    """The runtime that keys the panels first, and whether it is assumed. A Request for `auto`
    that torch would have to answer is taken, unconfirmed, as the kind of device `auto` gave the
    panels drawn into `out_dir` before (store.recorded_device), so that a render with nothing to
    draw needs no torch; render_story confirms it with torch as soon as a panel must be drawn, and
    rekeys the panels when torch says otherwise. Not under torchrun (its ranks need torch anyway),
    nor for a memory plan (which asks the device's free memory)."""
    if isinstance(request, Runtime):
        return request, False
    known = request.known()
    if known is not None:
        return known, False
    single = Ranks.launched() <= 1
    assumed = request.assuming(recorded_device(out_dir)) if single and not asks_memory else None
    return (assumed, True) if assumed is not None else (request.resolve(), False)


def remember_auto(out: Path, runtime: Runtime) -> None:
    """Keep what `auto` gave beside the panels, when it changed (first_runtime reads it)."""
    if recorded_device(out) != runtime.key()["device"]:
        record_runtime(out, runtime.key())


def render_story(
    story_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pages: Iterable[int] | None = None,
    panels: Iterable[int] | None = None,
    seed: int | None = None,
    steps: int | None = None,
    takes: int | None = None,
    save_routing: bool = False,
    pipeline_factory: Callable[[str, Path], Any] | None = None,
    model_fingerprint: Callable[[str, Path], str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    runtime=None,
    memory: str | None = None,
    model=None,
) -> RenderSummary:
    """Render one story into `out_dir`; see the module docstring.

    `pipeline_factory(model_value, story_dir)` returns an AnyStoryPipeline (default: the real
    loader, `model_loading.load_pipeline`); `model_fingerprint(model_value, story_dir)` keys the
    panels without loading the model (default with the real loader: a hash of the model files).
    `runtime` (devices.Runtime, or a devices.Request still to be resolved; default: from the
    environment and the machine) is what the default loader loads on; its device and precision
    key the panels (`first_runtime`: with --device auto, torch is asked only when a panel must be
    drawn).
    `memory` ('auto', a size or a plan's name, replacing the story's model.memory): the memory
    plan of a FLUX story, chosen and said before the model loads, then loaded with
    (render/memory_plan.py).
    `model` (a value from `story.model_value`, e.g. `--model`) replaces the story's `model:`; its
    relative paths are relative to the current folder.
    `takes` replaces the story's `style.takes` (`takes.py`).
    """
    emit = progress or (lambda event: None)
    source = str(story_path)
    summary = RenderSummary(story=source, out_dir=str(out_dir))
    clock = _Clock(summary.timings)
    start = time.perf_counter()

    # 1. Everything that can be wrong with the input, before any slow or destructive work.
    with clock("check"):
        story = check_story(story_path)
        summary.title = story.title
        story_dir = Path(story_path).resolve().parent
        named_by, model_dir = "model", story_dir
        if model is not None:  # --model: relative to the current folder, said as such in errors
            story, named_by, model_dir = story.model_copy(update={"model": model}), "--model", Path.cwd()
        request = runtime if runtime is not None else request_runtime()
        runtime, assumed = first_runtime(request, Path(out_dir), story_memory(story, memory) is not None)
        # The memory plan before the model is looked at or loaded.
        summary.memory_plan = plan_for_render(story, source, memory, runtime, pages=pages, panels=panels, steps=steps)
        if summary.memory_plan is not None:
            emit(ProgressEvent("note", describe_plan(summary.memory_plan)))
        model = Model(story.model, model_dir, pipeline_factory, model_fingerprint, source, emit, cache_dir,
                      runtime=request, named_by=named_by, plan=loading_plan(summary.memory_plan))
        story = story.with_model_defaults(model.defaults)  # e.g. FLUX's steps and guidance
        loras, lora_keys = story_loras(story, story_dir, source)
        summary.loras = [{"path": str(file), "scale": scale, "sha256": digest} for file, scale, digest in loras]
        sheet_seed = story.seed if seed is None else seed

        def planned(runtime):
            """Every panel planned and keyed for `runtime`, pages, the chosen panels, their jobs."""
            plans = build_plan(story, seed=seed, steps=steps, model_id=model.key,
                               character_keys=character_keys(story, sheet_seed, steps),
                               lora_keys=lora_keys, runtime=runtime.key(), model_defaults=model.defaults,
                               takes=takes)
            try:
                chosen = select_panels(plans, pages, panels)
            except InputError as exc:
                raise InputError(f"{source}: {exc}") from None
            page_plans = group_pages(plans)
            frames = frame_sizes(story, page_plans)
            jobs = {plan.index: with_takes(panel_job(plan, frames[plan.index])) for plan in plans}
            return plans, page_plans, chosen, jobs

        def to_draw(jobs, chosen) -> list[int]:
            # Panels already drawn with the same key are kept (rank 0 looks; every rank uses its list).
            fresh = [i for i in sorted(chosen) if not is_current(jobs[i], out)] if ranks.rank == 0 else []
            return ranks.share(fresh, len(jobs))

        plans, page_plans, chosen, jobs = planned(runtime)
        # After the model's key: a model that is missing leaves no empty output folder behind.
        out = check_output_dir(Path(out_dir))
        ranks = Ranks.current()
        todo = to_draw(jobs, chosen)
        if assumed and todo:  # a panel must be drawn: torch now says where, and the keys follow it
            confirmed = settled(request)
            if confirmed.key() != runtime.key():
                plans, page_plans, chosen, jobs = planned(confirmed)
                todo = to_draw(jobs, chosen)
            runtime, assumed = confirmed, False
        if not assumed and ranks.rank == 0 and isinstance(request, Request) and request.device.lower() == "auto":
            remember_auto(out, runtime)
        summary.runtime = {**runtime.to_dict(), **({"assumed": "as recorded beside the panels"} if assumed else {})}
        todo = [jobs[i] for i in todo]
    drawing = {job.plan.index for job in todo}
    summary.panels_skipped = sorted(i + 1 for i in chosen if i not in drawing)
    emit(ProgressEvent("story", f"{source}: {story.title}", 0, len(todo)))
    if not todo:
        emit(ProgressEvent("note", f"all {len(chosen)} selected panels are up to date; nothing to draw"))

    # 2. Characters once, then the panels (this process's share of them).
    mine = ranks.mine(todo)
    if ranks.world > 1:
        emit(ProgressEvent("note", f"process {ranks.rank + 1} of {ranks.world}: drawing {len(mine)} "
                                   f"of the {len(todo)} panel(s) to draw"))

    def stop() -> None:
        check_stop(source, summary, len(todo))

    failure: BaseException | None = None
    try:
        stop()
        if mine:
            check_model_fits(model.pipeline, plans, source)  # loads the model (stops at once)
            warn_unknown_words(story, model.pipeline, [job.plan for job in mine], source, emit)
            scorer = Scorer(model.pipeline, story, out, source)
            check_scorer(scorer, mine, source)
            characters = Characters(story, source, model, cache_dir, sheet_seed, steps, summary, out, emit)
            needed = list(dict.fromkeys((c.name, c.mirrored) for job in mine for c in job.plan.characters))
            with clock("encode"), at_safe_points():
                characters.encode_all(needed, stop)
            with clock("render"), at_safe_points(), \
                    style_loras_on(model.pipeline, loras, source, characters._warn), \
                    prompts_encoded(model.pipeline, [job.plan.prompt for job in mine]):
                for number, job in enumerate(mine, start=1):
                    stop()
                    emit(ProgressEvent("panel", f"panel {job.plan.index + 1}: {job.plan.prompt}",
                                       number - 1, len(mine)))
                    draw_takes(job, out, functools.partial(_draw_panel, model.pipeline, job, characters.encodings,
                                                           source=source, emit=emit, stop=stop),
                               scorer, emit, (number - 1, len(mine)))
                    summary.panels_rendered.append(job.plan.index + 1)
                    summary.files_written.append(str(panel_path(out, job.plan.index)))
                    emit(ProgressEvent("panel_done", f"panel {job.plan.index + 1}", number, len(mine)))
    except BaseException as exc:  # noqa: BLE001 - every rank must reach the gather below
        failure = exc
        if isinstance(exc, KeyboardInterrupt) and stop_requested():
            try:
                stop()  # the same stop, said with what was finished
            except Interrupted as said:
                failure = said
    summary.model_loaded = model.loaded
    summary.timings["load_model"] = model.load_seconds
    if ranks.world > 1:
        with clock("wait"):  # for the other processes to finish their panels
            others_failed, drawn = ranks.gather(failure is not None,
                                                [n - 1 for n in summary.panels_rendered], len(plans))
        if failure is None and others_failed:
            failure = AnyStoryError(f"{source}: another process of this render failed (see its "
                                    "message); finished panels are kept, run again to finish the rest")
        if failure is None:
            own = set(summary.panels_rendered)
            summary.panels_rendered = [i + 1 for i in drawn]
            summary.files_written += [str(panel_path(out, i)) for i in drawn if i + 1 not in own]
    if failure is not None:
        raise failure
    if ranks.rank != 0:
        summary.timings["total"] = time.perf_counter() - start
        emit(ProgressEvent("done", f"{source}: process {ranks.rank + 1} of {ranks.world} drew its "
                                   "panels; the first process composes the pages"))
        return summary

    # 3. Routing outputs, pages, exports: from the stored panels of every process.
    if save_routing:
        with at_safe_points():
            write_routing_outputs([jobs[i] for i in sorted(chosen)], out, summary)
    with clock("compose"), at_safe_points():
        composed = compose_pages(story, page_plans, jobs, out, summary, emit, stop)
    with clock("export"), at_safe_points():
        if len(composed) == len(page_plans):
            stop()
            write_exports(story, export_stem(story_path), composed, out, summary, emit)
            if pages is None and panels is None:
                prune(out, len(plans), len(page_plans), jobs.values())
                prune_takes(out, list(jobs.values()))
        else:
            waiting = ", ".join(map(str, summary.pages_incomplete))
            emit(ProgressEvent("note", f"PDF and CBZ not written: page(s) {waiting} still have "
                                       "panels to draw"))
    with clock("review"), at_safe_points():
        write_review(story, [jobs[i] for i in sorted(jobs)], out, summary)
    summary.timings["total"] = time.perf_counter() - start
    emit(ProgressEvent("done", done_message(summary)))
    return summary


def _draw_panel(pipeline, job: PanelJob, encodings: dict[tuple[str, bool], Any], seed: int, *, source: str, emit,
                stop: Callable[[], None] = lambda: None):
    """(image, routing maps as stored) of the panel drawn from `seed` (one take, `takes.py`)."""
    plan = job.plan
    width, height = image_size(pipeline, job.multipliers, plan.resolution)

    def on_step(_pipe, step, _timestep, tensors):
        emit(ProgressEvent("step", f"panel {plan.index + 1}", step + 1, plan.num_inference_steps))
        stop()  # between two denoising steps: a signal stops the render here
        return tensors

    try:
        output = pipeline(
            plan.prompt,
            characters=[encodings[c.name, c.mirrored] for c in plan.characters],
            regions=[c.box for c in plan.characters],
            subject_scale=plan.subject_strength,
            reference_scale=plan.reference_strength,
            reference_guidance=plan.reference_guidance,
            # No figure: a sheet whose character could not be cut out (`_from_description`).
            figure_boxes=[c.figure if encodings[c.name, c.mirrored].figure is not None else None
                          for c in plan.characters],
            paste_at=plan.paste_references_at or None,
            return_routing=True,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            guidance_interval=plan.guidance_interval,
            negative_prompt=plan.negative_prompt or None,
            generator=generator(seed),
            height=height,
            width=width,
            callback_on_step_end=on_step,
        )
    except AnyStoryError as exc:
        raise type(exc)(f"{source}: panels[{plan.index}]: {exc}") from None
    return output.images[0].convert("RGB"), as_stored(output.routing_maps[0].float().cpu().numpy())
