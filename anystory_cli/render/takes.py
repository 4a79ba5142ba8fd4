"""Takes: each panel drawn from up to `style.takes` seeds, every take scored, the best one kept.

    job = with_takes(panel_job(plan, frame))      # its key also covers takes and min_identity
    draw_takes(job, out, draw, scorer, emit)      # draws the takes not stored yet, keeps the best
    read_takes(job, out)                          # the stored takes, as a render would keep them

Take k of a panel draws from `scores.take_seed(plan.seed, k)`: take 0 is the panel's own seed,
so one take draws exactly the panel a render without takes draws. Each take is stored under its
own key (the panel's content key, frame shape and the take's seed), with its scores in a PNG text
chunk and its routing maps beside it:

    .anystory/takes/<key>.png           the take; "anystory:key", "anystory:scores" (JSON), "anystory:seed"
    .anystory/takes/<key>.routing.png   its routing maps (as `store.write_routing` keeps them)
    .anystory/takes/<key>.overlay.png   its routing overlay, for review.html

so that an unchanged story draws nothing, raising `takes` draws only the new takes, and which
take is kept is known again from the stored scores alone. Takes are drawn in order; once one
clears `style.min_identity` (`scores.good_enough`) no more are drawn.

Scores (`scores.py`) come from the pipeline's `identity_embeddings` (the model's own image
encoder); a model without one draws one take and scores nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .. import export
from ..errors import ModelError
from ..masks import load_image
from ..overlay import routing_overlay
from ..scores import CharacterScore, best_take, good_enough, routed_regions, score_panel, take_seed
from .events import ProgressEvent
from .store import KEY_TEXT, STATE_DIR, PanelJob, content_hash, panel_path, read_routing, routing_path, \
    stored_key, write_png, write_routing

TAKE_KEY_VERSION = 1
SCORES_TEXT = "anystory:scores"
SEED_TEXT = "anystory:seed"


@dataclass
class Take:
    index: int  # 0-based
    seed: int
    key: str
    image: Image.Image
    maps: np.ndarray
    scores: list[CharacterScore] | None  # None: the model has no image encoder to score with

    def rank_scores(self) -> list[CharacterScore]:
        return self.scores or []


def with_takes(job: PanelJob) -> PanelJob:
    """The job with a key that also covers how many takes it keeps the best of (one take keeps
    the key it always had: its panel is the same)."""
    plan = job.plan
    if plan.takes <= 1:
        return job
    return replace(job, key=content_hash("takes", job.key, plan.takes, plan.min_identity))


def takes_folder(out: Path) -> Path:
    return out / STATE_DIR / "takes"


def take_key(job: PanelJob, seed: int) -> str:
    return content_hash("take", TAKE_KEY_VERSION, job.plan.takes_key, job.multipliers, seed)


def take_path(out: Path, key: str, suffix: str = "") -> Path:
    return takes_folder(out) / f"{key}{suffix}.png"


def load_take(job: PanelJob, out: Path, index: int) -> Take | None:
    """Take `index` of the panel as stored, or None when it is not (or not whole)."""
    seed = take_seed(job.plan.seed, index)
    key = take_key(job, seed)
    path = take_path(out, key)
    if stored_key(path) != key:
        return None
    maps = read_routing(take_path(out, key, ".routing"), key, job.entries)
    if maps is None:
        return None
    with Image.open(path) as stored:
        text = dict(stored.text)  # type: ignore[attr-defined]
        image = stored.convert("RGB")
    try:
        raw = json.loads(text.get(SCORES_TEXT, "null"))
        scores = None if raw is None else [CharacterScore.from_dict(d) for d in raw]
    except (ValueError, KeyError, TypeError):
        return None
    return Take(index, seed, key, image, maps, scores)


def _store_take(take: Take, out: Path) -> None:
    # The maps first: a take PNG with this key promises that its maps exist.
    write_routing(take.maps, take_path(out, take.key, ".routing"), take.key, out)
    scores = None if take.scores is None else [s.to_dict() for s in take.scores]
    export.write_png(take.image, take_path(out, take.key), None,
                     {KEY_TEXT: take.key, SCORES_TEXT: json.dumps(scores), SEED_TEXT: str(take.seed)}, out)


def read_takes(job: PanelJob, out: Path) -> list[Take]:
    """The takes a render of this panel keeps, as stored: in order, up to the first that cleared
    min_identity; stops at the first take not stored."""
    takes = []
    for index in range(job.plan.takes):
        take = load_take(job, out, index)
        if take is None:
            break
        takes.append(take)
        if good_enough(take.rank_scores(), job.plan.min_identity) and take.scores is not None:
            break
    return takes


def kept(takes: Sequence[Take]) -> int:
    """Index in `takes` of the take a panel keeps (`scores.best_take`; the first when unscored)."""
    if any(t.scores is None for t in takes):
        return 0
    return best_take([t.rank_scores() for t in takes])


class Scorer:
    """Identity scores of a drawn panel: its characters' references embedded once each, each
    routed region cut out of the panel and embedded (`scores.score_panel`)."""

    def __init__(self, pipeline, story, out: Path, source: str):
        self.pipeline, self.story, self.out, self.source = pipeline, story, out, source
        self.references: dict[tuple[str, bool], np.ndarray] = {}

    @property
    def available(self) -> bool:
        return callable(getattr(self.pipeline, "identity_embeddings", None))

    def reference(self, name: str, mirrored: bool) -> np.ndarray:
        if (name, mirrored) not in self.references:
            image, mask = self._reference_image(name)
            if mirrored:
                image = ImageOps.mirror(image)
                mask = None if mask is None else ImageOps.mirror(mask)
            self.references[name, mirrored] = self.pipeline.identity_embeddings([image], [mask])[0]
        return self.references[name, mirrored]

    def _reference_image(self, name: str) -> tuple[Image.Image, Image.Image | None]:
        """The reference as the character was encoded from: its image and mask, or for a
        text-only character its published sheet (alpha: the cut-out)."""
        character = self.story.characters[name]
        if character.image is not None:
            mask = load_image(character.mask, "mask") if character.mask else None
            return load_image(character.image, "reference image"), mask
        return load_image(self.out / "characters" / f"{name}.png", "character sheet"), None

    def __call__(self, job: PanelJob, image: Image.Image, maps: np.ndarray) -> list[CharacterScore] | None:
        characters = job.plan.characters
        if not characters or not self.available:
            return [] if not characters else None
        references = np.stack([self.reference(c.name, c.mirrored) for c in characters])
        regions = routed_regions(maps, len(characters))
        embeddings = np.zeros_like(references)
        found = [i for i, region in enumerate(regions) if region.any()]
        if found:
            embeddings[found] = self.pipeline.identity_embeddings([image] * len(found), [regions[i] for i in found])
        return score_panel([c.name for c in characters], references, regions, embeddings)


def check_scorer(scorer: Scorer, jobs: Sequence[PanelJob], source: str) -> None:
    """Takes need scores: a model without an image encoder to score with is one clear error."""
    if not scorer.available and any(job.plan.takes > 1 for job in jobs):
        raise ModelError(f"{source}: style.takes: this model ({type(scorer.pipeline).__name__}) has no image "
                         "encoder to score takes with; use takes: 1")


def draw_takes(job: PanelJob, out: Path, draw: Callable[[int], tuple[Image.Image, np.ndarray]], scorer: Scorer,
               emit: Callable[[ProgressEvent], None], position: tuple[int, int]) -> int:
    """Draw the panel's takes that are not stored yet (in order, stopping once one clears
    min_identity), store each with its scores, and write the kept one as the panel. `draw(seed)`
    gives (image, routing maps as stored); `position` (current, total) places the panel in the
    progress. Returns the number of takes drawn."""
    plan = job.plan
    takes: list[Take] = []
    drawn = 0
    for index in range(plan.takes):
        take = load_take(job, out, index)
        if take is None:
            seed = take_seed(plan.seed, index)
            if plan.takes > 1:
                emit(ProgressEvent("panel", f"panel {plan.index + 1}, take {index + 1} of {plan.takes}: {plan.prompt}",
                                   *position))
            image, maps = draw(seed)
            take = Take(index, seed, take_key(job, seed), image, maps, scorer(job, image, maps))
            _store_take(take, out)
            drawn += 1
        takes.append(take)
        if take.scores is not None and good_enough(take.scores, plan.min_identity):
            break
    chosen = takes[kept(takes)]
    # Maps first: a panel PNG with this key promises that its maps exist. Pages read both back
    # from the files (as from an earlier run's), so no panel stays in memory.
    write_routing(chosen.maps, routing_path(out, job.key), job.key, out)
    write_png(chosen.image, panel_path(out, plan.index), job.key, within=out)
    job.stored = True
    return drawn


def overlay_path(out: Path, take: Take) -> Path:
    """The take's routing overlay, written when missing (for review.html)."""
    path = take_path(out, take.key, ".overlay")
    if stored_key(path) != take.key:
        write_png(routing_overlay(take.image, take.maps), path, take.key, within=out)
    return path


def prune_takes(out: Path, jobs: Sequence[PanelJob]) -> None:
    """After a complete render: remove stored takes that no panel of the story draws any more."""
    folder = takes_folder(out)
    if not folder.is_dir():
        return
    keys = {take_key(job, take_seed(job.plan.seed, k)) for job in jobs for k in range(job.plan.takes)}
    for path in folder.glob("*.png"):
        if path.name.split(".", 1)[0] not in keys:
            with contextlib.suppress(OSError):
                path.unlink()


def panel_scores(jobs: Sequence[PanelJob], takes_of: dict[int, list[Take]]) -> list[dict[str, Any]]:
    """Per panel with characters: the take kept, its seed and scores, and every take stored (seed,
    scores); `drawn` False for a panel none of whose takes is stored yet (e.g. drawn before
    scores existed, or not drawn). `takes_of`: panel index -> `read_takes`."""
    rows = []
    for job in jobs:
        plan = job.plan
        if not plan.characters:
            continue
        takes = takes_of.get(plan.index, [])
        row: dict[str, Any] = {"panel": plan.index + 1, "prompt": plan.prompt, "takes": plan.takes,
                               "characters": [c.name for c in plan.characters], "drawn": bool(takes)}
        if takes:
            chosen = takes[kept(takes)]
            row.update(kept=chosen.index + 1, seed=chosen.seed, weakest=_weakest(chosen.scores),
                       scores=_score_dicts(chosen.scores),
                       all_takes=[{"take": t.index + 1, "seed": t.seed, "weakest": _weakest(t.scores),
                                   "scores": _score_dicts(t.scores)} for t in takes])
        rows.append(row)
    return rows


def _score_dicts(scores: list[CharacterScore] | None) -> list[dict] | None:
    return None if scores is None else [s.to_dict() for s in scores]


def _weakest(scores: list[CharacterScore] | None) -> float | None:
    if not scores:
        return None
    return round(min(s.identity for s in scores), 4)


def lowest_panels(rows: Sequence[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The `count` panels whose kept take has the weakest character (flagged ones first)."""
    scored = [r for r in rows if r.get("scores")]
    scored.sort(key=lambda r: (not any(s["blended"] or s["missing"] for s in r["scores"]), r["weakest"]))
    return scored[:count]


def describe_lowest(rows: Sequence[dict[str, Any]]) -> str:
    """'panel 5: pip 0.42; panel 2: bolt 0.47 (blended with mira)', or '' without scores."""
    parts = []
    for row in lowest_panels(rows):
        weakest = min(row["scores"], key=lambda s: (not (s["blended"] or s["missing"]), s["identity"]))
        flag = " (missing)" if weakest["missing"] else f" (blended with {weakest['closest']})" \
            if weakest["blended"] else ""
        parts.append(f"panel {row['panel']}: {weakest['name']} {weakest['identity']:.2f}{flag}")
    return "; ".join(parts)
