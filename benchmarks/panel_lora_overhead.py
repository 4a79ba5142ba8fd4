"""What the panel LoRA costs a wide panel: the shipped base draws the same captions at 64x128
with its panel LoRA (as stories do) and with it switched off, alternating, in one process.

    python benchmarks/panel_lora_overhead.py [--runs 3] [--threads 2]     # prints JSON

The LoRA is merged into a copy of the layers it adapts when the model loads, and a UNet call on
non-square latents swaps those weights in (base_models.load_panel_lora): no LoRA layer runs at
sampling time, so the ratio should be 1. Session 10's first version ran PEFT's LoRA layers at every
step of a wide panel instead: x1.45.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from anystory_cli.world.base_models import load_default_base

CAPTIONS = ["three characters in a forest during the day , the left one is standing , the middle one is waving ,"
            " the right one is standing"] * 2


def draw(pipe) -> float:
    started = time.perf_counter()
    pipe(CAPTIONS, num_inference_steps=25, guidance_scale=4.0, height=64, width=128,
         generator=torch.Generator().manual_seed(0), output_type="np")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        with_lora, _ = load_default_base()
        without, _ = load_default_base(panel_weights=False)
        draw(with_lora), draw(without)  # warm-up
        times = {"panel_lora": [], "plain_unet": []}
        for _ in range(args.runs):
            times["panel_lora"].append(draw(with_lora))
            times["plain_unet"].append(draw(without))
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"seconds_per_2_wide_panels": medians, "ratio": round(medians["panel_lora"] / medians["plain_unet"], 2),
                      "runs": args.runs, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
