"""Training sets of the sprite world in `anystory train`'s manifest format (backs
`anystory world dataset`). The world is just another user dataset to the trainer: it reads these
files exactly as it reads a user's own.

    stage 1: one training identity in two views. The reference is the character cut out of the
             source view (alpha = its exact mask), the target is the other view with its caption
             and the character's exact mask in it (for the recipe's character_loss_weight).
    stage 2: scenes of 2-4 training identities, one exact mask per instance.

Only training identities are drawn; held-out identities never reach a dataset. Sample i of a
stage depends only on (seed, stage, i), so a longer dataset starts with the shorter one.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ...atomic import atomic_path
from .parallel import ordered_map
from .rng import WorldRng
from .scenes import sample_pair, sample_scene

MANIFEST = "train.jsonl"
SCENE_SIZES = (2, 3, 4)  # characters per stage-2 scene (the paper's multi-subject data)


def _rng_seed(seed: int, stage: int, index: int) -> int:
    return WorldRng("dataset", int(seed), int(stage), int(index)).integer(1 << 31)


def stage1_row(index: int, *, seed: int, size: int, folder: Path) -> dict:
    pair = sample_pair(_rng_seed(seed, 1, index), "train", size)
    reference, target = f"ref/{index:06d}.png", f"target/{index:06d}.png"
    target_mask = f"target_mask/{index:06d}.png"
    Image.fromarray(pair.reference, "RGBA").save(folder / reference)
    Image.fromarray(pair.target.image).save(folder / target)
    Image.fromarray(pair.target.masks.any(axis=0).astype(np.uint8) * 255).save(folder / target_mask)
    return {"reference": reference, "reference_mask": None, "target": target, "target_mask": target_mask,
            "caption": pair.target.caption, "identity_seed": pair.identity_seed}


def stage2_row(index: int, *, seed: int, size: int, folder: Path) -> dict:
    count = SCENE_SIZES[index % len(SCENE_SIZES)]
    scene = sample_scene(_rng_seed(seed, 2, index), count, "train", size)
    image = f"image/{index:06d}.png"
    Image.fromarray(scene.image).save(folder / image)
    masks = []
    for k, mask in enumerate(scene.masks):
        masks.append(f"mask/{index:06d}_{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / masks[-1])
    return {"image": image, "masks": masks, "caption": scene.caption, "identity_seeds": scene.identity_seeds}


def write_dataset(out_dir: str | Path, stage: int, count: int, seed: int = 0, size: int = 64,
                  progress=None, workers: int = 1) -> Path:
    """Write `count` samples and their manifest (written last, atomically: a manifest on disk
    always describes files that exist). Files already present are rewritten identically.
    `workers` > 1 writes the samples in that many processes, with the same files."""
    if stage not in (1, 2):
        raise ValueError(f"stage is 1 or 2, got {stage}")
    folder = Path(out_dir)
    for sub in (("ref", "target", "target_mask") if stage == 1 else ("image", "mask")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    make_row = partial(stage1_row if stage == 1 else stage2_row, seed=seed, size=size, folder=folder)
    rows = []
    with ordered_map(make_row, range(count), workers) as made:
        for row in made:
            rows.append(row)
            if progress is not None:
                progress(len(rows), count)
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / MANIFEST
