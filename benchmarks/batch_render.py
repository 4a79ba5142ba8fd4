"""Panels per second with 1 and 2 processes, and the cost of loading the model against drawing.

One run, side by side, through the real command and the real model loader:

1. a small SD-1.5-shaped model folder is written once (random weights: the cost does not depend
   on the values) -- `model_index.json` + subfolders, `image_encoder/`, the AnyStory adapter;
2. `python -m anystory_cli.cli render story.yaml --json` renders a story of N panels in one
   process;
3. `python -m torch.distributed.run --nproc-per-node 2 -m anystory_cli.cli render ...` renders the
   same story in two processes (gloo): the panels are shared out, the first process composes;
4. one process renders the story three times over (three stories, one command): the model is
   loaded once, so the extra stories cost only their drawing.

Every run starts cold (a new process, an empty cache and output folder). Every PNG of the
two-process render is compared with the one-process render's: with one thread per process
(the default here) they are byte-identical. `--as-users-run` gives the one-process render 2
threads and leaves torchrun's processes at torchrun's 1 thread each, as a user on a 2-core
machine runs them: floats are summed in another order, and pixels differ by up to 1 level.

    python benchmarks/batch_render.py                 # prints a table and JSON
    python benchmarks/batch_render.py --panels 8 --steps 4
    python benchmarks/batch_render.py --as-users-run  # how far 2 threads and torchrun's 1 differ

Numbers depend on the machine: with one CPU core free, two processes share it and draw no
faster than one; with a core (or a GPU) each, they draw about twice as many panels per second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_model(folder: Path) -> None:
    """A small SD-1.5-shaped pipeline (256x256 images) saved as a model folder."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from anystory_cli import testing as tiny
    from anystory_cli.sd.weights import save_adapter

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = tiny.tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=256,
    )
    base = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny.tiny_text_config(tokenizer)), tokenizer=tokenizer,
        unet=unet, scheduler=tiny.tiny_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    encoder = tiny.tiny_image_encoder()
    base.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    save_adapter(tiny.tiny_adapter(unet, encoder, reference_size=128, num_subject_tokens=16),
                 folder / "anystory_adapter.safetensors")


def write_story(folder: Path, panels: int, steps: int, name: str = "story") -> Path:
    from anystory_cli import testing as tiny

    (folder / "characters").mkdir(parents=True, exist_ok=True)
    colours = {"mira": (220, 40, 40), "bolt": (40, 40, 220)}
    for seed, (who, colour) in enumerate(colours.items()):
        tiny.sprite(colour, size=96, seed=seed).save(folder / "characters" / f"{who}.png")
    casts = [["mira"], ["bolt"], ["mira", "bolt"]]
    story = {
        "title": "Benchmark", "model": "../model", "seed": 1,
        "style": {"steps": steps, "guidance": 1.0},
        "page": {"size": {"width": 512, "height": 512}, "dpi": 72, "margin": 4, "gutter": 4,
                 "layout": [2]},
        "characters": {who: {"image": f"characters/{who}.png"} for who in colours},
        "panels": [{"prompt": f"panel {i} on a hill", "characters": casts[i % len(casts)]}
                   for i in range(panels)],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(story, sort_keys=False))
    return path


def run(command: list[str], env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout[done.stdout.index("{"):])


LOAD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch, diffusers, transformers
from anystory_cli import model_loading
from anystory_cli.sd import pipeline
imported = time.perf_counter()
model_loading.load_pipeline(sys.argv[1])
first = time.perf_counter()
model_loading.load_pipeline(sys.argv[1])
second = time.perf_counter()
print(json.dumps({"import_libraries_s": imported - start, "first_load_s": first - imported,
                  "second_load_s": second - first}))
"""


def loading_breakdown(model: Path, env: dict) -> dict:
    """What `load_model` in a render's timings is made of: importing torch, diffusers and
    transformers (once per process), then reading and building the model (once per model)."""
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(model)], capture_output=True,
                          text=True, env=env, check=True)
    return {k: round(v, 2) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def png_differences(one: Path, two: Path) -> dict:
    """Every PNG of `one` against the same file in `two`: how many differ, and by how many levels."""
    import numpy as np
    from PIL import Image

    levels = {}
    for path in sorted(one.rglob("*.png")):
        rel = path.relative_to(one)
        a = np.asarray(Image.open(path).convert("RGBA"), dtype=np.int16)
        b = np.asarray(Image.open(two / rel).convert("RGBA"), dtype=np.int16)
        same = hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256((two / rel).read_bytes()).digest()
        levels[str(rel)] = 0 if same else int(np.abs(a - b).max()) if a.shape == b.shape else 255
    return {"pngs": len(levels), "differ": sum(1 for v in levels.values() if v),
            "max_level": max(levels.values(), default=0)}


def row(name: str, processes: int, panels: int, wall: float, summaries: list[dict]) -> dict:
    first = summaries[0]["timings"]
    timings = {k: sum(s["timings"].get(k, 0.0) for s in summaries)
               for k in ("load_model", "encode", "render", "wait", "compose", "export", "total")}
    drawing = timings["encode"] + timings["render"] + timings["wait"]
    return {
        "run": name, "processes": processes, "panels": panels,
        "command_wall_s": round(wall, 2),
        # Python, torch and diffusers imports, process start (and joining the group): outside render
        "startup_s": round(wall - timings["total"], 2),
        "load_model_s": round(first.get("load_model", 0.0), 2),  # incl. importing diffusers
        "draw_s": round(drawing, 2),  # encode + render (+ waiting for the other process)
        "compose_export_s": round(timings["compose"] + timings["export"], 2),
        "panels_per_s_drawing": round(panels / drawing, 3),
        "panels_per_s_end_to_end": round(panels / wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panels", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--as-users-run", action="store_true",
                        help="one process on 2 threads, torchrun's processes on its default 1 thread each")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ANYSTORY_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cli = ["-m", "anystory_cli.cli", "render"]
    one_env, two_env = env, env
    if args.as_users_run:
        one_env = {**env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        two_env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="anystory-bench-") as tmp:
        root = Path(tmp)
        write_model(root / "model")
        story = write_story(root / "stories", args.panels, args.steps)
        rows = []

        wall, one = run([sys.executable, *cli, str(story), "--out", str(root / "one"),
                         "--cache", str(root / "cache-one"), "--json"], one_env)
        rows.append(row("1 process", 1, args.panels, wall, one["stories"]))

        wall, two = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         *cli, str(story), "--out", str(root / "two"), "--cache", str(root / "cache-two"),
                         "--json"], two_env)
        rows.append(row("2 processes (torchrun, gloo)", 2, args.panels, wall, two["stories"]))
        differences = png_differences(root / "one", root / "two")

        stories = [write_story(root / "stories", args.panels, args.steps, f"story{i}") for i in range(3)]
        wall, three = run([sys.executable, *cli, *map(str, stories), "--out", str(root / "three"),
                           "--cache", str(root / "cache-three"), "--json"], env)
        rows.append(row("1 process, 3 stories", 1, 3 * args.panels, wall, three["stories"]))
        loading = loading_breakdown(root / "model", env)

    columns = ["run", "panels", "command_wall_s", "startup_s", "load_model_s", "draw_s",
               "compose_export_s", "panels_per_s_drawing", "panels_per_s_end_to_end"]
    print(" | ".join(columns))
    for entry in rows:
        print(" | ".join(str(entry[c]) for c in columns))
    print("model loading alone (one process):", ", ".join(f"{k} {v}" for k, v in loading.items()))
    print(f"two processes against one: {differences['differ']} of {differences['pngs']} PNGs differ, "
          f"by at most {differences['max_level']} level(s)")
    print(json.dumps({"panels": args.panels, "steps": args.steps, "image": "256x256 (square panels)",
                      "cpu_cores": len(os.sched_getaffinity(0)), "as_users_run": args.as_users_run,
                      "two_processes_against_one": differences,
                      "loading": loading, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
