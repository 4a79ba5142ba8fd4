"""What context routers cost a panel: the demo's three-character panel drawn by the shipped
default model and by the same model with another adapter (the one shipped before session 13,
whose routers read each latent token alone), alternating, in one process, from the same noise.

    git show 834a478:anystory_cli/assets/default/anystory_adapter.safetensors > /tmp/per_token.safetensors
    python benchmarks/router_context_cost.py /tmp/per_token.safetensors [--runs 3] [--threads 2]   # prints JSON

The two adapters differ only in their routers (router_context_layers 2 against 0) and in their
routing QFormer's weights; both draw the same 25 steps with the same routing work otherwise.
Session 13: 2.035 s against 1.641 s per panel, x1.24 (--runs 5).
"""

from __future__ import annotations

import json
import sys

import torch

from anystory_cli.model_loading import load_pipeline
from reference_guidance_cost import NAMES, PROMPT, REGIONS, ROOT
from anystory_cli.masks import load_image
from side_by_side import alternate, parse_args


def draw(pipe, characters) -> None:
    pipe(PROMPT, characters=characters, regions=REGIONS, num_inference_steps=25, guidance_scale=4.0,
         guidance_interval=(0.0, 0.7), generator=torch.Generator().manual_seed(0), output_type="np")


def main() -> None:
    other = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    if other is None:
        sys.exit(__doc__.strip().splitlines()[-5].strip())
    args = parse_args()
    with torch.inference_mode():
        drawers = {}
        for name, adapter in (("shipped", None), ("other", other)):
            pipe = load_pipeline("default", adapter=adapter)
            characters = [pipe.encode_character(load_image(ROOT / "stories" / "characters" / f"{n}.png", "reference"),
                                                name=n) for n in NAMES]
            drawers[name] = (lambda pipe=pipe, characters=characters: draw(pipe, characters))
            print(f"{name}: router_context_layers {pipe.adapter.config.router_context_layers}", file=sys.stderr)
        medians = alternate(drawers, args.runs)
    medians = {k: round(v, 3) for k, v in medians.items()}
    print(json.dumps({"seconds_per_panel": medians, "ratio": round(medians["shipped"] / medians["other"], 3),
                      "runs": args.runs, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
