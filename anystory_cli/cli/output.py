"""What the `anystory` commands print: one line per error or warning (colour only on a terminal
without NO_COLOR), the guard that turns errors into that line and an exit code, the progress
printers of `render` and `train`, the summaries and tables, JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import typer

EXIT_INTERRUPTED = 130


class State:
    debug = False


def colour(stream) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def print_error(message: str) -> None:
    _print_line(f"error: {one_line(message)}", style="red")


def print_warning(message: str) -> None:
    _print_line(f"warning: {one_line(message)}", style="yellow")


def _print_line(line: str, style: str) -> None:
    """One line on stderr, coloured only on a terminal that wants colour."""
    if colour(sys.stderr):
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(line, style=style, markup=False)
    else:
        typer.echo(line, err=True)


def fail(message: str, code: int = 1, as_json: bool = False, extra: dict | None = None):
    print_error(message)
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": one_line(message), "exit_code": code, **(extra or {})}))
    raise typer.Exit(code)


def guarded(as_json: bool = False, extra: Callable[[], dict] | None = None):
    """Run a command body; turn errors into one line and an exit code."""
    from ..errors import AnyStoryError

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, _traceback):
            if error is None or isinstance(error, (typer.Exit, typer.Abort, SystemExit)):
                return False
            details = extra() if extra else {}
            if isinstance(error, AnyStoryError):
                fail(str(error), error.exit_code, as_json, details)
            if isinstance(error, KeyboardInterrupt):
                # render.Interrupted (SIGINT/SIGTERM at a safe point) says what was finished.
                fail(str(error) or "interrupted; finished files are kept, rerun to continue",
                      getattr(error, "exit_code", EXIT_INTERRUPTED), as_json, details)
            if State.debug or not isinstance(error, Exception):
                return False  # --debug: let Python print the traceback
            fail(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                  1, as_json, details)
            return False

    return _Guard()


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice; our progress says enough."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not State.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # torchao (the [quant] extra), which diffusers imports when it loads a model: its optional
        # CUDA kernels that a CPU build lacks, and torch's notes on its enum registrations.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


class PlainProgress:
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
            print_warning(message)
            return
        else:
            return  # step, panel_done, done: too chatty, or said by the summary
        typer.echo(one_line(line), err=True)

    def close(self) -> None:
        pass


class RichProgress:
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


class QuietProgress:
    """Processes other than the first: warnings only (errors are printed by the guard)."""

    def __call__(self, event) -> None:
        if event.kind == "warning":
            print_warning(event.message)

    def close(self) -> None:
        pass


def print_summary(summary) -> None:
    if summary.up_to_date:
        typer.echo(f"{summary.story}: up to date, nothing to do "
                   f"({len(summary.panels_skipped)} panel(s) unchanged) -> {summary.out_dir}")
        _print_lowest(summary)
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
    _print_lowest(summary)


def _print_lowest(summary) -> None:
    """The panels whose weakest character scores lowest, and where every take is shown."""
    if summary.lowest:
        typer.echo(f"  lowest identity scores: {summary.lowest} (every take: {summary.review})")


class TrainProgress:
    """A rich bar with the losses and speed on a terminal; otherwise one line per `every` steps
    (and per checkpoint) on stderr. With --json, every event is one JSON line on stdout."""

    def __init__(self, as_json: bool, every: int = 10):
        self.as_json, self.every = as_json, every
        self.bar = self.task = None
        if not as_json and colour(sys.stderr):
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


def format_rate(value: float) -> str:
    return "  -  " if value != value else f"{value:5.2f}"  # NaN: nothing to measure


def print_base_result(result: dict, samples: int, steps: int, seed: int, with_report: bool) -> None:
    """`evaluate base`: the judge's rates on generated and on rendered scenes, and the goals."""
    from ..lab.evaluate import sampling_label

    height, width = result["image_size"]
    typer.echo(f"base model: {samples} held-out captions, {height}x{width}, {steps} steps, "
               f"{sampling_label(result)}, seed {seed} ({result['seconds']['total']:.0f} s)")
    typer.echo(f"{'':10}{'generated':>10}{'rendered':>10}   (rendered: the judge on the captions' own scenes)")
    for key in ("place", "time", "scene", "prop", "count", "position", "pose"):
        if key in result["generated"]:
            typer.echo(f"{key:10}{format_rate(result['generated'][key]):>10}"
                       f"{format_rate(result['rendered'][key]):>10}")
    goals = " and ".join(f"{k} >= {v:.2f}" for k, v in result["goals"].items())
    typer.echo(f"goal ({goals} on generated images): {'met' if result['goals_met'] else 'not met'}")
    if with_report:
        typer.echo(f"report: {result['report']['grid']}, {result['report']['json']}")


def print_comparison(result: dict) -> None:
    """`evaluate compare`: identity before and after per character count, discordant characters,
    sign test."""
    typer.echo(f"{result['before']} (before) against {result['after']} (after), {result['pairs']} pair(s)")
    typer.echo(f"{'characters':<11}{'n':>6}{'before':>8}{'after':>8}  {'95 % after':<12}"
               f"{'only before':>12}{'only after':>11}{'sign p':>8}{'blended':>10}")
    for key, row in result["by_count"].items():
        low, high = row["identity_after_interval"]
        typer.echo(f"{'2-4' if key == 'multi' else key:<11}{row['characters']:>6}{row['identity_before']:>8.3f}"
                   f"{row['identity_after']:>8.3f}  {f'{low:.2f}-{high:.2f}':<12}{row['only_before']:>12}"
                   f"{row['only_after']:>11}{row['sign_test_p']:>8.3f}"
                   f"{row['blended_before']:>6} → {row['blended_after']}")


def print_adapter_result(result: dict) -> None:
    from ..lab.evaluate import interval_words, sampling_label

    counts = [c for c in ("1", "2", "3", "4") if c in result["rendered"]]
    height, width = result["image_size"]
    typer.echo(f"AnyStory on held-out identities: {result['panels_per_count']} {height}x{width} panels per count, "
               f"{result['steps']} steps, {sampling_label(result)}, seed {result['seed']}, {result['candidates']} candidates "
               f"per character ({result['seconds']['total']:.0f} s)")
    for key, title in (("identity", "identity"), ("blended", "blending")):
        typer.echo(f"{title + ' by characters in the panel':34}" + "".join(f"{c:>7}" for c in counts))
        rows = [(v, result["results"][v]) for v in result["variants"]] + [("rendered (judge)", result["rendered"])]
        for name, figures in rows:
            typer.echo(f"  {name:32}" + "".join(f"{format_rate(figures[c][key]):>7}" for c in counts))
    iou = result["routing_iou"]
    typer.echo(f"routing IoU (latent side x timestep {', '.join(map(str, iou['timesteps']))}):")
    for key, title in (("by_resolution", None), ("foreground_by_resolution", "any character against all the "
                                                 "masks (finds characters, whichever it takes them for)")):
        if title:
            typer.echo(f"  {title}:")
        for side, by_t in iou[key].items():
            typer.echo(f"  {side + 'x' + side:8}" + "".join(f"{format_rate(v):>7}" for v in by_t.values()))
    placement = result["placement"]
    typer.echo(f"placement: routing mass in region {format_rate(placement['routing_share_in_region'])}, "
               f"characters found in their regions {format_rate(placement['found_in_region'])}")
    takes = result.get("takes", {})
    if takes.get("takes", 1) > 1:
        typer.echo(f"takes: up to {takes['takes']} per AnyStory panel, {format_rate(takes['takes_drawn']).strip()} drawn "
                   f"on average; the judge's identity rate on the take the scores picked / a random take / the "
                   f"judge's own best take:")
        for count in counts:
            if count in takes:
                row = takes[count]
                typer.echo(f"  {count} character(s): {format_rate(row['picked']).strip()} / "
                           f"{format_rate(row['random']).strip()} / {format_rate(row['oracle']).strip()}")
    for key, goal in result["goals"].items():
        sign = "<=" if key.endswith("_max") else ">="
        typer.echo(f"goal {key} {sign} {goal:.2f}: {format_rate(result['reached'][key]).strip()}"
                   f"{interval_words(result, key)} ({'met' if result['goals_met'][key] else 'not met'})")
    if "report" in result:
        typer.echo(f"report: {result['report']['html']}")
