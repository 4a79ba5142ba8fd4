"""The shipped default base model loads offline and samples what it sampled when it was published.

A broken, truncated or silently changed weight file (or a diffusers/transformers upgrade that
changes the computation) changes the sample and fails here. After publishing new weights on
purpose, regenerate the references:

    python tests/test_default_model.py --update
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).parent / "data"
BASE_REFERENCE = DATA / "default_base_sample.png"
PROMPTS = (
    "two characters on a beach at sunset near a rock , the left one is jumping , the right one is standing",
    "one character in a forest at night , it is waving in the center",
)
STEPS, GUIDANCE, SEED = 10, 4.0, 0
# Same torch build, different CPUs: float32 sums in another order differ in the last bits, and ten
# denoising steps amplify that a little. A wrong model differs by tens of levels everywhere.
MEAN_TOLERANCE, PIXEL_SHARE_TOLERANCE = 2.0, 0.02  # mean |diff| in levels; share of pixels off by >24


def sample_base() -> np.ndarray:
    from anystory_cli.world.base_models import load_default_base

    torch.set_num_threads(1)
    pipe, _ = load_default_base()
    images = pipe(list(PROMPTS), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(SEED), output_type="np").images
    return np.concatenate(list((np.clip(images, 0, 1) * 255).round().astype(np.uint8)), axis=1)


def test_shipped_base_model_samples_match_the_stored_reference():
    unet = Path(__file__).parent.parent / "anystory_cli" / "assets" / "default" / "unet.safetensors"
    if not unet.is_file():
        pytest.fail(f"{unet} is missing: the default base model is not shipped")
    assert BASE_REFERENCE.is_file(), "no stored reference: run python tests/test_default_model.py --update"
    expected = np.asarray(Image.open(BASE_REFERENCE).convert("RGB")).astype(np.int16)
    got = sample_base().astype(np.int16)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    assert diff.mean() <= MEAN_TOLERANCE, f"mean difference {diff.mean():.2f} levels"
    assert (diff.max(axis=-1) > 24).mean() <= PIXEL_SHARE_TOLERANCE


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_default_model.py --update")
    DATA.mkdir(exist_ok=True)
    Image.fromarray(sample_base()).save(BASE_REFERENCE)
    print(f"wrote {BASE_REFERENCE}")
