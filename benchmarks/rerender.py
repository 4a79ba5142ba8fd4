"""The demo rendered cold, then re-rendered unchanged and with one caption changed.

    python benchmarks/rerender.py                                   # this checkout, 3 rounds
    python benchmarks/rerender.py --checkout /tmp/base --checkout . --runs 3   # old and new, in turn

Every figure is a fresh `anystory render` process (`--checkout DIR` runs that source tree
through PYTHONPATH; checkouts alternate within each round, so machine noise hits them alike):

  cold       empty character cache and output folder: imports, model load, 3 characters
             encoded, 8 panels, 2 pages, PDF and CBZ;
  unchanged  the same story again: nothing to draw, nothing to write;
  caption    the first caption changed: no panel drawn, page 1 composed again, PDF and CBZ again.

Printed: the cold render's stages (start and imports, check, load_model, encode, render
(the panels), compose, export), the median seconds and peak memory (ru_maxrss) of each, the re-renders' ratios to the
cold render, and whether each re-render imported torch, diffusers or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "stories" / "demo.yaml"

# The real command, then this process's peak memory and the heavy libraries it imported.
WRAPPER = """
import json, resource, sys
from anystory_cli import cli
code = 0
try:
    cli.app(sys.argv[2:], prog_name="anystory")
except SystemExit as stop:
    code = stop.code or 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "diffusers", "transformers"})
open(sys.argv[1], "w").write(json.dumps({"code": code, "heavy": heavy,
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_story(folder: Path, caption: str) -> Path:
    story = yaml.safe_load(DEMO.read_text())
    story["characters"] = {name: {"image": str(DEMO.parent / entry["image"])}
                           for name, entry in story["characters"].items()}
    story["panels"][0]["caption"] = caption
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False, allow_unicode=True))
    return path


def run(checkout: Path, story: Path, out: Path, cache: Path, threads: int) -> dict:
    report = out.parent / "report.json"
    env = {**os.environ, "PYTHONPATH": str(checkout), "ANYSTORY_CACHE": str(cache),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(report), "render", str(story), "--out", str(out),
                           "--json"], env=env, capture_output=True, text=True, cwd=checkout)
    seconds = time.perf_counter() - began
    result = json.loads(report.read_text())
    if result["code"] != 0:
        raise SystemExit(f"{checkout}: render failed:\n{done.stderr}")
    # Where the time went: the render's own stages; before them, Python's start and the imports.
    stages = json.loads(done.stdout)["stories"][0]["timings"]
    stages = {"start and imports": seconds - stages["total"], **stages}
    return {"seconds": seconds, "peak_mib": result["peak_mib"], "heavy": result["heavy"],
            "stages": {name: round(value, 2) for name, value in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkout", type=Path, action="append", help="source tree to run (default: this one)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    samples = {str(c): {"cold": [], "unchanged": [], "caption": []} for c in checkouts}
    for round_number in range(args.runs):
        for checkout in checkouts:
            with tempfile.TemporaryDirectory() as tmp:
                folder, cache = Path(tmp), Path(tmp) / "cache"
                out = folder / "out"
                story = write_story(folder, "One windy morning...")
                figures = samples[str(checkout)]
                figures["cold"].append(run(checkout, story, out, cache, args.threads))
                figures["unchanged"].append(run(checkout, story, out, cache, args.threads))
                story = write_story(folder, "One calm morning...")
                figures["caption"].append(run(checkout, story, out, cache, args.threads))
                print(json.dumps({"round": round_number + 1, "checkout": str(checkout),
                                  **{k: round(v[-1]["seconds"], 2) for k, v in figures.items()}}),
                      file=sys.stderr, flush=True)
    report = {}
    for checkout, figures in samples.items():
        median = {kind: statistics.median(s["seconds"] for s in runs) for kind, runs in figures.items()}
        report[checkout] = {
            "seconds": {kind: round(value, 2) for kind, value in median.items()},
            "all_seconds": {kind: [round(s["seconds"], 2) for s in runs] for kind, runs in figures.items()},
            "peak_mib": {kind: round(max(s["peak_mib"] for s in runs), 1) for kind, runs in figures.items()},
            "ratio_to_cold": {kind: round(median[kind] / median["cold"], 3) for kind in ("unchanged", "caption")},
            "cold stages (first round)": figures["cold"][0]["stages"],
            "re-render imports": {kind: sorted({m for s in figures[kind] for m in s["heavy"]})
                                  for kind in ("unchanged", "caption")},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
