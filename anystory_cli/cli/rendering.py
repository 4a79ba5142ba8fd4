"""`anystory validate`, `schema`, `models`, `encode-character` and `render`: stories to pages."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..scores import MAX_TAKES
from . import seams
from .output import (PlainProgress, QuietProgress, RichProgress, colour, guarded, print_error, print_summary,
                     print_warning, quiet_libraries)

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}\Z")  # \Z: '$' lets 'mira\n' through

MODEL_HELP = ("a built-in name (default, anystory-flux: `anystory models`), a model folder, a model file "
              "(.yaml/.json holding a story's `model:` mapping), a hub id (org/name), or an inline mapping "
              "'{base: ..., redux: ..., adapter: ...}'; relative paths are relative to the current folder")


def _model_option(default: Optional[str], what: str):
    return typer.Option(default, "--model", help=f"{what}: {MODEL_HELP}.")


def model_value(text: Optional[str]):
    """--model as a story's `model:` value (paths relative to the current folder); one error line."""
    if text is None:
        return None
    from ..story import model_value as checked

    return checked(text, f"--model {text}", Path.cwd())


def validate(
    stories: list[Path] = typer.Argument(..., help="Story files (YAML).", show_default=False,
                                       metavar="STORY"),
    model: Optional[str] = _model_option(None, "Check the stories with this model instead of their own"),
) -> None:
    """Check stories without drawing: every problem, one per line, with its location."""
    with guarded():
        from ..render import story_problems

        replacement = model_value(model)
        failed = False
        for path in stories:
            problems = story_problems(path, replacement)
            for problem in problems:
                print_error(problem)
            if problems:
                failed = True
            else:
                typer.echo(f"ok: {path}")
        if failed:
            raise typer.Exit(1)


def schema() -> None:
    """Print the JSON Schema of the story format (for editors)."""
    with guarded():
        from ..story import story_json_schema

        typer.echo(json.dumps(story_json_schema(), indent=2))


def models(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the built-in model names: what each is, what it needs, whether it is here.

    Memory: the weights at once without offload; disk: what its files take. Whether a published
    model is in the Hugging Face cache is looked up there; nothing is downloaded.
    """
    with guarded(as_json):
        from ..model_loading import builtin_models

        listed = builtin_models()
        if as_json:
            typer.echo(json.dumps({"ok": True, "models": listed}, indent=2))
            return
        for entry in listed:
            typer.echo(f"{entry['name']}: {entry['summary']}")
            typer.echo(f"  memory {_size(entry['memory_gib'], 'GiB', 1024, 'MiB')} ({entry['memory_note']}), "
                       f"disk {_size(entry['disk_gb'], 'GB', 1000, 'MB')}, {entry['here']}")
            typer.echo("  samples with " + ", ".join(f"{k} {v}" for k, v in entry["defaults"].items())
                       + " unless a story's style says otherwise")
            for field, part in entry["parts"].items():
                typer.echo(f"  {field}: {part}")


def _size(value: float, unit: str, per: int, small_unit: str) -> str:
    return f"{value:.1f} {unit}" if value >= 1 else f"{value * per:.0f} {small_unit}"


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise typer.BadParameter("start with a letter; use letters, digits, '_' or '-' (at most 40)")
    return value


def _device_option():
    return typer.Option(None, "--device", help="Where to run: auto (cuda, then mps, then cpu), cpu, cuda, "
                        "cuda:N or mps (default: $ANYSTORY_DEVICE, else auto).")


def _dtype_option():
    return typer.Option(None, "--dtype", help="Precision: auto (bfloat16 on cuda, float32 elsewhere), "
                        "float32, bfloat16 or float16 (default: $ANYSTORY_DTYPE, else auto).")


def _offload_option():
    return typer.Option(False, "--offload", help="Model CPU offload for small GPUs: each model on the GPU "
                        "only while it runs (CUDA only; also ANYSTORY_OFFLOAD=1).")


def _runtime(device: Optional[str], dtype: Optional[str], offload: bool):
    """The devices.Runtime the options ask for (the environment fills in what they leave out)."""
    from ..devices import resolve_runtime

    return resolve_runtime(device, dtype, True if offload else None)


def _request(device: Optional[str], dtype: Optional[str], offload: bool):
    """What the options ask for, as a devices.Request a render resolves only when it draws."""
    from ..devices import request_runtime

    return request_runtime(device, dtype, True if offload else None)


def encode_character(
    image: Path = typer.Argument(..., help="Reference image; its alpha channel is the mask.",
                                 show_default=False),
    name: str = typer.Option(..., "--name", callback=_check_name, help="The character's name."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Mask image (white = the character)."),
    model: str = _model_option("default", "The model that encodes"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (default: "
                                         "$ANYSTORY_CACHE, else the user cache folder: "
                                         "$XDG_CACHE_HOME/anystory or ~/.cache/anystory on Linux)."),
    card: Optional[Path] = typer.Option(None, "--card", help="Where to write the character card "
                                        "(default: NAME-card.png here)."),
    device: Optional[str] = _device_option(),
    dtype: Optional[str] = _dtype_option(),
    offload: bool = _offload_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Encode a character once into the cache, as a render with the same model does; write its card.

    A story that uses the same image (and mask) with the same model then encodes nothing.
    """
    with guarded(as_json):
        from ..render.sheets import encode_character_file

        value = model_value(model)
        runtime = _runtime(device, dtype, offload)
        factory = seams.PIPELINE_FACTORY
        if factory is None:
            from ..model_loading import load_pipeline

            factory = functools.partial(load_pipeline, runtime=runtime)
        quiet_libraries()
        result = encode_character_file(
            image, name, mask_path=mask, model=value, cache_dir=cache,
            card_path=card or Path(f"{name}-card.png"), pipeline_factory=factory,
        )
        state = "already cached" if result.hit else ("re-encoded" if result.rebuilt else "encoded")
        if as_json:
            typer.echo(json.dumps({
                "ok": True, "name": name, "state": state, "cache_path": str(result.cache_path),
                "card_path": None if result.card_path is None else str(result.card_path),
                "model_id": result.model_id, "runtime": runtime.to_dict(), "warnings": result.warnings,
            }, indent=2))
            return
        for warning in result.warnings:
            print_warning(warning)
        typer.echo(f"{name}: {state} -> {result.cache_path}")
        typer.echo(f"card: {result.card_path}")


def _ranges(value: Optional[str]) -> Optional[list[int]]:
    """--pages / --panels callback: '1,3-4' -> [1, 3, 4]; a bad range is a usage error (2)."""
    if value is None:
        return None
    from ..errors import InputError
    from ..render import parse_ranges

    try:
        return parse_ranges(value)
    except InputError as exc:
        raise typer.BadParameter(str(exc)) from None


def _out_dirs(stories: list[Path], out: Optional[Path]) -> list[Path]:
    """--out DIR for one story; DIR/<story name> for several; default out/<story name>."""
    if out is not None and len(stories) == 1:
        return [out]
    root = out if out is not None else Path("out")
    folders, seen = [], {}
    for path in stories:
        stem = path.stem if path.stem not in ("", ".", "..") else "story"  # '...yaml' -> '..'
        seen[stem] = seen.get(stem, 0) + 1
        folders.append(root / (stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"))
    return folders


def render(
    stories: list[Path] = typer.Argument(..., help="Story files (YAML).", show_default=False,
                                       metavar="STORY"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: "
                                       "out/<story name>; with several stories, one folder each "
                                       "inside it)."),
    pages: Optional[str] = typer.Option(None, "--pages", callback=_ranges,
                                        help="Only draw the panels of these pages, e.g. 1-2."),
    panels: Optional[str] = typer.Option(None, "--panels", callback=_ranges,
                                         help="Only draw these panels, e.g. 1,3-4."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1,
                                       help="Replace the story seed."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=500,
                                        help="Replace the denoising steps."),
    takes: Optional[int] = typer.Option(None, "--takes", min=1, max=MAX_TAKES,
                                        help="Replace style.takes: draw each panel with characters up to this "
                                        "many times and keep the take whose characters score best."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    save_routing: bool = typer.Option(False, "--save-routing", help="Write each panel's routing "
                                      "maps (.npy) and an overlay (.png) next to it."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Character cache folder."),
    model: Optional[str] = _model_option(None, "Draw with this model instead of the story's `model:`"),
    device: Optional[str] = _device_option(),
    dtype: Optional[str] = _dtype_option(),
    offload: bool = _offload_option(),
    memory: Optional[str] = typer.Option(None, "--memory", help="FLUX: plan for this much device memory, auto "
                                         "(the GPU's free memory) or a size such as 16GB (binary units), or "
                                         "follow the plan named, e.g. int8 (docs/flux.md); replaces the "
                                         "story's model.memory. The plan is said before the model loads, "
                                         "which loads with it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say the panels it would draw and the memory plan "
                                 "with its estimated peak; load no model, write nothing."),
) -> None:
    """Draw the panels, compose the pages, write PNG pages, a PDF and a CBZ.

    Panels that are already drawn and unchanged are not drawn again: re-running an unchanged
    story writes nothing and says so. --pages and --panels choose what to draw; the PDF and
    CBZ are written once every page is complete. Ctrl-C stops at the next step (exit 130,
    SIGTERM 143); run again to finish. Under `torchrun --nproc-per-node N -m anystory_cli.cli
    render ...` the processes share the panels out.
    """
    page_numbers, panel_numbers = pages, panels  # lists of numbers, from the _ranges callback
    if dry_run:
        _dry_run(stories, page_numbers, panel_numbers, seed, steps, memory, model, device, dtype, offload, as_json)
        return
    summaries: list[Any] = []
    with guarded(as_json, extra=lambda: {"stories": [s.to_dict() for s in summaries]}):
        from ..render import Interrupted, memoize_factory, render_story, stop_on_signals

        replacement = model_value(model)
        runtime = _request(device, dtype, offload)
        fingerprint = seams.MODEL_FINGERPRINT
        if seams.PIPELINE_FACTORY is None:
            from ..model_loading import load_pipeline, model_fingerprint

            factory = memoize_factory(functools.partial(load_pipeline, runtime=runtime))
            fingerprint = model_fingerprint
        else:
            factory = memoize_factory(seams.PIPELINE_FACTORY)
        quiet_libraries()
        # Under torchrun / accelerate launch only the first process reports; every one draws.
        first = _rank() == 0
        reporter = (RichProgress() if colour(sys.stderr) and not as_json else PlainProgress()) \
            if first else QuietProgress()
        try:
            with stop_on_signals():  # Ctrl-C / SIGTERM: stop at the next safe point, say what is done
                for story, folder in zip(stories, _out_dirs(stories, out)):
                    summaries.append(render_story(
                        story, folder, pages=page_numbers, panels=panel_numbers, seed=seed,
                        steps=steps, takes=takes, save_routing=save_routing, pipeline_factory=factory,
                        model_fingerprint=fingerprint, cache_dir=cache, progress=reporter,
                        runtime=runtime, memory=memory, model=replacement,
                    ))
        except Interrupted as stopped:
            if stopped.summary is not None:
                summaries.append(stopped.summary)
            raise
        finally:
            reporter.close()
        if not first:
            return
        if as_json:
            typer.echo(json.dumps({"ok": True, "stories": [s.to_dict() for s in summaries]}, indent=2))
        else:
            for summary in summaries:
                print_summary(summary)


def _dry_run(stories, pages, panels, seed, steps, memory, model, device, dtype, offload, as_json) -> None:
    with guarded(as_json):
        from ..render.memory_plan import describe, dry_run

        replacement = model_value(model)
        runtime = _runtime(device, dtype, offload)
        results = [dry_run(path, pages=pages, panels=panels, seed=seed, steps=steps, memory=memory,
                           device=runtime.device, model=replacement) for path in stories]
        if as_json:
            typer.echo(json.dumps({"ok": True, "dry_run": True, "runtime": runtime.to_dict(), "stories": results},
                                  indent=2))
            return
        for result in results:
            typer.echo(f"{result['story']}: {result['title']} (model {result['model']}; dry run, nothing drawn)")
            if result["memory_plan"] is not None:
                typer.echo(describe(result["memory_plan"]))
            for panel in result["panels"]:
                who = ", ".join(panel["characters"]) or "no characters"
                typer.echo(f"  panel {panel['panel']} (page {panel['page']}, {who}): {panel['prompt']}")


def _rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when alone)."""
    from ..render.ranks import Ranks

    if Ranks.launched() <= 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0
