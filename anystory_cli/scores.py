"""Identity scores: is each character of a drawn panel still the person of its reference?

    score_panel(names, references, regions, embeddings) -> [CharacterScore]
    best_take([[CharacterScore], ...]) -> index of the take to keep
    take_seed(seed, take) -> the seed of a panel's take

Each character's region is where the router sent it (`routed_regions`: every pixel to its
likeliest routing-map entry). The model's own image encoder (the CLIP image encoder on SD-style
models, Redux's SigLIP on FLUX) embeds the region cut out of the panel and the character's
reference, both segmented the same way (`identity_embeddings` on the pipeline); the cosine of the
two is the character's identity score. From the same embeddings:

- *blended*: the region is closer to another character of the panel than to its own reference
  (one identity copied onto two people, or two merged into one);
- *missing*: the router gave the character less than `MIN_REGION_SHARE` of the panel.

Plain numpy: no torch here (the pipeline embeds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# A character routed to less than this share of the panel is not drawn there (a lone sprite of
# the embedded model covers 7-15 % of its panel; a routed region below 1 % is a few pixels).
MIN_REGION_SHARE = 0.01
# `style.takes` / `--takes`: each take is one more full panel drawing.
MAX_TAKES = 16


@dataclass(frozen=True)
class CharacterScore:
    name: str
    identity: float  # cosine of the region's and the reference's embeddings (-1..1; 0 when missing)
    closest: str  # the panel's character whose reference the region is closest to
    area: float  # share of the panel routed to the character
    blended: bool
    missing: bool

    @property
    def flagged(self) -> bool:
        return self.blended or self.missing

    def to_dict(self) -> dict:
        data = asdict(self)
        data["identity"] = round(self.identity, 4)
        data["area"] = round(self.area, 4)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CharacterScore:
        return cls(name=str(data["name"]), identity=float(data["identity"]), closest=str(data["closest"]),
                   area=float(data["area"]), blended=bool(data["blended"]), missing=bool(data["missing"]))


def routed_regions(maps: np.ndarray, characters: int) -> list[np.ndarray]:
    """Boolean (H, W) masks, one per character: the pixels whose likeliest entry of the routing
    maps (E, H, W; characters in order, then the background) is that character."""
    if maps.ndim != 3 or maps.shape[0] < characters + 1:
        raise ValueError(f"routing maps of shape {maps.shape} for {characters} character(s)")
    winner = np.asarray(maps).argmax(axis=0)
    return [winner == i for i in range(characters)]


def score_panel(names: Sequence[str], references: np.ndarray, regions: Sequence[np.ndarray],
                embeddings: np.ndarray) -> list[CharacterScore]:
    """One score per character of a panel.

    `references` (N, D): unit embeddings of the panel's characters' references, in `names` order;
    `regions`: their routed masks; `embeddings` (N, D): unit embeddings of the regions cut out of
    the panel (any row for a missing character; it is not read)."""
    references = np.asarray(references, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    similarity = embeddings @ references.T  # (regions, references)
    scores = []
    for i, name in enumerate(names):
        area = float(np.mean(regions[i])) if regions[i].size else 0.0
        missing = area < MIN_REGION_SHARE
        if missing:
            scores.append(CharacterScore(name, 0.0, name, area, blended=False, missing=True))
            continue
        closest = int(np.argmax(similarity[i]))
        own = float(similarity[i, i])
        # Another character strictly closer; a character drawn twice in a panel is not blended with itself.
        blended = names[closest] != name and float(similarity[i, closest]) > own
        scores.append(CharacterScore(name, own, names[closest] if blended else name, area, blended, False))
    return scores


def weakest(scores: Sequence[CharacterScore]) -> float:
    """The lowest identity score of a take (1.0 for a panel without characters)."""
    return min((s.identity for s in scores), default=1.0)


def take_rank(scores: Sequence[CharacterScore]) -> tuple[bool, float]:
    """Sort key of a take, higher is better: unflagged first, then its weakest character."""
    return (not any(s.flagged for s in scores), weakest(scores))


def best_take(takes: Sequence[Sequence[CharacterScore]]) -> int:
    """The take whose weakest character scores highest, never one with a blended or missing
    character when another take has none; the earliest of equals."""
    if not takes:
        raise ValueError("no takes to choose from")
    ranks = [take_rank(t) for t in takes]
    return max(range(len(takes)), key=lambda k: (ranks[k], -k))


def good_enough(scores: Sequence[CharacterScore], min_identity: float | None) -> bool:
    """A take that stops the drawing of more (`style.min_identity`): no flag, every character at
    or above the threshold."""
    return min_identity is not None and take_rank(scores) >= (True, min_identity)


def take_seed(seed: int, take: int) -> int:
    """The seed of take `take` (0-based) of a panel whose seed is `seed`: take 0 is the panel's own
    seed (one take draws what a render without takes draws), the others derived from it, stable
    across runs and machines."""
    if take == 0:
        return int(seed)
    digest = hashlib.sha256(f"anystory/take-seed/{int(seed)}/{int(take)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
