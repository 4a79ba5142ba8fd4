"""What the figure paste costs a panel: the shipped default model draws the demo's
three-character panel with the references pasted at a story's default noise level and without,
alternating, in one process, from the same noise.

    python benchmarks/figure_paste_cost.py [--runs 3] [--threads 2]     # prints JSON

The paste encodes one canvas with the VAE per panel and blends the latents once.
"""

from __future__ import annotations

from anystory_cli.sd.figures import DEFAULT_PASTE_AT
from anystory_cli.plan import figure_boxes
from reference_guidance_cost import REGIONS, compare_options


def main() -> None:
    boxes = figure_boxes(REGIONS)
    compare_options({"pasted": {"figure_boxes": boxes, "paste_at": DEFAULT_PASTE_AT},
                     "not_pasted": {"figure_boxes": boxes, "paste_at": None}}, paste_at=DEFAULT_PASTE_AT)


if __name__ == "__main__":
    main()
