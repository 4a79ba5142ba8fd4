"""Measuring the default model with the independent judge (`anystory_cli/judge.py`).

    evaluate_base(pipe, judge, n_samples=64, seed=0, steps=25, guidance=4.0) -> dict
    evaluate_base(..., report_dir="out/eval")      # also grid.png and report.json there

The base model must draw the world from a caption alone: the right place and time of day, the
right number of characters, each at its place. Captions come from held-out scenes of the sprite
world (`sample_scene(..., split="heldout")`, scene seeds drawn from `seed`, 1-4 characters in
turn); the base pipeline draws each caption; the judge reads both the generated image and the
scene that the caption was written from, so every figure comes with the judge's own accuracy on
the same captions' rendered pictures beside it.

(Issue 7 adds the AnyStory evaluation here: identity accuracy of held-out identities per
character at its place, and the blending rate, from `Judge.read_characters`.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .judge import Judge, SceneTruth, scene_truth, score_scene, summarise
from .world.rng import WorldRng, stable_hash
from .world.scenes import MAX_CHARACTERS, Scene, sample_scene

# Issue 6: scene (place and time) and count right on at least 90 % of generated images.
BASE_GOALS = {"scene": 0.9, "count": 0.9}
HEADLINE = ("place", "time", "scene", "prop", "count", "position", "pose")


def base_eval_scenes(n_samples: int, seed: int = 0, size: int = 64) -> list[Scene]:
    """Held-out scenes whose captions the base model is asked to draw; 1, 2, 3, 4 characters in
    turn so that every count is equally represented."""
    rng = WorldRng("evaluate-base", int(seed))
    return [sample_scene(rng.integer(1 << 40), 1 + i % MAX_CHARACTERS, "heldout", size) for i in range(n_samples)]


def generate_from_captions(pipe, captions: list[str], noise_seeds: list[int], steps: int, guidance: float,
                           size: int, batch_size: int = 16,
                           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 (N, size, size, 3): each caption drawn by a diffusers text-to-image pipeline, with
    its own generator (the same image whatever the batch size)."""
    images = []
    for start in range(0, len(captions), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in noise_seeds[start:start + batch_size]]
        out = pipe(prompt=captions[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np", height=size, width=size)
        images.append(np.clip(np.round(np.asarray(out.images) * 255), 0, 255).astype(np.uint8))
        if progress is not None:
            progress(min(start + batch_size, len(captions)), len(captions))
    return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)


def _truth_dict(truth: SceneTruth) -> dict:
    return {"place": truth.place, "time": truth.time, "prop": truth.prop, "count": truth.count,
            "positions": list(truth.positions), "poses": list(truth.poses)}


def _judged(judge: Judge, images: np.ndarray, truths: list[SceneTruth]) -> tuple[list[dict], list[dict]]:
    """(records of what the judge got right, its verdicts as dicts) for each image."""
    records, verdicts = [], []
    for (verdict, characters), truth in zip(judge.read(images), truths):
        poses = [c.pose for c in characters]
        records.append(score_scene(verdict, truth, poses))
        verdicts.append({**verdict.to_dict(), "poses": poses})
    return records, verdicts


def evaluate_base(pipe, judge: Judge, n_samples: int = 64, seed: int = 0, steps: int = 25, guidance: float = 4.0,
                  batch_size: int = 16, report_dir: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Draw `n_samples` held-out captions with the base `pipe` and grade them with `judge`.

    Returns a plain dict: accuracies on the generated images ("generated") and the judge's own
    on the rendered scenes of the same captions ("rendered"), both overall and by character
    count; whether the issue's goals are met; timings; and one record per sample."""
    started = time.perf_counter()
    size = judge.config.image_size
    scenes = base_eval_scenes(n_samples, seed, size)
    truths = [scene_truth(scene) for scene in scenes]
    captions = [scene.caption for scene in scenes]
    noise_seeds = [stable_hash("evaluate-base-noise", int(seed), i) % (1 << 63) for i in range(n_samples)]
    generated = generate_from_captions(pipe, captions, noise_seeds, steps, guidance, size, batch_size, progress)
    generate_seconds = time.perf_counter() - started
    rendered = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    generated_records, generated_verdicts = _judged(judge, generated, truths)
    rendered_records, rendered_verdicts = _judged(judge, rendered, truths)

    by_count = {}
    for count in range(1, MAX_CHARACTERS + 1):
        chosen = [i for i, t in enumerate(truths) if t.count == count]
        if chosen:
            by_count[str(count)] = {
                "samples": len(chosen),
                "generated": summarise([generated_records[i] for i in chosen]),
                "rendered": summarise([rendered_records[i] for i in chosen]),
            }
    result_generated = summarise(generated_records)
    heldout = judge.info.get("heldout", {}).get("rendered", {})
    result = {
        "model": "base",
        "samples": n_samples, "seed": seed, "steps": steps, "guidance_scale": guidance, "image_size": size,
        "generated": result_generated,
        "rendered": summarise(rendered_records),
        "by_count": by_count,
        "goals": dict(BASE_GOALS),
        "goals_met": bool(n_samples) and all(result_generated[k] >= v for k, v in BASE_GOALS.items()),
        "judge_heldout": {k: heldout[k] for k in HEADLINE if k in heldout},
        "seconds": {"generate": round(generate_seconds, 1), "total": round(time.perf_counter() - started, 1)},
        "records": [
            {"index": i, "scene_seed": scenes[i].seed, "caption": captions[i], "truth": _truth_dict(truths[i]),
             "generated": {**generated_verdicts[i], "right": generated_records[i]},
             "rendered": {**rendered_verdicts[i], "right": rendered_records[i]}}
            for i in range(n_samples)
        ],
    }
    if report_dir is not None:
        result["report"] = {k: str(v) for k, v in write_base_report(result, generated, rendered, report_dir).items()}
    return result


# ---------------------------------------------------------------------------------------------
# the report folder: a picture and the numbers


def write_base_report(result: dict, generated: np.ndarray, rendered: np.ndarray, folder: str | Path,
                      columns: int = 4, upscale: int = 2) -> dict[str, Path]:
    """grid.png (each sample: generated | rendered, the judge's boxes and verdicts under them,
    green where scene and count are right, red where not) and report.json."""
    import json

    from PIL import Image, ImageDraw, ImageFont

    from .atomic import atomic_path

    folder = Path(folder)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        font = ImageFont.load_default()
    side = generated.shape[1] * upscale if len(generated) else 64 * upscale
    line, gap = 13, 8
    cell_w, cell_h = 2 * side + gap, side + 4 * line + gap
    rows = max(1, -(-len(generated) // columns))
    header = 3 * line + gap
    sheet = Image.new("RGB", (columns * cell_w + gap, header + rows * cell_h + gap), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    generated_rates, rendered_rates = result["generated"], result["rendered"]
    legend = [
        f"base model, {result['steps']} steps, guidance {result['guidance_scale']}: left generated, right rendered "
        f"(the caption's own scene); boxes: where the judge locates characters",
        "lines: caption truth / judge on generated / judge on rendered: place time prop count [word]: poses "
        "(s standing, j jumping, w waving); green: scene and count right",
        "accuracy generated / rendered: "
        + ",  ".join(f"{k} {generated_rates[k]:.2f} / {rendered_rates[k]:.2f}" for k in ("scene", "count", "position")),
    ]
    for n, text in enumerate(legend):
        draw.text((gap, gap // 2 + n * line), text, fill=(40, 40, 40), font=font)
    for i, record in enumerate(result["records"]):
        x, y = gap + (i % columns) * cell_w, header + (i // columns) * cell_h
        for k, (image, key) in enumerate(((generated[i], "generated"), (rendered[i], "rendered"))):
            tile = Image.fromarray(image).resize((side, side), Image.NEAREST)
            tile_draw = ImageDraw.Draw(tile)
            for character in record[key]["characters"]:
                x0, y0, x1, y1 = (v * upscale for v in character["box"])
                tile_draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255))
            sheet.paste(tile, (x + k * side, y))
        truth = record["truth"]
        lines = [(f"#{i} {truth['place']} {truth['time']} {truth['prop']} "
                  + _who(truth["count"], truth["positions"], truth["poses"]), (40, 40, 40))]
        for key, label in (("generated", "gen"), ("rendered", "ren")):
            verdict, right = record[key], record[key]["right"]
            ok = right["scene"] and right["count"]
            words = [c["position"] for c in verdict["characters"]]
            text = (f"{label}: {verdict['place']} {verdict['time']} {verdict['prop']} "
                    + _who(verdict["count"], words, verdict["poses"]) + f"  pos {sum(right['positions'])}/{truth['count']}")
            lines.append((text, (20, 130, 40) if ok else (200, 30, 30)))
        for n, (text, colour) in enumerate(lines):
            draw.text((x, y + side + 2 + n * line), text, fill=colour, font=font)
    paths = {"grid": folder / "grid.png", "json": folder / "report.json"}
    with atomic_path(paths["grid"]) as tmp:
        sheet.save(tmp, format="PNG")
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2) + "\n")
    return paths


def _who(count: int, positions: list[str], poses: list[str]) -> str:
    """'1 left: w' for a lone character, '3: s j w' otherwise (poses left to right)."""
    word = f" {positions[0]}" if count == 1 and positions else ""
    return f"{count}{word}: " + " ".join(p[0] for p in poses)
