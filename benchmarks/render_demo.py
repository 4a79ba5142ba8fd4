"""How long the demo comic takes on this machine, and how much memory it needs.

    python benchmarks/render_demo.py            # prints JSON
    python benchmarks/render_demo.py --threads 2 --runs 2

cold: a fresh `anystory render stories/demo.yaml` process with an empty cache and output folder
      (Python start, imports, model load, character encoding, 8 panels, pages, PDF, CBZ);
      wall time and the process's peak resident memory.
warm: in one process whose model is loaded, the same story into a fresh output folder with the
      character cache filled: what a user pays when re-rendering an edited story in one process.
Each is run `--runs` times, alternating; medians are reported. Goal: cold < 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "stories" / "demo.yaml"

WARM_SCRIPT = """
import json, sys, time
from pathlib import Path
from anystory_cli.model_loading import load_pipeline, model_fingerprint
from anystory_cli.render import memoize_factory, render_story
story, out, cache = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
factory = memoize_factory(load_pipeline)
times = []
for run in range(2):   # the first fills the cache and loads the model; the second is warm
    began = time.perf_counter()
    render_story(story, out / f"run{run}", pipeline_factory=factory, model_fingerprint=model_fingerprint,
                 cache_dir=cache)
    times.append(time.perf_counter() - began)
print(json.dumps({"first": times[0], "warm": times[1]}))
"""


def cold_run(threads: int) -> tuple[float, float]:
    """(seconds, peak MiB) of one fresh CLI process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ANYSTORY_CACHE": str(Path(tmp) / "cache")}
        command = [sys.executable, "-m", "anystory_cli.cli", "render", str(STORY), "--out", str(Path(tmp) / "out")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        began = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        seconds = time.perf_counter() - began
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # ru_maxrss of children is the largest child so far: exact for the first run, a bound after.
        return seconds, max(peak, before) / 1024


def warm_run(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "-c", WARM_SCRIPT, str(STORY), tmp, str(Path(tmp) / "cache")],
                              check=True, env=env, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    cold, peaks, warm = [], [], []
    for _ in range(args.runs):
        seconds, peak = cold_run(args.threads)
        cold.append(seconds)
        peaks.append(peak)
        warm.append(warm_run(args.threads)["warm"])
    print(json.dumps({
        "story": str(STORY.relative_to(ROOT)), "threads": args.threads, "runs": args.runs,
        "cold_seconds": round(statistics.median(cold), 2), "warm_seconds": round(statistics.median(warm), 2),
        "cold_all": [round(s, 2) for s in cold], "warm_all": [round(s, 2) for s in warm],
        "peak_rss_mib": round(max(peaks), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
