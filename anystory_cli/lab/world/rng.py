"""A tiny deterministic random stream for the sprite world.

Why not numpy's or Python's generators: the world must give the same pixels from the same seed
for as long as shipped weights and stored reference images exist, and neither library promises
that its sampling algorithms never change between versions. SplitMix64 keyed by a BLAKE2 hash is
a few lines, fully specified here, and fast enough for the few dozen draws a scene needs.
"""

from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

T = TypeVar("T")
_MASK64 = (1 << 64) - 1


def stable_hash(*key: object) -> int:
    """A 64-bit hash of a key made of ints and strings that never changes between runs.

    Python's own `hash()` of strings is salted per process, so it cannot be used here.
    """
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class WorldRng:
    """SplitMix64 stream; `WorldRng("scene", 3)` and `WorldRng("pair", 3)` are independent."""

    def __init__(self, *key: object) -> None:
        self._state = stable_hash(*key)

    def bits(self) -> int:
        """The next 64 random bits."""
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def integer(self, n: int) -> int:
        """Uniform in [0, n); the modulo bias is below 2**-50 for the small n used here."""
        if n <= 0:
            raise ValueError(f"integer(n) needs n > 0, got {n}")
        return self.bits() % n

    def uniform(self, low: float, high: float) -> float:
        """Uniform float in [low, high) from 53 random bits."""
        return low + (high - low) * ((self.bits() >> 11) / float(1 << 53))

    def chance(self, probability: float) -> bool:
        return self.uniform(0.0, 1.0) < probability

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(len(options))]

    def shuffled(self, items: Sequence[T]) -> list[T]:
        """A Fisher-Yates shuffled copy."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.integer(i + 1)
            out[i], out[j] = out[j], out[i]
        return out
