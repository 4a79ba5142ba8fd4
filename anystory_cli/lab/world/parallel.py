"""One way to spread the world's rendering over processes: an ordered map, serial with one worker."""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def ordered_map(function: Callable[[T], R], items: Sequence[T], workers: int = 1) -> Iterator[Iterator[R]]:
    """`function` over `items`, results in the items' order whatever the workers' order. With
    `workers` > 1 the calls run in spawned processes (a forked child must not inherit the
    parent's CUDA or threads), so `function` must be importable at module level."""
    if workers <= 1:
        yield map(function, items)
        return
    chunk = max(1, min(256, len(items) // (4 * workers)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool.map(function, items, chunksize=chunk)
