"""One lent-GPU call that retrains the embedded default model: the base UNet on the panel shapes
(recipes/base_unet_shapes.yaml), then both AnyStory stages on it (recipes/world_stage{1,2}.yaml).

    python recipes/train_on_gpu.py --out DIR [--seconds 520] [--base-only]
    python recipes/train_on_gpu.py --out DIR --seconds 240 --smoke   (in a copy of the repository)

A lent machine is held for minutes, so the run is planned in seconds: the base UNet's cosine
schedule needs its step count up front, which comes from its measured step time (a short first
call of the same recipe, which the second resumes); the adapter stages train at a constant
learning rate and stop at their share of the time (`max_minutes`) with a checkpoint. The recipe
files' hyperparameters are used as written; only this machine's resources are added (processes
that render scenes and load batches). Write the step counts it reached back into the recipes.

Into DIR (what comes back from a lent machine: 8 files of at most 16 MiB): the published UNet
(fp16) and its config, the last adapter in fp32 split into parts under 15 MiB
(`cat adapter-stage2.part-* > adapter.safetensors`), and logs.tar with the logs, loss plots and
sample grids. Scene pools and datasets are rendered on the machine's cores; nothing is downloaded.

Before spending a lent machine on it, read docs/default-model.md: every run of
base_unet_shapes.yaml (on a GPU and on the CPU) drew worse on squares and was not shipped, and wide
and tall panels are drawn by a panel LoRA trained on the shipped UNet, which a new UNet would
leave stale. `--smoke` passes the whole call on a CPU.

Measured on one H200 with 16 cores: rendering 30 000 + 8 x 2000 pool scenes took 226 s
(plan for it: it is most of a short call); a base step of 256 took 92 ms; AnyStory stage 1 at
batch 64 with 12 loader workers ran ~250 samples/s (this CPU: ~15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORES = os.cpu_count() or 2
PROBE_STEPS = 75  # three log records; the last one times a warmed-up step
SHARES = {"base": 0.55, "stage1": 0.63, "stage2": 0.37}  # base: of the whole; stages: of what is left
DATASETS = {1: (20_000, "runs/world_stage1"), 2: (15_000, "runs/world_stage2")}
# --smoke: the whole call in a minute on a CPU, on tiny pools, datasets and batches (run it in a
# copy of the repository: it publishes into the assets like the real run)
SMOKE = {"base": {"pool_size": 64, "size_pool": 8, "batch_size": 4, "log_every": 1, "sample_steps": 2},
         "probe_steps": 3, "counts": {1: 48, 2: 36},
         "stage": {"batch_size": 2, "preview_steps": 2, "preview_count": 1, "checkpoint_every": 4}}


class Clock:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


def say(clock: Clock, message: str) -> None:
    print(f"[{clock.used():6.1f} s] {message}", flush=True)


def train_base_unet(clock: Clock, until: float, after_probe, smoke: bool) -> int:
    """The shapes recipe: a probe of PROBE_STEPS (it renders the scene pools on every core first),
    then the steps that fit before `until` (seconds on the clock), as one cosine schedule that the
    second call resumes. Returns the recipe's step count."""
    from anystory_cli.lab import train_base as tb

    recipe, base = tb.load_recipe(ROOT / "recipes" / "base_unet_shapes.yaml")
    recipe = recipe.model_copy(update={"render_workers": CORES - 1, **(SMOKE["base"] if smoke else {})})
    probe = SMOKE["probe_steps"] if smoke else PROBE_STEPS
    say(clock, "base UNet: rendering pools and probing")
    tb.train(recipe, base, max_steps=probe)
    say(clock, "base UNet: probe done")
    after_probe()
    timed = [r for r in map(json.loads, tb.RunPaths(recipe, base).log_file.read_text().splitlines())
             if "seconds" in r]
    per_step = timed[-1]["seconds"]
    publish = 15.0  # the last checkpoint: training state, fp16 asset, a sample grid
    steps = probe + max(0, int((until - clock.used() - publish) / per_step))
    say(clock, f"base UNet: {per_step * 1000:.1f} ms a step of {recipe.batch_size}; steps = {steps}")
    tb.train(recipe.model_copy(update={"steps": steps}), base, max_minutes=max(0.5, (until - clock.used()) / 60))
    return steps


def start_datasets(smoke: bool) -> list[subprocess.Popen]:
    workers = max(1, (CORES - 2) // len(DATASETS))
    procs = []
    for stage, (count, folder) in DATASETS.items():
        count = SMOKE["counts"][stage] if smoke else count
        code = ("from anystory_cli.lab.world.dataset import write_dataset; "
                f"write_dataset({str(ROOT / folder)!r}, {stage}, {count}, workers={workers})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT))
    return procs


def train_stage(clock: Clock, stage: int, seconds: float, smoke: bool) -> int:
    from anystory_cli.train import load_recipe, train

    recipe = load_recipe(ROOT / "recipes" / f"world_stage{stage}.yaml")
    recipe = recipe.model_copy(update={"max_minutes": max(0.2, seconds / 60), "loader_workers": max(1, CORES - 4),
                                       **(SMOKE["stage"] if smoke else {})})
    result = train(recipe)
    rate = [r["samples_per_s"] for r in result.losses[-20:]]
    say(clock, f"stage {stage}: reached step {result.step}, ~{sum(rate) / max(1, len(rate)):.0f} samples/s")
    return result.step


def bring_back(out: Path, reached: dict) -> None:
    assets = ROOT / "anystory_cli" / "assets" / "default"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(assets / "unet", out / "unet", dirs_exist_ok=True)
    (out / "training_status.json").write_bytes((assets / "training_status.json").read_bytes())
    for stage in (2, 1):  # stage 2's adapter holds both stages; stage 1's if stage 2 broke
        adapter = ROOT / "runs" / f"world_stage{stage}_out" / "adapter.safetensors"
        if adapter.is_file():
            data, part = adapter.read_bytes(), 15 << 20
            for index in range(0, len(data), part):
                (out / f"adapter-stage{stage}.part-{index // part:02d}").write_bytes(data[index : index + part])
            break
    (ROOT / "runs" / "gpu_reached.json").write_text(json.dumps(reached, indent=2) + "\n")
    with tarfile.open(out / "logs.tar", "w") as tar:
        for path in [ROOT / "runs" / "gpu_reached.json", ROOT / "checkpoints" / "unet_shapes.log.jsonl",
                     ROOT / "checkpoints" / "unet_shapes_samples.png"]:
            if path.is_file():
                tar.add(path, arcname=path.name)
        for stage in (1, 2):
            folder = ROOT / "runs" / f"world_stage{stage}_out"
            for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                if path.is_file() and path.suffix in (".jsonl", ".png", ".json"):
                    tar.add(path, arcname=f"stage{stage}/{path.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seconds", type=float, default=520.0, help="the whole run's budget")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the whole call on a CPU")
    parser.add_argument("--base-only", action="store_true", help="all the time to the base UNet (the CPU "
                        "then trains the adapter stages: a short GPU share of them is worth less)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    clock = Clock(args.seconds)
    say(clock, f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, {CORES} cores")
    reached: dict = {}
    datasets: list[subprocess.Popen] = []

    def render_datasets():  # while the GPU trains the base, which needs one core
        if not datasets:
            datasets.extend(start_datasets(args.smoke))

    try:
        try:
            until = (args.seconds - 20) if args.base_only else SHARES["base"] * args.seconds
            reached["base_steps"] = train_base_unet(clock, until, (lambda: None) if args.base_only else render_datasets,
                                                    args.smoke)
        except Exception:
            traceback.print_exc()
        if args.base_only:
            return 0
        render_datasets()
        for proc in datasets:
            proc.wait()
        say(clock, "datasets written")
        stage1 = (clock.left() - 40) * SHARES["stage1"] / (SHARES["stage1"] + SHARES["stage2"])
        try:
            reached["stage1_steps"] = train_stage(clock, 1, stage1, args.smoke)
            reached["stage2_steps"] = train_stage(clock, 2, clock.left() - 40, args.smoke)
        except Exception:
            traceback.print_exc()
    finally:
        for proc in datasets:
            if proc.poll() is None:
                proc.kill()
        bring_back(args.out, reached)
        say(clock, f"done: {json.dumps(reached)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
