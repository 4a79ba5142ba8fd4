"""Publish a trained adapter as the embedded default's, in fp16, after checking that fp16 holds.

    python recipes/ship_default_adapter.py runs/world_stage2_out/adapter.safetensors

Draws the same two-character demo panel with the adapter as trained (fp32) and rounded to fp16
(then computed in fp32, as `model: default` loads it on a CPU), and refuses to publish if the
pictures differ by more than a few levels: the shipped file must draw what was measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from anystory_cli.masks import load_image  # noqa: E402
from anystory_cli.model_loading import ADAPTER_FILE, DEFAULT_MODEL_DIR  # noqa: E402
from anystory_cli.sd.pipeline import AnyStoryPipeline  # noqa: E402
from anystory_cli.sd.weights import load_adapter, save_adapter  # noqa: E402
from anystory_cli.default_model import load_default_base  # noqa: E402

PROMPT = "two characters on a hill during the day , the left one is waving , the right one is standing"
MAX_MEAN_LEVELS = 2.0  # mean |fp32 - fp16| over the panel, in 0..255 levels


def draw(adapter) -> np.ndarray:
    base, encoder = load_default_base()
    pipe = AnyStoryPipeline.from_pipe(base, encoder, adapter)
    characters = [pipe.encode_character(load_image(ROOT / "stories" / "characters" / f"{n}.png", "reference"), name=n)
                  for n in ("mira", "bolt")]
    out = pipe(PROMPT, characters=characters, regions=[(0.0, 0.2, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)],
               num_inference_steps=25, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np")
    return np.asarray(out.images[0]) * 255.0


def main(source: str) -> int:
    torch.set_num_threads(1)
    trained = load_adapter(source)
    rounded = load_adapter(source)
    rounded.load_state_dict({k: v.half().float() for k, v in trained.state_dict().items()})
    difference = float(np.abs(draw(trained) - draw(rounded)).mean())
    print(f"fp32 vs fp16 adapter, one demo panel: mean difference {difference:.3f} levels")
    if difference > MAX_MEAN_LEVELS:
        print(f"fp16 does not hold (> {MAX_MEAN_LEVELS}); not published")
        return 1
    target = save_adapter(trained, DEFAULT_MODEL_DIR / ADAPTER_FILE, dtype=torch.float16)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    sys.exit(main(sys.argv[1]))
