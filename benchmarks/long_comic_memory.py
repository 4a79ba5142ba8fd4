"""Peak memory of long comics: does a render grow with the number of pages?

    python benchmarks/long_comic_memory.py                          # 12, 24 and 48 pages
    python benchmarks/long_comic_memory.py --pages 12 24 48 96 192 384 --dpi 150
    python benchmarks/long_comic_memory.py --checkout /tmp/base --checkout .   # old and new, in turn

Each story has 4 panels a page (the demo's characters and prompts in turn, each panel lettered),
A4 pages at `--dpi`. For each page count, in fresh `anystory render` processes:

  render    the first render: every panel drawn by the default model (`--steps` steps, 1 by
            default: the drawing is not what is measured), pages composed, PDF and CBZ written;
  caption   every caption changed: no panel drawn, every page composed again, PDF and CBZ again;
  unchanged nothing changed: nothing drawn or written.

Each story's panels are the first panels of the next, longer one (a panel's key does not
depend on the story's length), so a story's output folder starts as a copy of the previous,
shorter one's and its render draws only the panels that one did not have.

Printed: wall seconds and the process's peak resident memory (ru_maxrss) of each, per checkout
(`--checkout DIR` runs that source tree through PYTHONPATH; several are run in turn, page count
by page count). The character cache is shared by all runs, so characters are encoded once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "stories" / "demo.yaml"

# The real command, then this process's peak memory (and imports), as the re-render benchmark runs it.
from rerender import WRAPPER  # noqa: E402


def write_story(folder: Path, pages: int, dpi: int, caption: str) -> Path:
    demo = yaml.safe_load(DEMO.read_text())
    panels = []
    for index in range(pages * 4):
        source = dict(demo["panels"][index % len(demo["panels"])])
        source.pop("page_break", None)
        source.pop("span", None)
        source["caption"] = f"{caption} {index + 1}."
        source["page_break"] = index % 4 == 0 and index > 0
        panels.append(source)
    characters = {name: {"image": str(DEMO.parent / entry["image"])} for name, entry in demo["characters"].items()}
    story = {**demo, "title": f"A long comic ({pages} pages)", "characters": characters, "panels": panels,
             "page": {**demo["page"], "dpi": dpi, "layout": [2, 2]}}
    path = folder / "story.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def run(checkout: Path, story: Path, out: Path, cache: Path, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "PYTHONPATH": str(checkout), "ANYSTORY_CACHE": str(cache),
               "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", WRAPPER, str(report), "render", str(story), "--out", str(out),
                               "--steps", str(steps)], env=env, capture_output=True, text=True, cwd=checkout)
        seconds = time.perf_counter() - began
        result = json.loads(report.read_text())
        if result["code"] != 0:
            raise SystemExit(f"{checkout}: render failed:\n{done.stderr}")
        return {"seconds": round(seconds, 2), "peak_mib": round(result["peak_mib"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkout", type=Path, action="append", help="source tree to run (default: this one)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    results: dict[str, dict] = {str(c): {} for c in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        previous: dict[Path, Path] = {}
        for pages in sorted(args.pages):
            for checkout in checkouts:
                folder = Path(tmp) / f"{checkout.name}-{pages}"
                folder.mkdir()
                out = folder / "out"
                if checkout in previous:
                    shutil.copytree(previous[checkout], out, symlinks=True)
                previous[checkout] = out
                figures = {}
                story = write_story(folder, pages, args.dpi, "It was page")
                figures["render"] = run(checkout, story, out, cache, args.steps, args.threads)
                story = write_story(folder, pages, args.dpi, "Then came panel")
                figures["caption"] = run(checkout, story, out, cache, args.steps, args.threads)
                figures["unchanged"] = run(checkout, story, out, cache, args.steps, args.threads)
                results[str(checkout)][pages] = figures
                print(json.dumps({"checkout": str(checkout), "pages": pages, **figures}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
