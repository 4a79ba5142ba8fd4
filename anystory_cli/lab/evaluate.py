"""Measuring the default model with the independent judge (`anystory_cli/lab/judge.py`).

    evaluate_base(pipe, judge, n_samples=64, seed=0, steps=25, guidance=4.0) -> dict
    evaluate_base(..., report_dir="out/eval")      # also grid.png and report.json there

The base model must draw the world from a caption alone: the right place and time of day, the
right number of characters, each at its place. Captions come from held-out scenes of the sprite
world (`sample_scene(..., split="heldout")`, scene seeds drawn from `seed`, 1-4 characters in
turn); the base pipeline draws each caption; the judge reads both the generated image and the
scene that the caption was written from, so every figure comes with the judge's own accuracy on
the same captions' rendered pictures beside it.

`evaluate_adapter` (below) grades AnyStory itself on held-out identities: identity and blending
per character at its place, placement, the router as a segmenter, and the ablations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..sd.figures import DEFAULT_PASTE_AT
from ..sd.guidance import DEFAULT_INTERVAL, guided_call_kwargs
from .judge import (Judge, SceneTruth, identity_log_likelihood, rounded_mean, scene_truth, score_scene, summarise,
                    verdict_of)
from ..plan import figure_boxes
from .world.identity import NOT_APPLICABLE, draw_identity_seed, identity_from_seed
from .world.rng import WorldRng, stable_hash
from .world.scenes import MAX_CHARACTERS, Scene, placeable_scene, sample_scene

# Goal: scene (place and time) and count right on at least 90 % of generated images.
BASE_GOALS = {"scene": 0.9, "count": 0.9}
HEADLINE = ("place", "time", "scene", "prop", "count", "position", "pose")


def json_safe(value):
    """NaN (nothing to measure, e.g. no panel of that kind) as None: strict JSON for CI tools."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def base_eval_scenes(n_samples: int, seed: int = 0, size: int | tuple[int, int] = 64) -> list[Scene]:
    """Held-out scenes whose captions the base model is asked to draw; 1, 2, 3, 4 characters in
    turn so that every count is equally represented (`size`: a square's side or (height, width);
    a tall scene too narrow for 3-4 characters side by side gets fewer)."""
    rng = WorldRng("evaluate-base", int(seed))
    return [placeable_scene(rng, rng.integer(1 << 40), 1 + i % MAX_CHARACTERS, "heldout", size)
            for i in range(n_samples)]


def generate_from_captions(pipe, captions: list[str], noise_seeds: list[int], steps: int, guidance: float,
                           size: tuple[int, int], batch_size: int = 16,
                           progress: Callable[[int, int], None] | None = None,
                           guidance_interval: tuple[float, float] | None = DEFAULT_INTERVAL) -> np.ndarray:
    """uint8 (N, height, width, 3): each caption drawn by a diffusers text-to-image pipeline, with
    its own generator (the same image whatever the batch size), guided in `guidance_interval`."""
    height, width = size
    images = []
    for start in range(0, len(captions), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in noise_seeds[start:start + batch_size]]
        guided = guided_call_kwargs(pipe, guidance, guidance_interval, steps)
        out = pipe(prompt=captions[start:start + batch_size], num_inference_steps=steps, generator=generators,
                   output_type="np", height=height, width=width, **guided)
        images.append(np.clip(np.round(np.asarray(out.images) * 255), 0, 255).astype(np.uint8))
        if progress is not None:
            progress(min(start + batch_size, len(captions)), len(captions))
    return np.concatenate(images) if images else np.zeros((0, height, width, 3), np.uint8)


def _interval_record(interval: tuple[float, float] | None) -> list[float]:
    """The guided noise levels as [low, high] (None: every step, [0, 1])."""
    return [0.0, 1.0] if interval is None else [float(v) for v in interval]


def sampling_label(result: dict) -> str:
    """'guidance 4.0 at t/T in [0.0, 0.7]' for a result of either evaluation, and for the
    adapter's ', subject strength 1.0, reference strength 0.0'."""
    label = f"guidance {result['guidance_scale']} at t/T in {result['guidance_interval']}"
    if "subject_strength" in result:
        label += f", subject strength {result['subject_strength']}, reference strength {result['reference_strength']}"
        if not result.get("reference_guidance", True):
            label += ", references in both halves of guidance"
        if result.get("paste_references_at"):
            label += f", references pasted at t/T {result['paste_references_at']}"
    return label


def _judge_heldout(judge: Judge, size: tuple[int, int]) -> dict:
    """The judge's own held-out report on rendered scenes of this panel shape ({} for a shape it
    was not graded on)."""
    if tuple(size) == (judge.config.image_size,) * 2:
        report = judge.info.get("heldout", {})
    else:
        report = judge.info.get("heldout_shapes", {}).get(f"{size[0]}x{size[1]}", {})
    return report.get("rendered", {})


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
                  shape: tuple[int, int] | None = None, batch_size: int = 16, report_dir: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  guidance_interval: tuple[float, float] | None = DEFAULT_INTERVAL) -> dict:
    """Draw `n_samples` held-out captions with the base `pipe` and grade them with `judge`.

    `shape` (height, width) draws panels of that shape instead of the judge's square; the judge
    reads them squashed to its square, which keeps left-to-right order and relative positions
    (its own accuracy on the rendered scenes of that shape is reported beside, as always).

    Returns a plain dict: accuracies on the generated images ("generated") and the judge's own
    on the rendered scenes of the same captions ("rendered"), both overall and by character
    count; whether the issue's goals are met; timings; and one record per sample."""
    started = time.perf_counter()
    size = tuple(shape) if shape is not None else (judge.config.image_size,) * 2
    scenes = base_eval_scenes(n_samples, seed, size)
    truths = [scene_truth(scene) for scene in scenes]
    captions = [scene.caption for scene in scenes]
    noise_seeds = [stable_hash("evaluate-base-noise", int(seed), i) % (1 << 63) for i in range(n_samples)]
    generated = generate_from_captions(pipe, captions, noise_seeds, steps, guidance, size, batch_size, progress,
                                       guidance_interval)
    generate_seconds = time.perf_counter() - started
    rendered = np.stack([scene.image for scene in scenes]) if scenes else np.zeros((0, *size, 3), np.uint8)
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
    heldout = _judge_heldout(judge, size)
    result = {
        "model": "base",
        "samples": n_samples, "seed": seed, "steps": steps, "guidance_scale": guidance,
        "guidance_interval": _interval_record(guidance_interval),
        "image_size": list(size), "judge_size": judge.config.image_size,
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


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _write_report_json(path: Path, result: dict) -> None:
    """Every figure of `result` (its own paths aside) as strict JSON."""
    import json

    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe({k: v for k, v in result.items() if k != "report"}), indent=2,
                                  allow_nan=False) + "\n")


def write_base_report(result: dict, generated: np.ndarray, rendered: np.ndarray, folder: str | Path,
                      columns: int = 4, upscale: int = 2) -> dict[str, Path]:
    """grid.png (each sample: generated | rendered, the judge's boxes and verdicts under them,
    green where scene and count are right, red where not) and report.json."""
    from PIL import Image, ImageDraw

    from ..atomic import atomic_path

    folder = Path(folder)
    font = _font()
    height, width = result["image_size"]
    tile_w, tile_h = width * upscale, height * upscale
    # the judge's boxes are in its square frame; a panel of another shape was squashed into it
    box_scale = (tile_w / result["judge_size"], tile_h / result["judge_size"])
    line, gap = 13, 8
    cell_w, cell_h = 2 * tile_w + gap, tile_h + 4 * line + gap
    rows = max(1, -(-len(generated) // columns))
    header = 3 * line + gap
    sheet = Image.new("RGB", (columns * cell_w + gap, header + rows * cell_h + gap), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    generated_rates, rendered_rates = result["generated"], result["rendered"]
    legend = [
        f"base model, {result['steps']} steps, {sampling_label(result)}: left generated, right rendered "
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
            tile = Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST)
            tile_draw = ImageDraw.Draw(tile)
            for character in record[key]["characters"]:
                x0, y0, x1, y1 = character["box"]
                tile_draw.rectangle((x0 * box_scale[0], y0 * box_scale[1], x1 * box_scale[0] - 1,
                                     y1 * box_scale[1] - 1), outline=(255, 255, 255))
            sheet.paste(tile, (x + k * tile_w, y))
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
            draw.text((x, y + tile_h + 2 + n * line), text, fill=colour, font=font)
    paths = {"grid": folder / "grid.png", "json": folder / "report.json"}
    with atomic_path(paths["grid"]) as tmp:
        sheet.save(tmp, format="PNG")
    _write_report_json(paths["json"], result)
    return paths


def _who(count: int, positions: list[str], poses: list[str]) -> str:
    """'1 left: w' for a lone character, '3: s j w' otherwise (poses left to right)."""
    word = f" {positions[0]}" if count == 1 and positions else ""
    return f"{count}{word}: " + " ".join(p[0] for p in poses)


# =============================================================================================
# AnyStory: identities never seen in training, drawn where a story asks for them
#
#     evaluate_adapter(pipe, judge, panels_per_count=8, seed=0, ...) -> dict
#
# Panels are held-out scenes of 1-4 characters: the scene's caption is the prompt, each
# character's canonical reference (`world.reference_image`) its reference image, and its region
# the one a story gets (`plan.placement_boxes`: a lone character's `at:` word, otherwise one
# column each, left to right). The judge locates the characters of the drawn image, matches each
# to the region it was asked for, and *identifies* it: among the panel's own characters and
# `distractors` other held-out identities, the one whose attributes the judge's
# log-probabilities favour (`judge.identity_log_likelihood`). A character is
#   right     identified as itself,
#   blended   identified as another character of the same panel,
#   missing   not found in its region.
# Identification rather than "every attribute read right" because the judge reads all ten
# attributes right on only ~43 % of rendered characters; both are reported, each beside the
# judge's own figure on the rendered scene, which bounds what any model can score.

ADAPTER_VARIANTS: dict[str, dict | None] = {
    "anystory": {},
    "no_paste": {"paste_at": None},                   # no figure paste (figures.py)
    "no_router": {"route": False},                    # every character at every pixel
    "no_reference_net": {"reference_scale": None},    # subject tokens only
    "no_subject_tokens": {"subject_scale": 0.0},      # reference features only
    "text_only": None,                                # the base model with the caption alone
}
# Goals on held-out identities ("max" goals are upper bounds).
ADAPTER_GOALS = {"single_identity": 0.90, "two_identity": 0.85, "two_blending_max": 0.05,
                 "routing_iou_finest_late": 0.80}
ROUTING_TIMESTEP_SHARES = (0.9, 0.7, 0.5, 0.3, 0.1, 0.02)  # of the scheduler's training timesteps
LATE_TIMESTEP_SHARE = 0.1  # "near the end of sampling": the routing goal reads t <= this share


@dataclass(frozen=True)
class EvalPanel:
    scene: Scene  # held-out: caption, identities left to right, and the rendered truth
    regions: tuple[tuple[float, float, float, float], ...]  # where each character is asked to stand
    candidates: tuple[int, ...]  # identity seeds to identify among: the panel's own, then distractors
    noise_seed: int


def adapter_eval_panels(panels_per_count: int, seed: int = 0, distractors: int = 9,
                        size: int | tuple[int, int] = 64,
                        counts: tuple[int, ...] = tuple(range(1, MAX_CHARACTERS + 1))) -> list[EvalPanel]:
    """Held-out panels, `panels_per_count` with each number of characters in `counts` (1-4;
    `size`: a square's side or (height, width); a tall panel too narrow for 3-4 characters gets
    fewer). Leaving out the larger counts keeps the panels of the smaller ones as they are."""
    from ..plan import placement_boxes
    from ..story import CharacterRef

    rng = WorldRng("evaluate-adapter", int(seed))
    panels = []
    for count in range(1, max(counts, default=0) + 1):
        for k in range(panels_per_count):
            scene = placeable_scene(rng, rng.integer(1 << 40), count, "heldout", size)
            words = [inst.position for inst in scene.instances]
            placed = len(words)
            refs = [CharacterRef(name=f"c{i}", at=words[0] if placed == 1 else None) for i in range(placed)]
            looks = {identity_from_seed(s).key() for s in scene.identity_seeds}
            others: list[int] = []
            while len(others) < distractors:
                candidate = draw_identity_seed(rng, "heldout")
                if identity_from_seed(candidate).key() not in looks:
                    others.append(candidate)
                    looks.add(identity_from_seed(candidate).key())
            if count not in counts:
                continue  # drawn all the same: the later counts' panels stay the same
            panels.append(EvalPanel(scene=scene, regions=tuple(placement_boxes(refs)),
                                    candidates=tuple(scene.identity_seeds) + tuple(others),
                                    noise_seed=stable_hash("evaluate-adapter-noise", int(seed), count, k) % (1 << 63)))
    return panels


def match_to_places(expected: list[tuple[float, float, float, float]], located: list[tuple[float, ...]],
                    width: float) -> list[int | None]:
    """For each expected box (0..1), the index of the located box (pixels) whose centre lies in
    its horizontal span and is nearest its centre; each located box serves one character."""
    pairs = []
    for i, (x0, _, x1, _) in enumerate(expected):
        for j, box in enumerate(located):
            centre = (box[0] + box[2]) / 2 / width
            if x0 <= centre <= x1:
                pairs.append((abs(centre - (x0 + x1) / 2), i, j))
    chosen: list[int | None] = [None] * len(expected)
    used = set()
    for _, i, j in sorted(pairs):
        if chosen[i] is None and j not in used:
            chosen[i] = j
            used.add(j)
    return chosen


def judge_panel(judge: Judge, image: np.ndarray, panel: EvalPanel,
                expected: list[tuple[float, float, float, float]]) -> list[dict]:
    """One record per character of the panel: found, identified as, right, blended, attributes, and
    whether it is drawn in the pose the caption asks for (`pose`)."""
    verdict = judge.read_scenes(image[None])[0]
    boxes = [c.box for c in verdict.characters]
    log_probs = judge.character_log_probs(image[None], [boxes], as_drawn=True)[0]
    matched = match_to_places(expected, boxes, judge.config.image_size)
    own = list(panel.scene.identity_seeds)
    candidates = [(s, identity_from_seed(s).attributes()) for s in panel.candidates]
    records = []
    for i, j in enumerate(matched):
        truth = identity_from_seed(own[i]).attributes()
        record = {"identity_seed": own[i], "found": j is not None, "identified_as": None,
                  "right": False, "blended": False, "all_attributes": False, "pose": False,
                  "attributes": {name: False for name, v in truth.items() if v != NOT_APPLICABLE}}
        if j is not None:
            scores = [identity_log_likelihood(log_probs[j], attrs) for _, attrs in candidates]
            chosen = candidates[int(np.argmax(scores))][0]
            verdict_j = verdict_of(log_probs[j])
            read = verdict_j.attributes
            record.update(identified_as=chosen, right=chosen == own[i], blended=chosen in own and chosen != own[i],
                          all_attributes=read == truth, pose=verdict_j.pose == panel.scene.instances[i].pose,
                          attributes={name: read[name] == v for name, v in truth.items() if v != NOT_APPLICABLE},
                          box=[round(v, 1) for v in boxes[j]])
        records.append(record)
    return records


def _true_places(scene: Scene) -> list[tuple[float, float, float, float]]:
    height, width = scene.size
    return [(x0 / width, y0 / height, x1 / width, y1 / height) for x0, y0, x1, y1 in scene.boxes]


def summarise_characters(records: list[dict]) -> dict:
    """Rates over characters: identity, blending, found, all attributes, pose, each attribute."""
    out = {key: rounded_mean([r[key] for r in records]) for key in ("right", "blended", "found", "all_attributes", "pose")}
    out["identity"] = out.pop("right")
    names = sorted({name for r in records for name in r["attributes"]})
    out["per_attribute"] = {name: rounded_mean([r["attributes"][name] for r in records if name in r["attributes"]])
                            for name in names}
    out["characters"] = len(records)
    return out


def _records_by_count(panels: list[EvalPanel], per_panel: list[list[dict]]) -> dict[str, list[dict]]:
    """Character records grouped by the panel's number of characters ("1".."4"), and "multi" (2-4)."""
    groups = {str(c): [r for p, rs in zip(panels, per_panel) if len(p.scene.instances) == c for r in rs]
              for c in range(1, MAX_CHARACTERS + 1)}
    groups["multi"] = [r for p, rs in zip(panels, per_panel) if len(p.scene.instances) > 1 for r in rs]
    return groups


def _by_count(panels: list[EvalPanel], per_panel: list[list[dict]]) -> dict:
    return {key: summarise_characters(records) for key, records in _records_by_count(panels, per_panel).items()
            if records}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate seen `successes` times in `trials`, to 4 decimals:
    unlike rate ± 2 standard errors it stays inside 0..1 and is not empty at 0 of 32, which is
    where the blending goal (<= 0.05) is read. (nan, nan) without trials. `z` is the normal
    quantile of the interval's half-width (1.96: 95 %)."""
    from scipy.stats import binomtest, norm

    if trials == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, trials).proportion_ci(method="wilson", confidence_level=2 * norm.cdf(z) - 1)
    return round(float(max(0.0, interval.low)), 4), round(float(min(1.0, interval.high)), 4)


def sign_test(only_first: int, only_second: int) -> float:
    """Two-sided exact sign test, to 4 decimals: the chance of a split at least this uneven between
    the two kinds of discordant pairs if either setting were as likely to win each (1.0 without any)."""
    from scipy.stats import binomtest

    trials = only_first + only_second
    if trials == 0:
        return 1.0
    return round(min(1.0, float(binomtest(only_first, trials, 0.5).pvalue)), 4)


def compare_adapter_runs(pairs: list[tuple[dict, dict]], before: str = "anystory", after: str = "anystory") -> dict:
    """Two settings on the same panels and noise, paired character by character.

    `pairs`: (before, after) results of `evaluate_adapter` (its --json output) drawn with the same
    seed and panels per count, pooled over all pairs; `before` and `after` name the variant read
    from each. Per character count and for 2-4 characters: identity before and after (with the
    after's 95 % interval), the characters only one of them picks out right, the sign test's p on
    those, and blending before and after. Rates a few points apart on a few hundred characters
    are within the noise; the discordant counts say whether the same characters moved."""
    counts: dict[str, dict[str, int]] = {}
    for index, (first, second) in enumerate(pairs):
        for result, variant in ((first, before), (second, after)):
            if variant not in result.get("variants", ()):
                raise InputError(f"pair {index + 1}: variant {variant!r} was not drawn "
                                 f"(drawn: {', '.join(result.get('variants', ())) or 'none'})")
        if [p["scene_seed"] for p in first["panels"]] != [p["scene_seed"] for p in second["panels"]]:
            raise InputError(f"pair {index + 1}: the two runs drew different panels "
                             f"(seeds {first.get('seed')} and {second.get('seed')}, panels per count "
                             f"{first.get('panels_per_count')} and {second.get('panels_per_count')})")
        for panel_a, panel_b in zip(first["panels"], second["panels"]):
            number = str(len(panel_a["identity_seeds"]))
            for a, b in zip(panel_a["judged"][before], panel_b["judged"][after]):
                for key in (number, "multi") if number != "1" else (number,):
                    tally = counts.setdefault(key, dict.fromkeys(
                        ("characters", "right_before", "right_after", "only_before", "only_after",
                         "blended_before", "blended_after"), 0))
                    tally["characters"] += 1
                    tally["right_before"] += bool(a["right"])
                    tally["right_after"] += bool(b["right"])
                    tally["only_before"] += bool(a["right"]) and not b["right"]
                    tally["only_after"] += bool(b["right"]) and not a["right"]
                    tally["blended_before"] += bool(a["blended"])
                    tally["blended_after"] += bool(b["blended"])
    out = {}
    for key in sorted(counts, key=lambda k: (k == "multi", k)):
        tally, n = counts[key], counts[key]["characters"]
        out[key] = {**tally, "identity_before": round(tally["right_before"] / n, 4),
                    "identity_after": round(tally["right_after"] / n, 4),
                    "identity_after_interval": list(wilson_interval(tally["right_after"], n)),
                    "sign_test_p": sign_test(tally["only_before"], tally["only_after"])}
    return {"before": before, "after": after, "pairs": len(pairs), "by_count": out}


def _goal_intervals(panels: list[EvalPanel], judged: list[list[dict]]) -> dict[str, tuple[float, float]]:
    """95 % intervals of the rate goals: how far the panels drawn can tell a goal met from missed."""
    groups = _records_by_count(panels, judged)

    def interval(count: str, verdict: str) -> tuple[float, float]:
        return wilson_interval(sum(bool(r[verdict]) for r in groups[count]), len(groups[count]))

    return {"single_identity": interval("1", "right"), "two_identity": interval("2", "right"),
            "two_blending_max": interval("2", "blended")}


class _TakeScorer:
    """Identity scores of a drawn evaluation panel, as a story's render scores its panels: each
    identity's canonical reference embedded once, each routed region cut out of the panel."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.references: dict[int, np.ndarray] = {}

    def reference(self, identity_seed: int) -> np.ndarray:
        from PIL import Image

        from .world.scenes import reference_image

        if identity_seed not in self.references:
            picture = Image.fromarray(reference_image(identity_seed))
            self.references[identity_seed] = self.pipe.identity_embeddings([picture], [None])[0]
        return self.references[identity_seed]

    def __call__(self, panel: EvalPanel, image: np.ndarray, layers: dict) -> list:
        from PIL import Image

        from ..scores import routed_regions, score_panel

        seeds = list(panel.scene.identity_seeds)
        names = [f"c{i}" for i in range(len(seeds))]
        regions = routed_regions(image_routing_maps(layers, image.shape[:2]), len(seeds))
        picture = Image.fromarray(image)
        found = [i for i, region in enumerate(regions) if region.mean() > 0]
        embeddings = np.zeros((len(seeds), len(self.reference(seeds[0]))), np.float32)
        if found:
            embeddings[found] = self.pipe.identity_embeddings([picture] * len(found), [regions[i] for i in found])
        return score_panel(names, np.stack([self.reference(s) for s in seeds]), regions, embeddings)


def image_routing_maps(layers: dict, size: tuple[int, int]) -> np.ndarray:
    """(E, H, W): the last step's routing layers at image size, averaged, as a render stores them."""
    maps = torch.stack([F.interpolate(m.float(), size=tuple(size), mode="bilinear", align_corners=False)
                        for m in layers.values()]).mean(dim=0)
    return maps[0].cpu().numpy()


def _best_of_takes(draw: Callable, judge: Judge, panel: EvalPanel, scorer: _TakeScorer, takes: int,
                   min_identity: float | None, seconds: dict[str, float]):
    """((image, routing layers) of the take the scores pick, a record of every take: its noise
    seed, scores and the judge's verdicts). Take k draws from `scores.take_seed(noise_seed, k)`;
    scoring counts in the AnyStory variant's `seconds` (a render pays it), judging does not."""
    from dataclasses import replace

    from ..scores import CharacterScore, best_take, good_enough, take_seed

    drawn, record = [], []
    for take in range(takes):
        noise_seed = take_seed(panel.noise_seed, take)
        image, layers = draw(replace(panel, noise_seed=noise_seed))
        clock = time.perf_counter()
        scores = scorer(panel, image, layers)
        seconds["anystory"] += time.perf_counter() - clock
        drawn.append((image, layers))
        record.append({"noise_seed": noise_seed, "scores": [s.to_dict() for s in scores],
                       "judged": judge_panel(judge, image, panel, list(panel.regions))})
        if good_enough(scores, min_identity):
            break
    picked = best_take([[CharacterScore.from_dict(d) for d in r["scores"]] for r in record])
    return drawn[picked], {"picked": picked, "takes": record}


def summarise_takes(records: list[dict]) -> dict:
    """How the scores' pick fares with the judge: the judge's identity rate on the picked take,
    on a take drawn at random (the mean over the takes drawn), on the first take (what one take
    draws) and on the judge's own best take (what a perfect picker would reach); per character
    count; and the takes drawn per panel. {} without takes."""
    if not records:
        return {}

    def rate(verdicts: list[dict]) -> float:
        return float(np.mean([v["right"] for v in verdicts]))

    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(len(record["takes"][0]["judged"])), []).append(record)
    out: dict = {"panels": len(records), "takes_drawn": rounded_mean([len(r["takes"]) for r in records])}
    for key, members in sorted(groups.items()):
        picked = [rate(r["takes"][r["picked"]]["judged"]) for r in members]
        random = [float(np.mean([rate(t["judged"]) for t in r["takes"]])) for r in members]
        first = [rate(r["takes"][0]["judged"]) for r in members]
        best = [max(rate(t["judged"]) for t in r["takes"]) for r in members]
        out[key] = {"panels": len(members), "picked": rounded_mean(picked), "random": rounded_mean(random),
                    "first": rounded_mean(first), "oracle": rounded_mean(best),
                    "picked_beats_random": sum(p > r + 1e-9 for p, r in zip(picked, random)),
                    "random_beats_picked": sum(r > p + 1e-9 for p, r in zip(picked, random))}
    return out


def draw_panel(pipe, panel: EvalPanel, encodings: list, variant: str, steps: int, guidance: float,
               record_routing: bool = False, guidance_interval: tuple[float, float] | None = DEFAULT_INTERVAL,
               subject_strength: float = 1.0, reference_strength: float = 0.0,
               size: tuple[int, int] | None = None, reference_guidance: bool = True,
               paste_at: float = DEFAULT_PASTE_AT):
    """(uint8 image at the pipeline's native size or `size` (height, width), last-step routing
    layers or None). The strengths are η and γ and `paste_at` the figure paste's noise level
    (0: none), as a story's style sets them; an ablation overrides its own."""
    options = ADAPTER_VARIANTS[variant]
    if options is not None:
        options = {"subject_scale": subject_strength, "reference_scale": reference_strength,
                   "reference_guidance": reference_guidance, "paste_at": paste_at or None,
                   "figure_boxes": figure_boxes(panel.regions), **options}
    generator = torch.Generator().manual_seed(panel.noise_seed)
    common = dict(num_inference_steps=steps, guidance_scale=guidance, guidance_interval=guidance_interval,
                  generator=generator, output_type="np")
    if size is not None:
        common.update(height=size[0], width=size[1])
    if options is None:  # the base alone: no characters, no injection (== the plain base pipeline)
        out = pipe(panel.scene.caption, characters=[], subject_scale=0.0, **common)
    else:
        out = pipe(panel.scene.caption, characters=encodings, regions=list(panel.regions),
                   return_routing=record_routing, **options, **common)
    image = np.clip(np.round(np.asarray(out.images[0]) * 255), 0, 255).astype(np.uint8)
    return image, out.routing_layers


def region_share(layers: dict[str, torch.Tensor], regions) -> float:
    """Mean over characters and layers of the share of a character's routing mass inside its region."""
    from ..sd.pipeline import region_to_mask

    shares = []
    for maps in layers.values():
        size = tuple(maps.shape[-2:])
        for i, region in enumerate(regions):
            inside = region_to_mask(region, size, i)
            total = float(maps[0, i].sum())
            if total > 0:
                shares.append(float((maps[0, i] * inside).sum()) / total)
    return rounded_mean(shares)


def routing_eval_scenes(count: int, seed: int, size: int) -> list[Scene]:
    """The rendered held-out scenes the router is scored on as a segmenter: 2, 3, 4 characters in turn."""
    rng = WorldRng("evaluate-adapter-routing", int(seed))
    return [sample_scene(rng.integer(1 << 40), 2 + i % (MAX_CHARACTERS - 1), "heldout", size) for i in range(count)]


def noised_routing_maps(pipe, scenes: list[Scene], characters_of: Callable, seed: int, timesteps: list[int]):
    """Yields (scene, t, {layer: (1, E, h, w) soft routing maps}) for each scene and timestep:
    one conditional UNet call on the scene's latents noised to t as in training (the forward
    process of the same beta schedule, whatever sampler the pipeline draws with), with each
    scene's own noise. `characters_of(scene)` gives its characters' encodings, in order."""
    from PIL import Image

    from diffusers import DDPMScheduler

    vae = pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for n, scene in enumerate(scenes):
        image = np.array(Image.fromarray(scene.image).resize((side, side), Image.Resampling.NEAREST))
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        latents = vae.encode(pixels.to(pipe.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(stable_hash("iou", seed, n) % (1 << 63)))
        characters = characters_of(scene)
        for t in timesteps:
            noisy = scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), torch.tensor([t]))
            yield scene, t, pipe.route_latents(noisy, t, scene.caption, characters)


def routing_iou(pipe, scenes: list[Scene], encode: Callable, seed: int = 0,
                shares: tuple[float, ...] = ROUTING_TIMESTEP_SHARES) -> dict:
    """The router as a segmenter on noised *real* (rendered) scenes: at each timestep, every
    cross-attention layer's routing map, made hard (each latent pixel to its likeliest entry),
    against each character's true mask at that layer's resolution (area > 1/2). Mean IoU over
    characters and scenes, per layer resolution (side in latent pixels) and timestep; and the
    same for the foreground (any character against the union of the masks), which tells a
    router that finds characters but mixes them up from one that does not find them."""
    total_steps = pipe.scheduler.config.num_train_timesteps
    timesteps = [max(1, min(total_steps - 1, int(round(s * total_steps)))) for s in shares]
    sums: dict[tuple[int, int], list[float]] = {}
    foreground: dict[tuple[int, int], list[float]] = {}
    for scene, t, layers in noised_routing_maps(pipe, scenes, lambda sc: [encode(s) for s in sc.identity_seeds],
                                                seed, timesteps):
        masks = torch.from_numpy(scene.masks).float()[:, None]  # (K, 1, H, W)
        for maps in layers.values():
            h, w = maps.shape[-2:]
            hard = maps[0].argmax(0)
            truth = F.interpolate(masks, size=(h, w), mode="area")[:, 0] > 0.5
            for i in range(len(scene.identity_seeds)):
                union = ((hard == i) | truth[i]).sum().item()
                if union:
                    sums.setdefault((h, t), []).append(((hard == i) & truth[i]).sum().item() / union)
            drawn, anyone = hard < len(scene.identity_seeds), truth.any(dim=0)
            union = (drawn | anyone).sum().item()
            if union:
                foreground.setdefault((h, t), []).append((drawn & anyone).sum().item() / union)
    resolutions = sorted({h for h, _ in sums}, reverse=True)
    finest = str(resolutions[0]) if resolutions else None
    late = [str(t) for t in timesteps if t <= LATE_TIMESTEP_SHARE * total_steps]

    def tabled(values: dict) -> tuple[dict, float]:
        table = {str(h): {str(t): rounded_mean(values.get((h, t), [])) for t in timesteps} for h in resolutions}
        return table, rounded_mean([table[finest][t] for t in late]) if finest and late else float("nan")

    table, finest_late = tabled(sums)
    foreground_table, foreground_late = tabled(foreground)
    return {"timesteps": timesteps, "by_resolution": table, "finest_resolution": finest,
            "finest_late": finest_late, "foreground_by_resolution": foreground_table,
            "foreground_finest_late": foreground_late, "scenes": len(scenes)}


def evaluate_adapter(pipe, judge: Judge, panels_per_count: int = 8, seed: int = 0, steps: int = 25,
                     guidance: float = 4.0, distractors: int = 9, routing_scenes: int = 8,
                     variants: tuple[str, ...] = tuple(ADAPTER_VARIANTS), report_dir: str | Path | None = None,
                     progress: Callable[[str, int, int], None] | None = None,
                     guidance_interval: tuple[float, float] | None = DEFAULT_INTERVAL,
                     subject_strength: float = 1.0, reference_strength: float = 0.0,
                     shape: tuple[int, int] | None = None, reference_guidance: bool = True,
                     paste_at: float = DEFAULT_PASTE_AT, takes: int = 1, min_identity: float | None = None,
                     counts: tuple[int, ...] = tuple(range(1, MAX_CHARACTERS + 1))) -> dict:
    """Identity, blending, placement and routing IoU of an `AnyStoryPipeline` on held-out
    identities, with the ablations in `variants` drawn from the same noise. Returns a plain dict
    (see `anystory evaluate adapter --json`); `report_dir` also gets the pictures.
    `takes` > 1 draws each AnyStory panel up to that many times, as a story's `style.takes`
    does (take 0 from the panel's own noise, `min_identity` stopping early), and keeps the take
    the identity scores pick (`scores.best_take`); the judge, which the scores never see, grades
    every take, so that the result also says how often the scores' pick is the judge's
    (`result["takes"]`). `counts`: the numbers of characters per panel to draw.
    `subject_strength` (η), `reference_strength` (γ), `reference_guidance` and `paste_at` are a
    story's style settings (`paste_at`: `paste_references_at`).
    `shape` (height, width) draws the panels at that shape instead of the judge's square: the
    judge locates characters in the panel squashed to its square and reads each one from the
    panel as drawn. The routing IoU is measured on square scenes whatever the shape."""
    from PIL import Image

    from .world.scenes import reference_image

    unknown = [v for v in variants if v not in ADAPTER_VARIANTS]
    if unknown or "anystory" not in variants:
        raise InputError(f"variants must include 'anystory' and be among {list(ADAPTER_VARIANTS)}, got {list(variants)}")
    started = time.perf_counter()
    size = judge.config.image_size
    panel_size = tuple(shape) if shape is not None else (size, size)
    panels = adapter_eval_panels(panels_per_count, seed, distractors, panel_size, tuple(counts))
    encodings: dict[int, object] = {}

    def encode(identity_seed: int):  # each identity once, like a story's character sheet
        if identity_seed not in encodings:
            encodings[identity_seed] = pipe.encode_character(Image.fromarray(reference_image(identity_seed)),
                                                             name=f"identity {identity_seed}")
        return encodings[identity_seed]

    images = {v: [] for v in variants}
    judged = {v: [] for v in variants}
    routing_layers, shares, take_records = [], [], []
    seconds = dict.fromkeys(variants, 0.0)
    scorer = _TakeScorer(pipe) if takes > 1 else None
    total = len(panels) * len(variants)
    for n, panel in enumerate(panels):
        characters = [encode(s) for s in panel.scene.identity_seeds]
        for k, variant in enumerate(variants):

            def draw(drawn: EvalPanel, variant: str = variant):
                clock = time.perf_counter()
                try:
                    return draw_panel(pipe, drawn, characters, variant, steps, guidance,
                                      record_routing=variant == "anystory", guidance_interval=guidance_interval,
                                      subject_strength=subject_strength, reference_strength=reference_strength,
                                      size=shape, reference_guidance=reference_guidance, paste_at=paste_at)
                finally:
                    seconds[variant] += time.perf_counter() - clock

            if variant == "anystory" and scorer is not None:
                (image, layers), record = _best_of_takes(draw, judge, panel, scorer, takes, min_identity, seconds)
                take_records.append(record)
                verdicts = record["takes"][record["picked"]]["judged"]
            else:
                image, layers = draw(panel)
                verdicts = judge_panel(judge, image, panel, list(panel.regions))
            images[variant].append(image)
            judged[variant].append(verdicts)
            if layers is not None:
                routing_layers.append(layers)
                shares.append(region_share(layers, panel.regions))
            if progress is not None:
                progress("draw", n * len(variants) + k + 1, total)
    draw_seconds = time.perf_counter() - started
    rendered = [judge_panel(judge, p.scene.image, p, _true_places(p.scene)) for p in panels]

    iou = routing_iou(pipe, routing_eval_scenes(routing_scenes, seed, size), encode, seed)
    if progress is not None:
        progress("routing", routing_scenes, routing_scenes)

    results = {v: _by_count(panels, judged[v]) for v in variants}
    ceiling = _by_count(panels, rendered)
    anystory = results["anystory"]
    nothing = {"identity": float("nan"), "blended": float("nan")}  # a count not drawn
    reached = {
        "single_identity": anystory.get("1", nothing)["identity"],
        "two_identity": anystory.get("2", nothing)["identity"],
        "two_blending_max": anystory.get("2", nothing)["blended"],
        "routing_iou_finest_late": iou["finest_late"],
    }
    met = {k: (reached[k] <= goal if k.endswith("_max") else reached[k] >= goal) for k, goal in ADAPTER_GOALS.items()}
    result = {
        "model": "anystory", "model_id": getattr(pipe, "model_id", None),
        "panels_per_count": panels_per_count, "seed": seed, "steps": steps, "guidance_scale": guidance,
        "guidance_interval": _interval_record(guidance_interval),
        "subject_strength": subject_strength, "reference_strength": reference_strength,
        "reference_guidance": reference_guidance, "paste_references_at": paste_at,
        "distractors": distractors, "candidates": distractors + 1, "variants": list(variants),
        "results": results,
        "rendered": ceiling,
        "placement": {"routing_share_in_region": rounded_mean(shares),
                      "found_in_region": anystory["multi"]["found"] if "multi" in anystory else float("nan")},
        "routing_iou": iou,
        "goals": dict(ADAPTER_GOALS), "reached": reached, "goals_met": met,
        "goal_intervals": {k: list(v) for k, v in _goal_intervals(panels, judged["anystory"]).items()},
        "image_size": list(panel_size), "routing_iou_image_size": [size, size],
        "judge_heldout": {k: v for k, v in _judge_heldout(judge, panel_size).items() if not isinstance(v, dict)},
        "counts": sorted(set(counts)), "takes": {"takes": takes, "min_identity": min_identity,
                                                 **summarise_takes(take_records)},
        "seconds": {"draw": round(draw_seconds, 1), "total": round(time.perf_counter() - started, 1),
                    "per_panel": {v: round(seconds[v] / len(panels), 3) if panels else float("nan")
                                  for v in variants}},
        "panels": [
            {"index": i, "scene_seed": p.scene.seed, "caption": p.scene.caption,
             "identity_seeds": list(p.scene.identity_seeds), "regions": [list(r) for r in p.regions],
             "candidates": list(p.candidates),
             "judged": {v: judged[v][i] for v in variants}, "rendered": rendered[i],
             **({"takes": take_records[i]} if take_records else {})}
            for i, p in enumerate(panels)
        ],
    }
    if report_dir is not None:
        result["report"] = {k: str(v) for k, v in write_adapter_report(
            result, panels, images, routing_layers, report_dir).items()}
    return result


# ---------------------------------------------------------------------------------------------
# the adapter's report folder: samples.png, routing.png, index.html, report.json

VERDICT_LETTERS = {"right": "R", "blended": "B", "wrong": "x", "missing": "-"}


def _verdict_letter(record: dict) -> str:
    if not record["found"]:
        return VERDICT_LETTERS["missing"]
    return VERDICT_LETTERS["right" if record["right"] else "blended" if record["blended"] else "wrong"]


def write_adapter_report(result: dict, panels: list[EvalPanel], images: dict[str, list[np.ndarray]],
                         routing_layers: list[dict], folder: str | Path, max_panels: int = 16) -> dict[str, Path]:
    from ..atomic import atomic_path

    folder = Path(folder)
    paths = {"samples": folder / "samples.png", "routing": folder / "routing.png",
             "html": folder / "index.html", "json": folder / "report.json"}
    pictures = {"samples": _samples_sheet(result, panels, images, max_panels),
                "routing": _routing_sheet(panels, images["anystory"], routing_layers, max_panels,
                                          _tile_width(result, 128))}
    for key, sheet in pictures.items():
        with atomic_path(paths[key]) as tmp:
            sheet.save(tmp, format="PNG")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(_adapter_html(result), encoding="utf-8")  # as its <meta charset> says
    _write_report_json(paths["json"], result)
    return paths


def _spread(panels: list[EvalPanel], max_panels: int) -> list[int]:
    """Indices of up to `max_panels` panels, the same number with each character count."""
    by_count: dict[int, list[int]] = {}
    for i, p in enumerate(panels):
        by_count.setdefault(len(p.scene.instances), []).append(i)
    per = max(1, max_panels // max(1, len(by_count)))
    return sorted(i for indices in by_count.values() for i in indices[:per])


def _samples_sheet(result: dict, panels: list[EvalPanel], images: dict[str, list[np.ndarray]], max_panels: int):
    """One line per panel: its references | each variant's image with the regions asked for and
    a letter per character (R right, B blended, x wrong, - missing) | the rendered scene."""
    from PIL import Image, ImageDraw

    from ..overlay import ROUTING_COLOURS
    from .world.scenes import reference_image

    font, tile, ref_tile, gap, line = _font(), 128, 48, 6, 13
    tile_w = _tile_width(result, tile)
    variants = result["variants"]
    chosen = _spread(panels, max_panels)
    width = MAX_CHARACTERS * ref_tile + (len(variants) + 1) * (tile_w + gap) + 3 * gap
    header = 3 * line + gap
    row_h = tile + line + gap
    sheet = Image.new("RGB", (width, header + line + len(chosen) * row_h + gap), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), f"held-out identities, {result['steps']} steps, {sampling_label(result)}; "
              f"each character identified among {result['candidates']} (its panel's and distractors)", fill=(40, 40, 40), font=font)
    draw.text((gap, 2 + line), "letters per character, left to right: R right, B blended (another character of the "
              "panel), x wrong, - not found in its region; boxes: the regions asked for", fill=(40, 40, 40), font=font)
    x0 = MAX_CHARACTERS * ref_tile + 2 * gap
    for k, name in enumerate([*variants, "rendered truth"]):
        draw.text((x0 + k * (tile_w + gap), header), name, fill=(40, 40, 40), font=font)
    for row, i in enumerate(chosen):
        panel, y = panels[i], header + line + row * row_h
        for c, identity_seed in enumerate(panel.scene.identity_seeds):
            rgba = Image.fromarray(reference_image(identity_seed)).resize((ref_tile, ref_tile), Image.Resampling.NEAREST)
            backing = Image.new("RGB", rgba.size, (0, 0, 0))
            backing.paste(rgba, mask=rgba.getchannel("A"))
            sheet.paste(backing, (gap + c * ref_tile, y))
            draw.rectangle((gap + c * ref_tile, y + ref_tile, gap + (c + 1) * ref_tile - 2, y + ref_tile + 3),
                           fill=ROUTING_COLOURS[c % len(ROUTING_COLOURS)])
        draw.text((gap, y + ref_tile + 6), f"#{i}", fill=(40, 40, 40), font=font)
        columns = [(images[v][i], result["panels"][i]["judged"][v], True) for v in variants]
        columns.append((panel.scene.image, result["panels"][i]["rendered"], False))
        for k, (image, records, with_regions) in enumerate(columns):
            x = x0 + k * (tile_w + gap)
            picture = Image.fromarray(image).convert("RGB").resize((tile_w, tile), Image.Resampling.NEAREST)
            picture_draw = ImageDraw.Draw(picture)
            if with_regions:
                for c, (rx0, ry0, rx1, ry1) in enumerate(panel.regions):
                    picture_draw.rectangle((rx0 * tile_w + c, ry0 * tile + c, rx1 * tile_w - 1 - c, ry1 * tile - 1 - c),
                                           outline=ROUTING_COLOURS[c % len(ROUTING_COLOURS)])
            sheet.paste(picture, (x, y))
            letters = " ".join(_verdict_letter(r) for r in records)
            ok = all(r["right"] for r in records)
            draw.text((x, y + tile + 1), letters, fill=(20, 130, 40) if ok else (200, 30, 30), font=font)
    return sheet


def _tile_width(result: dict, tile: int) -> int:
    """Width of a picture `tile` pixels high in the report sheets, keeping the panels' shape."""
    height, width = result["image_size"]
    return max(1, round(tile * width / height))


def _routing_sheet(panels: list[EvalPanel], generated: list[np.ndarray], routing_layers: list[dict], max_panels: int,
                   tile_w: int = 128):
    """Generated image | the finest layers' routing maps of the last step (one colour per
    character, dark grey the background), for the panels with two or more characters."""
    from PIL import Image, ImageDraw

    from ..train.report import finest_routing, soft_routing

    font, tile, gap, line = _font(), 128, 6, 13
    chosen = [i for i in _spread(panels, max_panels) if len(panels[i].scene.instances) > 1][:max_panels]
    per_row = 3
    rows = max(1, -(-len(chosen) // per_row))
    sheet = Image.new("RGB", (per_row * (2 * tile_w + 3 * gap), line + rows * (tile + line + gap) + gap), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 1), "generated | routing at the finest layers, last step (colours: characters left to right)",
              fill=(40, 40, 40), font=font)
    for n, i in enumerate(chosen):
        x, y = gap + (n % per_row) * (2 * tile_w + 3 * gap), line + (n // per_row) * (tile + line + gap)
        image = Image.fromarray(generated[i]).convert("RGB").resize((tile_w, tile), Image.Resampling.NEAREST)
        sheet.paste(image, (x, y))
        maps = finest_routing(routing_layers[i])
        sheet.paste(soft_routing(image, maps), (x + tile_w + gap, y))
        draw.text((x, y + tile + 1), f"#{i}", fill=(40, 40, 40), font=font)
    return sheet


def interval_words(result: dict, goal: str) -> str:
    """' (95 % interval 0.02-0.20)' for a rate goal, '' for the others (and older results)."""
    low, high = result.get("goal_intervals", {}).get(goal, (None, None))
    return "" if low is None else f" (95 % interval {_rate(low)}-{_rate(high)})"


def _rate(value) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


def _size_words(result: dict) -> str:
    """'64x128 panels (routing IoU on 64x64 scenes)', or '64x64 panels' for squares."""
    height, width = result["image_size"]
    words = f"{height}x{width} panels"
    if [height, width] != list(result["routing_iou_image_size"]):
        words += " (routing IoU on {0}x{1} scenes)".format(*result["routing_iou_image_size"])
    return words


def _shown(value):
    """A value as the report shows it: text with its unwritable characters escaped (markup that
    the template marked safe is left alone)."""
    import markupsafe

    from ..story import escape_forbidden

    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        return escape_forbidden(value)
    return value


REPORT_TEMPLATE = "adapter_report.html.j2"  # in anystory_cli/lab/templates/
CHARACTER_TABLES = (("identity", "identity (identified as itself)"),
                    ("blended", "blending (identified as another character of the panel)"),
                    ("all_attributes", "all ten attributes read right"),
                    ("found", "found in its region"))


def _adapter_html(result: dict) -> str:
    """The numbers as tables, above the two pictures: the Jinja2 template, every value escaped
    (markup as entities; a control character, lone surrogate or non-character as its Python
    escape, which HTML and UTF-8 cannot hold as it is)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("anystory_cli.lab", "templates"),
                                     autoescape=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined,
                                     finalize=_shown)
    environment.filters["rate"] = _rate
    iou = result["routing_iou"]
    return environment.get_template(REPORT_TEMPLATE).render(
        result=result,
        size_words=_size_words(result),
        sampling=sampling_label(result),
        goals=[{"name": name, "value": value, "reached": result["reached"][name], "met": result["goals_met"][name],
                "interval": interval_words(result, name)} for name, value in result["goals"].items()],
        counts=[k for k in ("1", "2", "3", "4", "multi") if k in result["rendered"]],
        tables=[{"key": key, "title": title} for key, title in CHARACTER_TABLES],
        rows=[*((v, result["results"][v]) for v in result["variants"]),
              ("rendered (judge's ceiling)", result["rendered"])],
        iou_rows=[(f"{side}x{side}{suffix}", by_t)
                  for key, suffix in (("by_resolution", ""), ("foreground_by_resolution", ", any character"))
                  for side, by_t in iou[key].items()],
    )
