"""Stopping cleanly on SIGINT / SIGTERM: at the next safe point, saying what was finished."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Sequence

from .events import RenderSummary


class Interrupted(KeyboardInterrupt):
    """A render stopped at a safe point after SIGINT or SIGTERM. The message says what was
    finished; `exit_code` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int, summary: RenderSummary | None = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.summary = summary


_stop_requests: list[int] = []  # signals received inside stop_on_signals(), oldest first


_deferring = [0]  # > 0 while drawing and writing: a signal is acted on at the next safe point


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """While active, SIGINT and SIGTERM stop renders with `Interrupted`: while a render draws
    and writes, at its next safe point (between two denoising steps, characters, panels or
    pages); elsewhere (checking the story, loading the model) and on a second signal, at once.
    Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        first = not _stop_requests
        if first:
            _stop_requests.append(signum)
        if not first or not _deferring[0]:
            raise Interrupted(f"stopped by {signal.Signals(signum).name}; finished files are kept, "
                              "run the same command again to finish the rest", signum)

    _stop_requests.clear()
    previous = {number: signal.signal(number, handler) for number in signals}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)
        _stop_requests.clear()


def stop_requested() -> bool:
    """A signal arrived inside `stop_on_signals()` and the render has not stopped yet."""
    return bool(_stop_requests)


@contextlib.contextmanager
def at_safe_points():
    """Inside, a signal is acted on at the next `check_stop`."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1


def _numbers(values: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_stop(source: str, summary: RenderSummary, to_draw: int) -> None:
    """Interrupted, saying what is finished, when a stop was asked for."""
    if not _stop_requests:
        return
    signum = _stop_requests[0]
    drawn = summary.panels_rendered
    done = (f"panel(s) {_numbers(drawn)} finished ({len(drawn)} of {to_draw} to draw)" if drawn
            else f"no panel finished (0 of {to_draw} to draw)")
    if summary.pages_written:
        done += f", page(s) {_numbers(summary.pages_written)} written"
    raise Interrupted(f"{source}: stopped by {signal.Signals(signum).name}: {done}; nothing is "
                      "half-written, run the same command again to finish the rest", signum, summary)
