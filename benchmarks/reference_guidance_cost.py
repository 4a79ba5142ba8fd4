"""What reference guidance costs a panel: the shipped default model draws the demo's
three-character panel with `reference_guidance` on (the default) and off, alternating, in one
process, from the same noise.

    python benchmarks/reference_guidance_cost.py [--runs 3] [--threads 2]     # prints JSON

With it on, the unconditional half of each guided step skips the reference attention in
self-attention, and keeps its place in the batched plain self-attention. Measured (--runs 9):
1.169 s against 1.186 s per panel, x0.99 (x1.02 in a second run); routing the unconditional half
to the background instead, so that each layer sorts the two halves apart, costs x1.08-1.14.
"""

from __future__ import annotations

from pathlib import Path

import torch

from anystory_cli.masks import load_image
from anystory_cli.model_loading import load_pipeline
from side_by_side import alternate, parse_args, print_ratio

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("three characters in a forest during the day , the left one is standing , the middle one is waving ,"
          " the right one is standing")
NAMES = ("mira", "pip", "bolt")
REGIONS = [(0.0, 0.2, 1 / 3, 1.0), (1 / 3, 0.2, 2 / 3, 1.0), (2 / 3, 0.2, 1.0, 1.0)]


def draw(pipe, characters, **options) -> None:
    """The demo's three-character panel, from fixed noise; `options` go to the pipeline."""
    pipe(PROMPT, characters=characters, regions=REGIONS, num_inference_steps=25, guidance_scale=4.0,
         guidance_interval=(0.0, 0.7), generator=torch.Generator().manual_seed(0), output_type="np", **options)


def demo_characters(pipe) -> list:
    """The demo's three characters, encoded by `pipe`."""
    return [pipe.encode_character(load_image(ROOT / "stories" / "characters" / f"{name}.png", "reference"), name=name)
            for name in NAMES]


def compare_options(variants: dict[str, dict], **extra) -> None:
    """Times the demo's panel drawn by the default model with each variant's pipeline options,
    alternating, and prints the medians and the first's ratio to the second."""
    args = parse_args()
    with torch.inference_mode():
        pipe = load_pipeline("default")
        characters = demo_characters(pipe)
        medians = alternate({name: (lambda options=options: draw(pipe, characters, **options))
                             for name, options in variants.items()}, args.runs)
    print_ratio(medians, args, **extra)


def main() -> None:
    compare_options({"reference_guidance": {"reference_guidance": True},
                     "references_in_both_halves": {"reference_guidance": False}})


if __name__ == "__main__":
    main()
