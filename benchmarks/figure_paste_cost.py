"""What the figure paste costs a panel: the shipped default model draws the demo's
three-character panel with the references pasted at t/T 0.55 (a story's default) and without,
alternating, in one process, from the same noise.

    python benchmarks/figure_paste_cost.py [--runs 3] [--threads 2]     # prints JSON

The paste encodes one canvas with the VAE per panel and blends the latents once.
"""

from __future__ import annotations

import json

import torch

from anystory_cli.figures import DEFAULT_PASTE_AT
from anystory_cli.model_loading import load_pipeline
from anystory_cli.plan import figure_boxes
from reference_guidance_cost import PROMPT, REGIONS, demo_characters
from side_by_side import alternate, parse_args


def draw(pipe, characters, paste_at: float | None) -> None:
    pipe(PROMPT, characters=characters, regions=REGIONS, figure_boxes=figure_boxes(REGIONS), paste_at=paste_at,
         num_inference_steps=25, guidance_scale=4.0, guidance_interval=(0.0, 0.7),
         generator=torch.Generator().manual_seed(0), output_type="np")


def main() -> None:
    args = parse_args()
    with torch.inference_mode():
        pipe = load_pipeline("default")
        characters = demo_characters(pipe)
        medians = alternate({"pasted": lambda: draw(pipe, characters, DEFAULT_PASTE_AT),
                             "not_pasted": lambda: draw(pipe, characters, None)}, args.runs)
    medians = {k: round(v, 3) for k, v in medians.items()}
    print(json.dumps({"seconds_per_panel": medians, "ratio": round(medians["pasted"] / medians["not_pasted"], 3),
                      "paste_at": DEFAULT_PASTE_AT, "runs": args.runs, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
