"""Takes on the embedded model, graded by the judge: one take against the best of N, on the same
held-out panels and noise, seed after seed, in one process (the model loaded once).

    nice python benchmarks/takes_identity.py --out runs/takes [--seeds 12] [--panels-per-count 6]
        [--counts 1,2] [--takes 4] [--threads 1]
    python benchmarks/takes_identity.py --out runs/takes --summarise    # pool what is there

Each seed writes `seed-S-takes-1.json` and `seed-S-takes-N.json`, exactly what

    anystory evaluate adapter --seed S --panels-per-count 6 --counts 1,2 --variants anystory \\
        --routing-scenes 1 --takes N --json

prints (a seed already written is not drawn again). On this shared 2-core machine a full second
run of every seed with one take costs a fifth more; with `--one-take-from-first` the one-take
result of seeds after the first is the first take of the N-take run instead (the same draw by
construction: take 1 draws from the panel's own noise), and seed 0 is drawn both ways to check
that the two agree (`first_take_matches` in the summary). The summary pools every seed written so far:
`evaluate compare` of the pairs (lone and two-character identity and blending with 95 % Wilson
intervals and the sign test), the seconds per panel of each, and how the identity scores' pick
fares with the judge (its identity rate on the picked take against a random take, the first take
and the judge's own best), and how well a character's score separates the takes the judge
identifies it in from the others (the AUC over every take's characters).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run_seed(pipe, judge, seed: int, takes: int, args) -> dict:
    from anystory_cli.lab.evaluate import evaluate_adapter, json_safe

    result = evaluate_adapter(pipe, judge, panels_per_count=args.panels_per_count, seed=seed, variants=("anystory",),
                              routing_scenes=1, takes=takes, counts=args.counts, steps=args.steps)
    return json_safe({"ok": True, **result})


def first_take_result(result: dict) -> dict:
    """The one-take result contained in an N-take run: each panel's first take, as judged."""
    one = json.loads(json.dumps(result))
    for panel in one["panels"]:
        panel["judged"]["anystory"] = panel.pop("takes")["takes"][0]["judged"]
    per_take = result["seconds"]["per_panel"]["anystory"] / result["takes"]["takes_drawn"]
    one["takes"] = {"takes": 1, "min_identity": None, "derived_from_first_take": True}
    one["seconds"] = {"per_panel": {"anystory": round(per_take, 3)}}
    one.pop("results", None)  # by count: read from the panels (evaluate compare does)
    return one


def first_take_matches(folder: Path, takes: int) -> bool | None:
    """Seed 0's separate one-take run judged exactly as the first takes of its N-take run."""
    drawn, run = folder / "seed-0-takes-1.drawn.json", folder / f"seed-0-takes-{takes}.json"
    if not (drawn.exists() and run.exists()):
        return None
    one, first = json.loads(drawn.read_text()), first_take_result(json.loads(run.read_text()))
    return [p["judged"]["anystory"] for p in one["panels"]] == [p["judged"]["anystory"] for p in first["panels"]]


def summarise(folder: Path, takes: int) -> dict:
    from anystory_cli.lab.evaluate import compare_adapter_runs, sign_test, wilson_interval

    pairs, seeds = [], []
    for before in sorted(folder.glob("seed-*-takes-1.json"), key=lambda p: int(p.name.split("-")[1])):
        after = before.with_name(before.name.replace("-takes-1.json", f"-takes-{takes}.json"))
        if after.exists():
            pairs.append((json.loads(before.read_text()), json.loads(after.read_text())))
            seeds.append(int(before.name.split("-")[1]))
    if not pairs:
        return {"pairs": 0}
    compared = compare_adapter_runs(pairs)
    for row in compared["by_count"].values():
        n = row["characters"]
        row["identity_before_interval"] = list(wilson_interval(row["right_before"], n))
        row["blended_before_rate"] = round(row["blended_before"] / n, 4)
        row["blended_after_rate"] = round(row["blended_after"] / n, 4)
        row["blended_before_interval"] = list(wilson_interval(row["blended_before"], n))
        row["blended_after_interval"] = list(wilson_interval(row["blended_after"], n))
    # The scores' pick against the judge, panel by panel, pooled over the seeds.
    agreement: dict[str, dict] = {}
    for _, after in pairs:
        for panel in after["panels"]:
            record = panel["takes"]
            rates = [float(np.mean([v["right"] for v in take["judged"]])) for take in record["takes"]]
            row = agreement.setdefault(str(len(panel["identity_seeds"])), {"picked": [], "random": [], "first": [],
                                                                            "oracle": [], "drawn": []})
            row["picked"].append(rates[record["picked"]])
            row["random"].append(float(np.mean(rates)))
            row["first"].append(rates[0])
            row["oracle"].append(max(rates))
            row["drawn"].append(len(rates))
    agree = {}
    for count, row in sorted(agreement.items()):
        wins = sum(p > r + 1e-9 for p, r in zip(row["picked"], row["random"]))
        losses = sum(r > p + 1e-9 for p, r in zip(row["picked"], row["random"]))
        agree[count] = {"panels": len(row["picked"]), **{k: round(float(np.mean(v)), 4) for k, v in row.items()},
                        "picked_beats_random": wins, "random_beats_picked": losses, "sign_test_p": sign_test(wins, losses)}
    # Character by character over every take: does a higher score go with the judge's "right"?
    right, wrong = [], []
    for _, after in pairs:
        for panel in after["panels"]:
            for take in panel["takes"]["takes"]:
                for score, verdict in zip(take["scores"], take["judged"]):
                    (right if verdict["right"] else wrong).append(score["identity"])
    higher = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    ranking = {"characters_right": len(right), "characters_wrong": len(wrong),
               "mean_score_right": round(float(np.mean(right)), 4) if right else None,
               "mean_score_wrong": round(float(np.mean(wrong)), 4) if wrong else None,
               "auc": round(higher / (len(right) * len(wrong)), 4) if right and wrong else None}
    cost = {str(t): round(float(np.mean([run["seconds"]["per_panel"]["anystory"] for run in runs])), 3)
            for t, runs in ((1, [a for a, _ in pairs]), (takes, [b for _, b in pairs]))}
    return {"seeds": seeds, "pairs": len(pairs), "panels_per_count": pairs[0][0]["panels_per_count"],
            "counts": pairs[0][0].get("counts"), "takes": takes, "first_take_matches": first_take_matches(folder, takes),
            "compare": compared["by_count"],
            "score_pick_vs_judge": agree, "score_ranks_characters": ranking, "seconds_per_panel": cost}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--panels-per-count", type=int, default=6)
    parser.add_argument("--counts", default="1,2")
    parser.add_argument("--takes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarise", action="store_true", help="Pool the seeds already written; draw nothing.")
    parser.add_argument("--one-take-from-first", action="store_true",
                        help="One take = the first take of the N-take run (seed 0 drawn both ways, compared).")
    args = parser.parse_args()
    args.counts = tuple(int(c) for c in args.counts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        import torch

        from anystory_cli.lab.judge import load_judge
        from anystory_cli.model_loading import load_pipeline

        torch.set_num_threads(args.threads)
        pipe, judge = load_pipeline("default", Path.cwd()), load_judge()
        for seed in range(args.seeds):
            for takes in (args.takes, 1):
                path = args.out / f"seed-{seed}-takes-{takes}.json"
                if path.exists():
                    continue
                if takes == 1 and args.one_take_from_first:
                    run = json.loads((args.out / f"seed-{seed}-takes-{args.takes}.json").read_text())
                    path.write_text(json.dumps(first_take_result(run), indent=1, allow_nan=False))
                    if seed != 0:
                        continue
                    path = path.with_suffix(".drawn.json")
                started = time.perf_counter()
                with torch.inference_mode():
                    result = run_seed(pipe, judge, seed, takes, args)
                path.write_text(json.dumps(result, indent=1, allow_nan=False))
                print(f"seed {seed} takes {takes}: {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarise(args.out, args.takes)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
