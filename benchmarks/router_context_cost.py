"""What context routers cost a panel: the demo's three-character panel drawn by the shipped
default model and by the same model with another adapter (one whose
routers read each latent token alone, router_context_layers 0), alternating, in one process, from the same noise.

    git show 834a478:anystory_cli/assets/default/anystory_adapter.safetensors > /tmp/per_token.safetensors
    python benchmarks/router_context_cost.py /tmp/per_token.safetensors [--runs 3] [--threads 2]   # prints JSON

The two adapters differ only in their routers (router_context_layers 2 against 0) and in their
routing QFormer's weights; both draw the same 25 steps with the same routing work otherwise.
Measured: 2.035 s against 1.641 s per panel, x1.24 (--runs 5); with --runs 9, x1.14 and x1.24.
"""

from __future__ import annotations

import sys

import torch

from anystory_cli.model_loading import load_pipeline
from reference_guidance_cost import demo_characters, draw
from side_by_side import alternate, parse_args, print_ratio


def main() -> None:
    args = parse_args("other_adapter")
    with torch.inference_mode():
        drawers = {}
        for name, adapter in (("shipped", None), ("other", args.other_adapter)):
            pipe = load_pipeline("default", adapter=adapter)
            characters = demo_characters(pipe)
            drawers[name] = (lambda pipe=pipe, characters=characters: draw(pipe, characters))
            print(f"{name}: router_context_layers {pipe.adapter.config.router_context_layers}", file=sys.stderr)
        medians = alternate(drawers, args.runs)
    print_ratio(medians, args)


if __name__ == "__main__":
    main()
