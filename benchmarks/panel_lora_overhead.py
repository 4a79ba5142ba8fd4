"""What the panel LoRA costs a wide panel: the shipped base draws the same captions at 64x128
with its panel LoRA (as stories do) and with it switched off, alternating, in one process.

    python benchmarks/panel_lora_overhead.py [--runs 3] [--threads 2]     # prints JSON

The LoRA is merged into a copy of the layers it adapts when the model loads, and a UNet call on
non-square latents swaps those weights in (default_model.load_panel_lora): no LoRA layer runs at
sampling time, so the ratio should be 1 (measured: 2.66 s for two panels either way). Running PEFT's
LoRA layers at every step of a wide panel instead costs x1.45, hence the merged copy.
"""

from __future__ import annotations

import torch

from anystory_cli.default_model import load_default_base
from side_by_side import alternate, parse_args, print_ratio

CAPTIONS = ["three characters in a forest during the day , the left one is standing , the middle one is waving ,"
            " the right one is standing"] * 2


def draw(pipe) -> None:
    pipe(CAPTIONS, num_inference_steps=25, guidance_scale=4.0, height=64, width=128,
         generator=torch.Generator().manual_seed(0), output_type="np")


def main() -> None:
    args = parse_args()
    with torch.inference_mode():
        with_lora, _ = load_default_base()
        without, _ = load_default_base(panel_weights=False)
        medians = alternate({"panel_lora": lambda: draw(with_lora), "plain_unet": lambda: draw(without)}, args.runs)
    print_ratio(medians, args, unit="seconds_per_2_wide_panels", digits=2)


if __name__ == "__main__":
    main()
