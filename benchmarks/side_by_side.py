"""What the A/B benchmarks share: this machine is shared and noisy, so two ways of drawing are
timed alternately in one process, after one warm-up call each, and compared by their medians."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch


def parse_args(*positional: str) -> argparse.Namespace:
    """The required `positional` arguments, --runs and --threads; sets torch's thread count."""
    parser = argparse.ArgumentParser()
    for name in positional:
        parser.add_argument(name)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def alternate(draws: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each call in `draws`, run in turn `runs` times after a warm-up."""
    for draw in draws.values():
        draw()
    times: dict[str, list[float]] = {name: [] for name in draws}
    for _ in range(runs):
        for name, draw in draws.items():
            started = time.perf_counter()
            draw()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ratio(medians: dict[str, float], args: argparse.Namespace, unit: str = "seconds_per_panel",
                digits: int = 3, **extra) -> None:
    """Prints, as JSON, the medians from `alternate`, the ratio of the first to the second, the
    run settings and `extra`."""
    first, second = list(medians)[:2]
    rounded = {name: round(value, digits) for name, value in medians.items()}
    print(json.dumps({unit: rounded, "ratio": round(medians[first] / medians[second], digits), **extra,
                      "runs": args.runs, "threads": args.threads}, indent=2))
