"""Training throughput with batches loaded ahead by worker processes (`loader_workers`) against
loading them between steps, on a real recipe and its dataset, side by side in one run.

    python benchmarks/loader_workers.py recipes/world_stage2.yaml [--steps 14] [--rounds 2] [--workers 0 1]

Each round trains `steps` fresh steps per setting (from the recipe's own starting weights, into a
temporary folder, no previews) and keeps the samples/s of its steps after the first three (worker
start-up); the report is the median per setting and the ratio to 0 workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from anystory_cli.train import load_recipe, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for workers in args.workers:
                run = recipe.model_copy(update={
                    "output_dir": Path(tmp) / f"r{round_}_w{workers}", "steps": args.steps, "resume": False,
                    "loader_workers": workers, "preview_count": 0, "checkpoint_every": 10 * args.steps})
                rates[workers] += [r["samples_per_s"] for r in train(run).losses[3:]]
    median = {w: statistics.median(v) for w, v in rates.items()}
    base = median[args.workers[0]]
    print(json.dumps({"recipe": args.recipe, "batch": recipe.batch_size, "steps_timed": len(rates[args.workers[0]]),
                      "samples_per_s": {w: round(v, 2) for w, v in median.items()},
                      "ratio": {w: round(v / base, 2) for w, v in median.items()}}, indent=2))


if __name__ == "__main__":  # spawned loader workers import this module: nothing may run at import
    main()
