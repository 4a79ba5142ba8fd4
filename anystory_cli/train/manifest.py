"""A training dataset's manifest (JSONL, one sample per line; see `loop` for the fields): read
it, and say why a row cannot be trained on, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..masks import load_image, mask_array


def read_manifest(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row or the JSON error message as a str) for every non-blank line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((number, f"bad JSON ({exc.msg})"))
    return rows


def row_problems(row: Any, stage: int, folder: Path, target_masks: bool = False) -> list[str]:
    """Why a row cannot be trained on (empty: usable). target_masks: stage 1 needs target_mask."""
    if isinstance(row, str):
        return [row]
    if not isinstance(row, dict):
        return ["a row must be a JSON object"]
    image_key, mask_keys = ("target", ["reference_mask"]) if stage == 1 else ("image", ["masks"])
    required = ["reference", "target", "caption"] if stage == 1 else ["image", "masks", "caption"]
    if stage == 1 and target_masks:
        required.append("target_mask")
    missing = [k for k in required if k not in row]
    if missing:
        return [f"missing field(s) {', '.join(missing)}"]
    if not isinstance(row["caption"], str):
        return ["caption must be a string"]
    problems = []
    images = {}
    for key in (["reference", "target"] if stage == 1 else ["image"]):
        try:
            images[key] = load_image(folder / str(row[key]), key)
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        return problems
    if stage == 1:
        masks = [] if row.get("reference_mask") is None else [row["reference_mask"]]
        owner = images["reference"]
        if not masks and owner.mode not in ("RGBA", "LA", "PA", "P"):
            problems.append("reference has no alpha channel and reference_mask is null")
        if row.get("target_mask") is not None:
            problems += _mask_problems("target_mask", row["target_mask"], images["target"], folder)
    else:
        masks, owner = row["masks"], images["image"]
        if not isinstance(masks, list) or not masks:
            return ["masks must be a non-empty list of mask paths"]
    for i, mask_path in enumerate(masks):
        problems += _mask_problems(f"mask {i}", mask_path, owner, folder)
    return problems


def _mask_problems(name: str, mask_path: Any, owner: Image.Image, folder: Path) -> list[str]:
    try:
        mask = load_image(folder / str(mask_path), "mask")
        if not mask_array(mask, owner.size).any():
            return [f"{name} ({mask_path}) is empty"]
    except InputError as exc:
        return [f"{name}: {exc}"]
    return []


def manifest_problems(path: str | Path, stage: int, target_masks: bool = False) -> list[tuple[int, str]]:
    """(line number, problem) for every problem of the manifest; line 0: the whole file."""
    path = Path(path)
    if not path.is_file():
        return [(0, "manifest not found")]
    rows = read_manifest(path)
    if not rows:
        return [(0, "the dataset is empty")]
    return [(number, problem) for number, row in rows
            for problem in row_problems(row, stage, path.parent, target_masks)]


def validate_manifest(path: str | Path, stage: int, target_masks: bool = False) -> list[str]:
    """Every problem of the manifest as 'path:line: problem' (empty list: all rows usable)."""
    return [f"{path}:{line}: {problem}" if line else f"{path}: {problem}"
            for line, problem in manifest_problems(path, stage, target_masks)]
