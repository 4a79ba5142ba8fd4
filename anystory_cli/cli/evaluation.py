"""`anystory evaluate`: the default model graded by the independent judge (`lab/judge.py`,
`lab/evaluate.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..sd.figures import DEFAULT_PASTE_AT
from ..scores import MAX_TAKES
from ..sd.guidance import DEFAULT_INTERVAL
from . import seams
from .output import guarded, print_adapter_result, print_base_result, print_comparison, quiet_libraries


evaluate_app = typer.Typer(help="Grade the default model with the independent judge (trained on "
                           "rendered scenes only).", no_args_is_help=True)


def _check_report_dir(report: Optional[Path]) -> None:
    """A report folder that cannot be written fails before minutes of drawing, not after."""
    if report is not None:
        from ..render import check_output_dir

        check_output_dir(report)


DEFAULT_INTERVAL_TEXT = ",".join(f"{v:g}" for v in DEFAULT_INTERVAL)  # "0,0.7"


GUIDANCE_INTERVAL_OPTION = typer.Option(DEFAULT_INTERVAL_TEXT, "--guidance-interval", metavar="LOW,HIGH",
                                        help="Guide only the steps whose noise level t/T lies in [LOW, HIGH] "
                                        "(0 clean, 1 pure noise), as a story's style does by default; 0,1 "
                                        "guides every step.")


def _guidance_interval(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high), checked as a story's style.guidance_interval is."""
    from ..errors import InputError
    from ..sd.guidance import check_interval

    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--guidance-interval {text!r}: expected LOW,HIGH, e.g. 0,0.7") from None
    try:
        return check_interval((low, high))
    except InputError as exc:
        raise InputError(f"--guidance-interval {text!r}: {exc}") from None


PANEL_SHAPE_OPTION = typer.Option(None, "--shape", metavar="HxW", help="Panel shape in pixels, e.g. 64x128 "
                                  "(wide) or 128x64 (tall); multiples of 16. Default: the judge's 64x64 square.")


def _panel_shape(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W): the base draws 64x64 pictures through a factor-4 VAE and a UNet that halves
    its latent twice, so both sides must be multiples of 16 (32 to 256)."""
    from ..errors import InputError

    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--shape {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 64x128") from None
    if not all(32 <= side <= 256 and side % 16 == 0 for side in (height, width)):
        raise InputError(f"--shape {text!r}: each side must be a multiple of 16 from 32 to 256")
    return height, width


@evaluate_app.command("base")
def evaluate_base_command(
    samples: int = typer.Option(64, "--samples", min=1, max=10000, help="Held-out captions to draw."),
    steps: int = typer.Option(25, "--steps", min=1, max=500, help="Denoising steps."),
    guidance: float = typer.Option(4.0, "--guidance", min=1.0, max=50.0, help="Classifier-free guidance."),
    guidance_interval: str = GUIDANCE_INTERVAL_OPTION,
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Chooses the captions and the noise."),
    shape: Optional[str] = PANEL_SHAPE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for grid.png (generated beside "
                                          "rendered, with the judge's verdicts) and report.json."),
    assets: Optional[Path] = typer.Option(None, "--assets", help="Folder of the default model's assets "
                                          "(default: the shipped ones)."),
) -> None:
    """Draw held-out captions with the base model; judge place, time, count and positions.

    Beside each figure: the judge's own accuracy on the rendered scenes of the same captions.
    Goal: scene and count accuracy >= 0.90 on the generated images.
    """
    with guarded(as_json):
        from ..lab.evaluate import evaluate_base, json_safe
        from ..lab.judge import load_judge

        quiet_libraries()
        import torch

        _check_report_dir(report)
        panel_shape = _panel_shape(shape) if shape is not None else None
        interval = _guidance_interval(guidance_interval)
        judge = load_judge()
        if seams.BASE_PIPELINE_FACTORY is not None:
            pipe = seams.BASE_PIPELINE_FACTORY(assets)
        else:
            from ..default_model import DEFAULT_ASSETS, load_default_base

            pipe, _ = load_default_base(assets if assets is not None else DEFAULT_ASSETS)

        def progress(done: int, total: int) -> None:
            if not as_json:
                typer.echo(f"drawn {done}/{total}", err=True)

        with torch.inference_mode():
            result = evaluate_base(pipe, judge, n_samples=samples, seed=seed, steps=steps, guidance=guidance,
                                   shape=panel_shape, report_dir=report, progress=progress,
                                   guidance_interval=interval)
        if as_json:
            typer.echo(json.dumps(json_safe({"ok": True, **{k: v for k, v in result.items() if k != "records"}}),
                                  indent=2, allow_nan=False))
            return
        print_base_result(result, samples, steps, seed, report is not None)


@evaluate_app.command("adapter")
def evaluate_adapter_command(
    panels: int = typer.Option(16, "--panels-per-count", min=1, max=1000,
                               help="Held-out panels with each number of characters (1-4)."),
    steps: int = typer.Option(25, "--steps", min=1, max=500, help="Denoising steps."),
    guidance: float = typer.Option(4.0, "--guidance", min=1.0, max=50.0, help="Classifier-free guidance."),
    guidance_interval: str = GUIDANCE_INTERVAL_OPTION,
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Chooses the panels and the noise."),
    subject_strength: float = typer.Option(1.0, "--subject-strength", min=0.0, max=4.0,
                                           help="Weight of the character tokens (eta), as a story's style."),
    reference_strength: float = typer.Option(0.0, "--reference-strength", min=-10.0, max=10.0,
                                             help="Bias towards reference features (gamma), as a story's style."),
    reference_guidance: bool = typer.Option(True, "--reference-guidance/--no-reference-guidance",
                                            help="Guidance amplifies the references too, as a story's style."),
    paste_at: float = typer.Option(DEFAULT_PASTE_AT, "--paste-references-at", min=0.0, max=1.0,
                                   help="Noise level t/T at which the references are pasted into their places "
                                   "(0: never), as a story's style."),
    distractors: int = typer.Option(9, "--distractors", min=1, max=200,
                                    help="Other held-out identities each character is told apart from."),
    routing_scenes: int = typer.Option(12, "--routing-scenes", min=1, max=1000,
                                       help="Noised rendered scenes for the routing IoU (squares, whatever "
                                       "--shape)."),
    shape: Optional[str] = PANEL_SHAPE_OPTION,
    counts: str = typer.Option("1,2,3,4", "--counts", metavar="N,N,...",
                               help="Numbers of characters per panel to draw (1-4), e.g. 1,2: the larger counts "
                               "left out, the panels of the others stay the same."),
    takes: int = typer.Option(1, "--takes", min=1, max=MAX_TAKES,
                              help="Draw each AnyStory panel up to this many times and keep the take the identity "
                              "scores pick, as a story's style.takes; the judge grades every take."),
    min_identity: Optional[float] = typer.Option(None, "--min-identity", min=0.0, max=1.0,
                                                 help="Stop drawing takes of a panel once one scores at least "
                                                 "this (style.min_identity); default: draw every take."),
    variants: str = typer.Option(",".join(["anystory", "no_paste", "no_router", "no_reference_net", "no_subject_tokens",
                                           "text_only"]), "--variants",
                                 help="Comma-separated: anystory and any ablations to draw beside it."),
    model: str = typer.Option("default", "--model", help="The UNet model to grade: 'default', a model folder, a hub "
                              "id (org/name) or a model file (see `anystory render`); FLUX models are not graded "
                              "here (the judge knows the sprite world only)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="An adapter file or folder from `anystory "
                                           "train` (e.g. runs/…/adapter.safetensors), or a hub id, to "
                                           "grade on --model's base instead of its own adapter."),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as one JSON object on stdout."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for index.html, samples.png, "
                                          "routing.png and report.json."),
) -> None:
    """Grade AnyStory on identities never seen in training.

    Per character at its place: identity (picked out among its panel's characters and distractors
    by the judge), blending (taken for another character of the panel), all attributes; the
    router as a segmenter (IoU on noised rendered scenes); placement; the ablations drawn from
    the same noise; beside each figure, the judge's own on the rendered scenes.
    """
    with guarded(as_json):
        from ..lab.evaluate import evaluate_adapter, json_safe
        from ..lab.judge import load_judge

        quiet_libraries()
        import torch

        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        drawn_counts = _counts(counts)
        interval = _guidance_interval(guidance_interval)
        panel_shape = _panel_shape(shape) if shape is not None else None
        _check_report_dir(report)
        pipe = _adapter_pipeline(model, adapter)
        judge = load_judge()

        def progress(stage: str, done: int, total: int) -> None:
            if not as_json and (done == total or done % 10 == 0):
                typer.echo(f"{'drawn' if stage == 'draw' else 'routing scenes'} {done}/{total}", err=True)

        with torch.inference_mode():
            result = evaluate_adapter(pipe, judge, panels_per_count=panels, seed=seed, steps=steps, guidance=guidance,
                                      distractors=distractors, routing_scenes=routing_scenes, variants=chosen,
                                      report_dir=report, progress=progress, guidance_interval=interval,
                                      subject_strength=subject_strength, reference_strength=reference_strength,
                                      shape=panel_shape, reference_guidance=reference_guidance,
                                      paste_at=paste_at, takes=takes, min_identity=min_identity,
                                      counts=drawn_counts)
        if as_json:
            typer.echo(json.dumps(json_safe({"ok": True, **result}), indent=2, allow_nan=False))
            return
        print_adapter_result(result)


def _counts(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2): numbers of characters per panel, each 1-4."""
    from ..errors import InputError

    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise InputError(f"--counts {text!r}: expected numbers of characters such as 1,2") from None
    if not values or not all(1 <= v <= 4 for v in values):
        raise InputError(f"--counts {text!r}: each count must be 1, 2, 3 or 4")
    return values


@evaluate_app.command("compare")
def evaluate_compare_command(
    before: list[Path] = typer.Option(..., "--before", help="An `evaluate adapter --json` output (repeat the "
                                      "option for more seeds; paired with --after in order)."),
    after: list[Path] = typer.Option(..., "--after", help="The run to compare with it: the same seed and panels "
                                     "per count, another setting."),
    before_variant: str = typer.Option("anystory", "--before-variant", help="Variant read from --before."),
    after_variant: str = typer.Option("anystory", "--after-variant", help="Variant read from --after."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as one JSON object on stdout."),
) -> None:
    """Compare two settings on the same panels and noise, character by character.

    Per character count: identity before and after, the characters only one of them picks out
    right, and a sign test on those; pooled over every --before/--after pair. Draws nothing.
    """
    with guarded(as_json):
        from ..errors import InputError
        from ..lab.evaluate import compare_adapter_runs

        if len(before) != len(after):
            raise InputError(f"{len(before)} --before file(s) but {len(after)} --after: give them in pairs")
        pairs = [(_evaluation_json(a), _evaluation_json(b)) for a, b in zip(before, after)]
        result = compare_adapter_runs(pairs, before_variant, after_variant)
        if as_json:
            typer.echo(json.dumps({"ok": True, **result}, indent=2))
            return
        print_comparison(result)


def _evaluation_json(path: Path) -> dict:
    """An `evaluate adapter --json` output (or a report's report.json), or one clear error."""
    from ..errors import InputError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("panels"), list) or "variants" not in data:
        raise InputError(f"{path}: not the output of `anystory evaluate adapter --json` (no panels)")
    return data


def _adapter_pipeline(model: str, adapter: Optional[Path]):
    """The AnyStoryPipeline to grade: `model` as `render` loads it, with `adapter` instead of its own.
    A FLUX model is refused: the judge grades the sprite world's UNet models, and the grading
    turns the paper's components (QFormer, ReferenceNet, paste) off one by one."""
    from ..errors import InputError
    from ..model_loading import is_flux, load_pipeline
    from .rendering import model_value

    value = model_value(model)
    if is_flux(value, Path.cwd()):
        raise InputError(f"--model {model}: a FLUX model; `evaluate adapter` grades UNet AnyStory models (the "
                         "embedded one, or a folder from `anystory train`) on the sprite world")
    if seams.PIPELINE_FACTORY is not None and adapter is None:
        return seams.PIPELINE_FACTORY(value, Path.cwd())
    return load_pipeline(value, Path.cwd(), adapter=adapter)
