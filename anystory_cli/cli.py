"""The `anystory` command: the only module that imports typer or rich.

Everything heavy (pydantic, torch, diffusers) is imported inside the commands, so `--help` and
`--version` answer at once. Library errors (`AnyStoryError`) become one line on stderr — red on
a terminal, plain otherwise or with NO_COLOR — and exit code 1; usage errors exit 2; an
unexpected exception prints a short line and a hint to rerun with --debug for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from .figures import DEFAULT_PASTE_AT
from .guidance import DEFAULT_INTERVAL

# The seams tests use to put a tiny real pipeline in place of the model loader:
# PIPELINE_FACTORY(model_value, story_dir) -> AnyStoryPipeline, MODEL_FINGERPRINT(model_value,
# story_dir) -> str. None means the real loader in `model_loading`.
PIPELINE_FACTORY: Optional[Callable[[str, Path], Any]] = None
MODEL_FINGERPRINT: Optional[Callable[[str, Path], str]] = None

EXIT_INTERRUPTED = 130
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}\Z")  # \Z: '$' lets 'mira\n' through

app = typer.Typer(
    name="anystory",
    help="Turn a YAML story into comic pages whose characters stay the same person "
    "(AnyStory, arXiv 2501.09503).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _State:
    debug = False


# --------------------------------------------------------------------------------------------
# Output: one line per error, colour only on a terminal without NO_COLOR
# --------------------------------------------------------------------------------------------


def _colour(stream) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _print_error(message: str) -> None:
    _print_line(f"error: {_one_line(message)}", style="red")


def _print_warning(message: str) -> None:
    _print_line(f"warning: {_one_line(message)}", style="yellow")


def _print_line(line: str, style: str) -> None:
    """One line on stderr, coloured only on a terminal that wants colour."""
    if _colour(sys.stderr):
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(line, style=style, markup=False)
    else:
        typer.echo(line, err=True)


def _fail(message: str, code: int = 1, as_json: bool = False, extra: dict | None = None):
    _print_error(message)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": _one_line(message), "exit_code": code, **(extra or {})}))
    raise typer.Exit(code)


def _guarded(as_json: bool = False, extra: Callable[[], dict] | None = None):
    """Run a command body; turn errors into one line and an exit code."""
    from .errors import AnyStoryError

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, _traceback):
            if error is None or isinstance(error, (typer.Exit, typer.Abort, SystemExit)):
                return False
            details = extra() if extra else {}
            if isinstance(error, AnyStoryError):
                _fail(str(error), error.exit_code, as_json, details)
            if isinstance(error, KeyboardInterrupt):
                # render.Interrupted (SIGINT/SIGTERM at a safe point) says what was finished.
                _fail(str(error) or "interrupted; finished files are kept, rerun to continue",
                      getattr(error, "exit_code", EXIT_INTERRUPTED), as_json, details)
            if _State.debug or not isinstance(error, Exception):
                return False  # --debug: let Python print the traceback
            _fail(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                  1, as_json, details)
            return False

    return _Guard()


# --------------------------------------------------------------------------------------------
# Global options
# --------------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anystory {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of unexpected errors."),
) -> None:
    _State.debug = debug


# --------------------------------------------------------------------------------------------
# validate, schema
# --------------------------------------------------------------------------------------------


@app.command()
def validate(
    stories: list[Path] = typer.Argument(..., help="Story files (YAML).", show_default=False,
                                       metavar="STORY"),
) -> None:
    """Check stories without drawing: every problem, one per line, with its location."""
    with _guarded():
        from .render import story_problems

        failed = False
        for path in stories:
            problems = story_problems(path)
            for problem in problems:
                _print_error(problem)
            if problems:
                failed = True
            else:
                typer.echo(f"ok: {path}")
        if failed:
            raise typer.Exit(1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the story format (for editors)."""
    with _guarded():
        from .story import story_json_schema

        typer.echo(json.dumps(story_json_schema(), indent=2))


# --------------------------------------------------------------------------------------------
# import: stories from other tools' files
# --------------------------------------------------------------------------------------------

import_app = typer.Typer(help="Turn other tools' files into stories.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("storyboard")
def import_storyboard_command(
    script: Path = typer.Argument(..., help="A script of the AnyStory storyboard tool (JSON).",
                                  show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Story file to write (default: print "
                                       "the story on stdout). Replaced only once it is complete."),
    model: str = typer.Option("default", "--model", help="The story's `model:` value."),
) -> None:
    """A story from a storyboard script: each role a text-only character, each shot a panel
    (its prompt with the role aliases replaced by the characters' names, its narration the
    caption)."""
    with _guarded():
        from .atomic import atomic_path
        from .storyboard import import_storyboard, lettering_warning, read_script

        base_dir = out.parent if out is not None else Path.cwd()
        result = import_storyboard(read_script(script), str(script), model=model,
                                   base_dir=base_dir)
        for warning in [*result.warnings, lettering_warning(result.story, str(script))]:
            if warning:
                _print_warning(warning)
        if out is None:
            typer.echo(result.yaml_text, nl=False)
            return
        with atomic_path(out) as temp:
            temp.write_text(result.yaml_text, encoding="utf-8")
        story = result.story
        typer.echo(f"ok: {len(story.get('characters', {}))} characters, {len(story['panels'])} "
                   f"panels -> {out}")


# --------------------------------------------------------------------------------------------
# encode-character
# --------------------------------------------------------------------------------------------


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
    from .devices import resolve_runtime

    return resolve_runtime(device, dtype, True if offload else None)


@app.command("encode-character")
def encode_character(
    image: Path = typer.Argument(..., help="Reference image; its alpha channel is the mask.",
                                 show_default=False),
    name: str = typer.Option(..., "--name", callback=_check_name, help="The character's name."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Mask image (white = the character)."),
    model: str = typer.Option("default", "--model", help="'default' or a local model folder."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (default: "
                                         "$ANYSTORY_CACHE, else ~/.cache/anystory)."),
    card: Optional[Path] = typer.Option(None, "--card", help="Where to write the character card "
                                        "(default: NAME-card.png here)."),
    device: Optional[str] = _device_option(),
    dtype: Optional[str] = _dtype_option(),
    offload: bool = _offload_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Encode a character once (QFormer + ReferenceNet) into the cache; write its card."""
    with _guarded(as_json):
        from .characters import encode_character_file

        runtime = _runtime(device, dtype, offload)
        factory = PIPELINE_FACTORY
        if factory is None:
            from .model_loading import load_pipeline

            factory = functools.partial(load_pipeline, runtime=runtime)
        _quiet_libraries()
        result = encode_character_file(
            image, name, mask_path=mask, model=model, cache_dir=cache,
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
            _print_warning(warning)
        typer.echo(f"{name}: {state} -> {result.cache_path}")
        typer.echo(f"card: {result.card_path}")


# --------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------


def _ranges(value: Optional[str]) -> Optional[list[int]]:
    """--pages / --panels callback: '1,3-4' -> [1, 3, 4]; a bad range is a usage error (2)."""
    if value is None:
        return None
    from .errors import InputError
    from .render import parse_ranges

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


class _PlainProgress:
    """One line per event on stderr, for logs and CI."""

    def __call__(self, event) -> None:
        kind, message = event.kind, event.message
        if kind == "story":
            line = f"{message}: {event.total} panel(s) to draw"
        elif kind == "character" and event.total:
            line = f"character {event.current}/{event.total} {message}"
        elif kind == "panel":
            line = f"[{event.current + 1}/{event.total}] {message}"
        elif kind == "page":
            line = f"wrote {message}"
        elif kind == "export":
            line = f"wrote {message}"
        elif kind in ("note", "model", "character"):
            line = message
        elif kind == "warning":
            _print_warning(message)
            return
        else:
            return  # step, panel_done, done: too chatty, or said by the summary
        typer.echo(_one_line(line), err=True)

    def close(self) -> None:
        pass


class _RichProgress:
    """Bars for characters, panels and denoising steps, with ETA, on a terminal."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeRemainingColumn)

        self.console = Console(stderr=True, highlight=False)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
            MofNCompleteColumn(), TimeRemainingColumn(), console=self.console,
        )
        self.progress.start()
        self.tasks: dict[str, Any] = {}

    def _task(self, name: str, total: int, description: str):
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(description, total=total)
        self.progress.update(self.tasks[name], total=total, description=description)
        return self.tasks[name]

    def __call__(self, event) -> None:
        kind = event.kind
        if kind == "story":
            for task in self.tasks.values():
                self.progress.remove_task(task)
            self.tasks.clear()
            self._say(event.message, "bold")
            self._task("panels", max(event.total, 1), "panels")
        elif kind == "character" and event.total:
            task = self._task("characters", event.total, f"characters: {event.message}")
            self.progress.update(task, completed=event.current)
        elif kind == "panel":
            self.progress.update(self._task("panels", event.total, event.message), completed=event.current)
        elif kind == "panel_done":
            self.progress.update(self._task("panels", event.total, "panels"), completed=event.current)
        elif kind == "step":
            self.progress.update(self._task("steps", event.total, "steps"), completed=event.current)
        elif kind == "warning":
            self._say(f"warning: {event.message}", "yellow")
        elif kind in ("page", "export"):
            self._say(f"wrote {event.message}", "dim")
        elif kind in ("note", "model", "character"):
            self._say(event.message, "dim")

    def _say(self, message: str, style: str) -> None:
        from rich.text import Text

        # A styled Text, not console.print(style=...): that style would leak into the live bars.
        self.console.print(Text(message, style=style))

    def close(self) -> None:
        self.progress.stop()


@app.command()
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    save_routing: bool = typer.Option(False, "--save-routing", help="Write each panel's routing "
                                      "maps (.npy) and an overlay (.png) next to it."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Character cache folder."),
    device: Optional[str] = _device_option(),
    dtype: Optional[str] = _dtype_option(),
    offload: bool = _offload_option(),
) -> None:
    """Draw the panels, compose the pages, write PNG pages, a PDF and a CBZ.

    Panels that are already drawn and unchanged are not drawn again: re-running an unchanged
    story writes nothing and says so. --pages and --panels choose what to draw; the PDF and
    CBZ are written once every page is complete. Ctrl-C stops at the next step (exit 130,
    SIGTERM 143); run again to finish. Under `torchrun --nproc-per-node N -m anystory_cli.cli
    render ...` the processes share the panels out.
    """
    page_numbers, panel_numbers = pages, panels  # lists of numbers, from the _ranges callback
    summaries: list[Any] = []
    with _guarded(as_json, extra=lambda: {"stories": [s.to_dict() for s in summaries]}):
        from .render import Interrupted, memoize_factory, render_story, stop_on_signals

        runtime = _runtime(device, dtype, offload)
        fingerprint = MODEL_FINGERPRINT
        if PIPELINE_FACTORY is None:
            from .model_loading import load_pipeline, model_fingerprint

            factory = memoize_factory(functools.partial(load_pipeline, runtime=runtime))
            fingerprint = model_fingerprint
        else:
            factory = memoize_factory(PIPELINE_FACTORY)
        _quiet_libraries()
        # Under torchrun / accelerate launch only the first process reports; every one draws.
        first = _rank() == 0
        reporter = (_RichProgress() if _colour(sys.stderr) and not as_json else _PlainProgress()) \
            if first else _QuietProgress()
        try:
            with stop_on_signals():  # Ctrl-C / SIGTERM: stop at the next safe point, say what is done
                for story, folder in zip(stories, _out_dirs(stories, out)):
                    summaries.append(render_story(
                        story, folder, pages=page_numbers, panels=panel_numbers, seed=seed,
                        steps=steps, save_routing=save_routing, pipeline_factory=factory,
                        model_fingerprint=fingerprint, cache_dir=cache, progress=reporter,
                        runtime=runtime,
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
                _print_summary(summary)


def _rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when alone)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
    except ValueError:
        return 0


class _QuietProgress:
    """Processes other than the first: warnings only (errors are printed by the guard)."""

    def __call__(self, event) -> None:
        if event.kind == "warning":
            _print_warning(event.message)

    def close(self) -> None:
        pass


def _print_summary(summary) -> None:
    if summary.up_to_date:
        typer.echo(f"{summary.story}: up to date, nothing to do "
                   f"({len(summary.panels_skipped)} panel(s) unchanged) -> {summary.out_dir}")
        return
    parts = [f"{len(summary.panels_rendered)} panel(s) drawn",
             f"{len(summary.panels_skipped)} unchanged",
             f"{len(summary.pages_written)} page(s) written"]
    if summary.exports_written:
        parts.append(" + ".join(summary.exports_written))
    if summary.pages_incomplete:
        parts.append(f"page(s) {', '.join(map(str, summary.pages_incomplete))} incomplete")
    typer.echo(f"{summary.story}: {', '.join(parts)} -> {summary.out_dir} "
               f"({summary.timings.get('total', 0.0):.1f} s)")


# --------------------------------------------------------------------------------------------
# train: AnyStory adapters (stage 1 / 2) and the default model's base models
# --------------------------------------------------------------------------------------------


class _TrainProgress:
    """A rich bar with the losses and speed on a terminal; otherwise one line per `every` steps
    (and per checkpoint) on stderr. With --json, every event is one JSON line on stdout."""

    def __init__(self, as_json: bool, every: int = 10):
        self.as_json, self.every = as_json, every
        self.bar = self.task = None
        if not as_json and _colour(sys.stderr):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[losses]}", markup=False), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True, highlight=False))

    def __call__(self, event: dict) -> None:
        if self.as_json:
            typer.echo(json.dumps(event))
            return
        kind = event.get("event")
        if kind == "start":
            if self.bar is not None:
                self.bar.start()
                self.task = self.bar.add_task("", total=event["steps"], completed=event["step"], losses="")
            else:
                typer.echo(f"training from step {event['step']} to {event['steps']}", err=True)
        elif kind == "step":
            losses = " ".join(f"{k} {v:.4f}" for k, v in event.items()
                              if k not in ("event", "step", "steps", "samples_per_s"))
            speed = f"{event['samples_per_s']:.2f} samples/s"
            if self.bar is not None:
                self.bar.update(self.task, completed=event["step"], losses=f"{losses}  {speed}")
            elif event["step"] % self.every == 0 or event["step"] == event["steps"]:
                typer.echo(f"step {event['step']}/{event['steps']}: {losses}, {speed}", err=True)
        elif kind == "checkpoint":
            shown = ", ".join(str(event[k]) for k in ("plot", "grid") if event.get(k))
            line = f"checkpoint {event['path']}" + (f" (see {shown})" if shown else "")
            if self.bar is not None:
                self.bar.console.print(line, style="dim", markup=False)
            else:
                typer.echo(line, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A training recipe (YAML): "
                                       "`stage: 1|2` trains an AnyStory adapter, `model: vae|clip|unet` "
                                       "one of the default model's base models."),
    resume: Optional[bool] = typer.Option(None, "--resume/--restart", help="Continue from the last "
                                          "checkpoint, or start over (default: the recipe's `resume`)."),
    check: bool = typer.Option(False, "--check", help="Only check the recipe and every row of its "
                               "dataset; load no model."),
    as_json: bool = typer.Option(False, "--json", help="Print each step and checkpoint as one JSON "
                                 "line on stdout."),
) -> None:
    """Train with a recipe: on this CPU, or on GPUs under `accelerate launch` / `torchrun`.

    Adapter runs write checkpoints, log.jsonl, losses.png and samples.png (sample generations
    with their routing maps) to the recipe's output_dir; see `anystory_cli/train.py`."""
    with _guarded(as_json):
        from .recipe_files import read_recipe_yaml

        data = read_recipe_yaml(recipe_path)
        if isinstance(data, dict) and "model" in data and "stage" not in data:
            _train_base_model(recipe_path, resume, check, as_json)
            return
        from .train import check_dataset, load_recipe
        from .train import train as run_training

        recipe = load_recipe(recipe_path)
        if resume is not None:
            recipe = recipe.model_copy(update={"resume": resume})
        if check:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check_dataset(recipe)
            for warning in caught:
                _print_warning(str(warning.message))
            typer.echo(f"{recipe_path}: the recipe and its dataset {recipe.data} are usable")
            return
        _quiet_libraries()
        progress = _TrainProgress(as_json)
        try:
            with warnings.catch_warnings():
                # skipped rows and unwritten previews: one line each, not Python's warning format
                warnings.showwarning = lambda message, *args, **kwargs: _print_warning(str(message))
                result = run_training(recipe, progress=progress)
        finally:
            progress.close()
        if not as_json:
            typer.echo(f"trained to step {result.step}: {recipe.output_dir / 'adapter.safetensors'}"
                       + (f" ({result.skipped} bad row(s) skipped)" if result.skipped else ""))


def _train_base_model(recipe_path: Path, resume: Optional[bool], check: bool, as_json: bool) -> None:
    """The default model's VAE, CLIP or UNet (anystory_cli/world/train_base.py): always resumes
    from its state file; --restart is refused rather than silently deleting a long run."""
    from .errors import InputError
    from .world import train_base

    recipe, base_dir = train_base.load_recipe(recipe_path)
    if resume is False:
        raise InputError(f"{recipe_path}: base-model runs always continue from their state file; "
                         "delete it to start over")
    if check:
        typer.echo(f"{recipe_path}: the recipe is usable")
        return

    def say(record: dict) -> None:
        if as_json:
            typer.echo(json.dumps(record))
        else:
            typer.echo(" ".join(f"{k}={v}" for k, v in record.items()), err=True)

    train_base.train(recipe, base_dir, log=say)


# --------------------------------------------------------------------------------------------
# world: the default model's sprite world
# --------------------------------------------------------------------------------------------

world_app = typer.Typer(help="The sprite world the embedded default model is trained on.",
                        no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("sample")
def world_sample(
    out: Path = typer.Option(..., "--out", help="Folder for the example scenes."),
    count: int = typer.Option(16, "--count", min=1, max=1000, help="How many scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same scenes)."),
) -> None:
    """Write example scenes, their instance masks, captions and identity contact sheets."""
    with _guarded():
        from .errors import OutputError
        from .world import write_samples

        try:
            files = write_samples(out, n=count, seed=seed)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write samples ({exc.strerror or exc})") from None
        typer.echo(f"{len(files)} files -> {out}")


@world_app.command("dataset")
def world_dataset(
    out: Path = typer.Option(..., "--out", help="Dataset folder (train.jsonl and its images)."),
    stage: int = typer.Option(..., "--stage", min=1, max=2, help="1: paired views of one "
                              "character; 2: scenes of 2-4 characters with instance masks."),
    count: int = typer.Option(..., "--count", min=1, max=10_000_000, help="How many samples."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed, same samples)."),
    size: int = typer.Option(64, "--size", min=32, max=512, help="Image size in pixels."),
    workers: int = typer.Option(1, "--workers", min=1, max=256, help="Processes that draw samples "
                                "(the same files whatever the number)."),
) -> None:
    """Write an `anystory train` dataset drawn from the world's training identities."""
    with _guarded():
        from .errors import OutputError
        from .world.dataset import write_dataset

        try:
            manifest = write_dataset(out, stage, count, seed, size, workers=workers)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the dataset ({exc.strerror or exc})") from None
        typer.echo(f"{count} stage-{stage} samples -> {manifest}")


@world_app.command("reference")
def world_reference(
    identity: int = typer.Argument(..., help="Identity seed of a world character.", show_default=False),
    out: Path = typer.Argument(..., help="PNG to write (RGBA: the alpha is the mask).", show_default=False),
    size: int = typer.Option(64, "--size", min=32, max=512, help="Image size in pixels."),
) -> None:
    """Write a world character's reference image (a front view on a transparent background)."""
    with _guarded():
        from PIL import Image

        from .atomic import atomic_path
        from .world import identity_from_seed, reference_image, split_of

        with atomic_path(out) as tmp:
            Image.fromarray(reference_image(identity, size=size), "RGBA").save(tmp, format="PNG")
        typer.echo(f"identity {identity} ({split_of(identity)}): "
                   f"{identity_from_seed(identity).describe()} -> {out}")


def _quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice; our progress says enough."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not _State.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


# --------------------------------------------------------------------------------------------
# evaluate: the default model graded by the independent judge (judge.py, evaluate.py)
# --------------------------------------------------------------------------------------------

# The seam tests use to put a tiny pipeline in place of the default base model:
# BASE_PIPELINE_FACTORY(assets_dir or None) -> a diffusers text-to-image pipeline. None means
# `load_default_base` on the shipped assets (or on --assets).
BASE_PIPELINE_FACTORY: Optional[Callable[[Optional[Path]], Any]] = None

evaluate_app = typer.Typer(help="Grade the default model with the independent judge (trained on "
                           "rendered scenes only).", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")
# `anystory evaluate base` grades the base text-to-image model; `anystory evaluate adapter` grades
# AnyStory on held-out identities (identity, blending, placement, routing IoU, ablations).


def _check_report_dir(report: Optional[Path]) -> None:
    """A report folder that cannot be written fails before minutes of drawing, not after."""
    if report is not None:
        from .render import check_output_dir

        check_output_dir(report)


def _format_rate(value: float) -> str:
    return "  -  " if value != value else f"{value:5.2f}"  # NaN: nothing to measure


DEFAULT_INTERVAL_TEXT = ",".join(f"{v:g}" for v in DEFAULT_INTERVAL)  # "0,0.7"
GUIDANCE_INTERVAL_OPTION = typer.Option(DEFAULT_INTERVAL_TEXT, "--guidance-interval", metavar="LOW,HIGH",
                                        help="Guide only the steps whose noise level t/T lies in [LOW, HIGH] "
                                        "(0 clean, 1 pure noise), as a story's style does by default; 0,1 "
                                        "guides every step.")


def _guidance_interval(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high), checked as a story's style.guidance_interval is."""
    from .errors import InputError
    from .guidance import check_interval

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
    from .errors import InputError

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
    with _guarded(as_json):
        from .evaluate import evaluate_base, sampling_label, json_safe
        from .judge import load_judge

        _quiet_libraries()
        import torch

        _check_report_dir(report)
        panel_shape = _panel_shape(shape) if shape is not None else None
        interval = _guidance_interval(guidance_interval)
        judge = load_judge()
        if BASE_PIPELINE_FACTORY is not None:
            pipe = BASE_PIPELINE_FACTORY(assets)
        else:
            from .world.base_models import DEFAULT_ASSETS, load_default_base

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
        height, width = result["image_size"]
        typer.echo(f"base model: {samples} held-out captions, {height}x{width}, {steps} steps, "
                   f"{sampling_label(result)}, seed {seed} ({result['seconds']['total']:.0f} s)")
        typer.echo(f"{'':10}{'generated':>10}{'rendered':>10}   (rendered: the judge on the captions' own scenes)")
        for key in ("place", "time", "scene", "prop", "count", "position", "pose"):
            if key in result["generated"]:
                typer.echo(f"{key:10}{_format_rate(result['generated'][key]):>10}"
                           f"{_format_rate(result['rendered'][key]):>10}")
        goals = " and ".join(f"{k} >= {v:.2f}" for k, v in result["goals"].items())
        typer.echo(f"goal ({goals} on generated images): {'met' if result['goals_met'] else 'not met'}")
        if report is not None:
            typer.echo(f"report: {result['report']['grid']}, {result['report']['json']}")


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
    variants: str = typer.Option(",".join(["anystory", "no_paste", "no_router", "no_reference_net", "no_subject_tokens",
                                           "text_only"]), "--variants",
                                 help="Comma-separated: anystory and any ablations to draw beside it."),
    model: str = typer.Option("default", "--model", help="'default' or a model folder (see `anystory render`)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="An adapter file from `anystory train` to "
                                           "grade on --model's base instead of its own adapter "
                                           "(e.g. runs/…/adapter.safetensors)."),
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
    with _guarded(as_json):
        from .evaluate import evaluate_adapter, json_safe
        from .judge import load_judge

        _quiet_libraries()
        import torch

        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        interval = _guidance_interval(guidance_interval)
        panel_shape = _panel_shape(shape) if shape is not None else None
        _check_report_dir(report)
        judge = load_judge()
        pipe = _adapter_pipeline(model, adapter)

        def progress(stage: str, done: int, total: int) -> None:
            if not as_json and (done == total or done % 10 == 0):
                typer.echo(f"{'drawn' if stage == 'draw' else 'routing scenes'} {done}/{total}", err=True)

        with torch.inference_mode():
            result = evaluate_adapter(pipe, judge, panels_per_count=panels, seed=seed, steps=steps, guidance=guidance,
                                      distractors=distractors, routing_scenes=routing_scenes, variants=chosen,
                                      report_dir=report, progress=progress, guidance_interval=interval,
                                      subject_strength=subject_strength, reference_strength=reference_strength,
                                      shape=panel_shape, reference_guidance=reference_guidance,
                                      paste_at=paste_at)
        if as_json:
            typer.echo(json.dumps(json_safe({"ok": True, **result}), indent=2, allow_nan=False))
            return
        _print_adapter_result(result)


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
    with _guarded(as_json):
        from .errors import InputError
        from .evaluate import compare_adapter_runs

        if len(before) != len(after):
            raise InputError(f"{len(before)} --before file(s) but {len(after)} --after: give them in pairs")
        pairs = [(_evaluation_json(a), _evaluation_json(b)) for a, b in zip(before, after)]
        result = compare_adapter_runs(pairs, before_variant, after_variant)
        if as_json:
            typer.echo(json.dumps({"ok": True, **result}, indent=2))
            return
        typer.echo(f"{result['before']} (before) against {result['after']} (after), {result['pairs']} pair(s)")
        typer.echo(f"{'characters':<11}{'n':>6}{'before':>8}{'after':>8}  {'95 % after':<12}"
                   f"{'only before':>12}{'only after':>11}{'sign p':>8}{'blended':>10}")
        for key, row in result["by_count"].items():
            low, high = row["identity_after_interval"]
            typer.echo(f"{'2-4' if key == 'multi' else key:<11}{row['characters']:>6}{row['identity_before']:>8.3f}"
                       f"{row['identity_after']:>8.3f}  {f'{low:.2f}-{high:.2f}':<12}{row['only_before']:>12}"
                       f"{row['only_after']:>11}{row['sign_test_p']:>8.3f}"
                       f"{row['blended_before']:>6} → {row['blended_after']}")


def _evaluation_json(path: Path) -> dict:
    """An `evaluate adapter --json` output (or a report's report.json), or one clear error."""
    from .errors import InputError

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
    """The AnyStoryPipeline to grade: `model` as `render` loads it, with `adapter` instead of its own."""
    if PIPELINE_FACTORY is not None and adapter is None:
        return PIPELINE_FACTORY(model, Path.cwd())
    from .model_loading import load_pipeline

    return load_pipeline(model, Path.cwd(), adapter=adapter)


def _print_adapter_result(result: dict) -> None:
    from .evaluate import interval_words, sampling_label

    counts = [c for c in ("1", "2", "3", "4") if c in result["rendered"]]
    height, width = result["image_size"]
    typer.echo(f"AnyStory on held-out identities: {result['panels_per_count']} {height}x{width} panels per count, "
               f"{result['steps']} steps, {sampling_label(result)}, seed {result['seed']}, {result['candidates']} candidates "
               f"per character ({result['seconds']['total']:.0f} s)")
    for key, title in (("identity", "identity"), ("blended", "blending")):
        typer.echo(f"{title + ' by characters in the panel':34}" + "".join(f"{c:>7}" for c in counts))
        rows = [(v, result["results"][v]) for v in result["variants"]] + [("rendered (judge)", result["rendered"])]
        for name, figures in rows:
            typer.echo(f"  {name:32}" + "".join(f"{_format_rate(figures[c][key]):>7}" for c in counts))
    iou = result["routing_iou"]
    typer.echo(f"routing IoU (latent side x timestep {', '.join(map(str, iou['timesteps']))}):")
    for key, title in (("by_resolution", None), ("foreground_by_resolution", "any character against all the "
                                                 "masks (finds characters, whichever it takes them for)")):
        if title:
            typer.echo(f"  {title}:")
        for side, by_t in iou[key].items():
            typer.echo(f"  {side + 'x' + side:8}" + "".join(f"{_format_rate(v):>7}" for v in by_t.values()))
    placement = result["placement"]
    typer.echo(f"placement: routing mass in region {_format_rate(placement['routing_share_in_region'])}, "
               f"characters found in their regions {_format_rate(placement['found_in_region'])}")
    for key, goal in result["goals"].items():
        sign = "<=" if key.endswith("_max") else ">="
        typer.echo(f"goal {key} {sign} {goal:.2f}: {_format_rate(result['reached'][key]).strip()}"
                   f"{interval_words(result, key)} ({'met' if result['goals_met'][key] else 'not met'})")
    if "report" in result:
        typer.echo(f"report: {result['report']['html']}")


if __name__ == "__main__":  # pragma: no cover
    app()
