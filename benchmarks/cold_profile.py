"""Where a cold render of the demo spends its time, stage by stage.

    python benchmarks/cold_profile.py                                      # this checkout, 3 runs
    python benchmarks/cold_profile.py --checkout /tmp/base --checkout . --runs 3   # old and new, in turn

Each run is a fresh Python process (`--checkout DIR` runs that source tree through PYTHONPATH;
checkouts alternate within each round, so machine noise hits them alike) with an empty character
cache and output folder, rendering `stories/demo.yaml` through `render_story` as the command does.
The process first imports torch, then diffusers with the classes the default model is built
from, then transformers' CLIP models, so that what the render pays for the imports is told apart
from what it pays to read and build the model. Stages, in order:

  start          Python's start and this package's render module
  import torch / import diffusers, transformers
  check          the story, the model files' fingerprint, the panels' keys
  load model + encode <first character>: the rest of the model load (reading and building the
                 parts, the panel LoRA, the adapter; its seconds on the next line), then the
                 first character's encoding
  encode <name>  each other character: cut out, image encoder, ReferenceNet
  panel <n>      each panel: its denoising steps, decode, identity scores, the stored files
  compose        the pages; export: PDF and CBZ; review: scores.json and review.html

For each stage the median wall seconds and the median CPU seconds (all threads; on a shared
machine, CPU seconds move less than wall seconds; `--threads 1` keeps them comparable), and each
run's peak memory (ru_maxrss).
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

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "stories" / "demo.yaml"

# One cold render, its marks (end of each stage: name, epoch seconds, CPU seconds) as JSON.
CHILD = r"""
import json, resource, sys, time
marks = [("python start", time.time(), time.process_time())]
def mark(name):
    marks.append((name, time.time(), time.process_time()))
from anystory_cli.render import render_story
mark("import anystory_cli.render")
import torch
mark("import torch")
import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel
mark("import diffusers, transformers")
def progress(event):
    if event.kind == "model":
        mark("check story, keys")
    elif event.kind == "character":
        first = not any(name.startswith("load model") for name, _, _ in marks)
        mark(("load model + " if first else "") + "encode " + event.message.split(":")[0].split()[-1])
    elif event.kind == "panel_done":
        mark(event.message)
summary = render_story(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], progress=progress)
mark("compose + export + review")
print(json.dumps({"marks": marks, "timings": summary.timings, "panels": summary.panels_rendered,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def one_run(checkout: Path, threads: int) -> dict:
    """{stage: (wall seconds, CPU seconds or None)} and the peak memory of one cold render."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
        began = time.time()
        done = subprocess.run([sys.executable, "-c", CHILD, str(DEMO), str(Path(tmp) / "out"),
                               str(Path(tmp) / "cache")], env=env, capture_output=True, text=True, cwd=checkout)
        ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: render failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    marks, timings = result["marks"], result["timings"]
    stages = {"python start": (marks[0][1] - began, marks[0][2])}
    for (_, wall, cpu), (name, wall_next, cpu_next) in zip(marks, marks[1:]):
        stages[name] = (wall_next - wall, cpu_next - cpu)
    # The model loads on the first character's encode: the render's own clock tells them apart.
    first = next(name for name in stages if name.startswith("load model + "))
    stages = _insert_after(stages, first, {"  of which loading the model": (timings["load_model"], None)})
    tail = ("compose", "export", "review")
    wall, _ = stages.pop("compose + export + review")
    stages.update({name: (timings.get(name, 0.0), None) for name in tail})
    stages["other (after the last panel)"] = (wall - sum(timings.get(name, 0.0) for name in tail), None)
    stages["total (process)"] = (ended - began, marks[-1][2])
    return {"stages": stages, "peak_mib": result["peak_mib"], "panels": len(result["panels"])}


def _insert_after(stages: dict, after: str, new: dict) -> dict:
    out = {}
    for name, value in stages.items():
        out[name] = value
        if name == after:
            out.update(new)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkout", type=Path, action="append", help="source tree to run (default: this one)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    runs: dict[str, list[dict]] = {str(c): [] for c in checkouts}
    for round_number in range(args.runs):
        for checkout in checkouts:
            run = one_run(checkout, args.threads)
            runs[str(checkout)].append(run)
            print(json.dumps({"round": round_number + 1, "checkout": str(checkout),
                              "total": round(run["stages"]["total (process)"][0], 2),
                              "peak_mib": round(run["peak_mib"], 1)}), file=sys.stderr, flush=True)
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    for checkout, samples in runs.items():
        peaks = [round(s["peak_mib"]) for s in samples]
        print(f"\n{checkout}: median of {len(samples)} cold render(s), {samples[0]['panels']} panels; "
              f"peak memory {statistics.median(peaks):.0f} MiB (each run: {peaks})")
        print(f"  {'stage':34s} {'wall s':>8s} {'CPU s':>8s}")
        for name in samples[0]["stages"]:
            wall = statistics.median(s["stages"][name][0] for s in samples)
            cpus = [s["stages"][name][1] for s in samples]
            cpu = "" if None in cpus else f"{statistics.median(cpus):8.2f}"
            print(f"  {name:34s} {wall:8.2f} {cpu:>8s}")


if __name__ == "__main__":
    main()
