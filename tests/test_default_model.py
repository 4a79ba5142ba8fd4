"""The shipped default model loads offline and draws what it drew when it was published: the
base alone from captions (squares, and a wide panel with its panel LoRA), and one AnyStory panel with two of the demo's characters.

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
PANEL_REFERENCE = DATA / "default_panel_sample.png"
WIDE_REFERENCE = DATA / "default_wide_sample.png"
ASSETS = Path(__file__).parent.parent / "anystory_cli" / "assets" / "default"
DEMO_CHARACTERS = Path(__file__).parent.parent / "stories" / "characters"
PANEL_PROMPT = "two characters on a hill during the day , the left one is waving , the right one is standing"
PROMPTS = (
    "two characters on a beach at sunset near a rock , the left one is jumping , the right one is standing",
    "one character in a forest at night , it is waving in the center",
)
STEPS, GUIDANCE, SEED = 10, 4.0, 0
# Same torch build, different CPUs: float32 sums in another order differ in the last bits, and ten
# denoising steps amplify that a little. A wrong model differs by tens of levels everywhere.
MEAN_TOLERANCE, PIXEL_SHARE_TOLERANCE = 2.0, 0.02  # mean |diff| in levels; share of pixels off by >24


def _draw_base(prompts: list[str], height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 images of `prompts` by the shipped base, as `load_default_base` assembles it."""
    from anystory_cli.default_model import load_default_base

    torch.set_num_threads(1)
    pipe, _ = load_default_base()
    images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=height, width=width,
                  generator=torch.Generator().manual_seed(SEED), output_type="np").images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def sample_base() -> np.ndarray:
    return np.concatenate(list(_draw_base(list(PROMPTS))), axis=1)


def sample_wide() -> np.ndarray:
    """The base at 64x128, where its panel LoRA draws (default_model.load_panel_lora)."""
    return _draw_base([PROMPTS[0]], height=64, width=128)[0]


def sample_panel() -> np.ndarray:
    """mira (left) and bolt (right) in one panel, through the loader `anystory render` uses."""
    from anystory_cli.masks import load_image
    from anystory_cli.model_loading import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("default")
    characters = [pipe.encode_character(load_image(DEMO_CHARACTERS / f"{name}.png", "reference"), name=name)
                  for name in ("mira", "bolt")]
    images = pipe(PANEL_PROMPT, characters=characters, regions=[(0.0, 0.2, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)],
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                  output_type="np").images
    return (np.clip(images[0], 0, 1) * 255).round().astype(np.uint8)


def _assert_close(got: np.ndarray, reference: Path) -> None:
    assert reference.is_file(), "no stored reference: run python tests/test_default_model.py --update"
    expected = np.asarray(Image.open(reference).convert("RGB")).astype(np.int16)
    got = got.astype(np.int16)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    assert diff.mean() <= MEAN_TOLERANCE, f"mean difference {diff.mean():.2f} levels"
    assert (diff.max(axis=-1) > 24).mean() <= PIXEL_SHARE_TOLERANCE


def test_shipped_base_model_samples_match_the_stored_reference():
    unet = ASSETS / "unet" / "diffusion_pytorch_model.safetensors"
    if not unet.is_file():
        pytest.fail(f"{unet} is missing: the default base model is not shipped")
    _assert_close(sample_base(), BASE_REFERENCE)


def test_shipped_panel_lora_draws_a_wide_panel_that_matches_the_stored_reference():
    lora = ASSETS / "anystory_panel_lora.safetensors"
    if not lora.is_file():
        pytest.fail(f"{lora} is missing: the default model's panel LoRA is not shipped")
    _assert_close(sample_wide(), WIDE_REFERENCE)


def test_shipped_default_model_draws_a_panel_that_matches_the_stored_reference():
    adapter = ASSETS / "anystory_adapter.safetensors"
    if not adapter.is_file():
        pytest.fail(f"{adapter} is missing: the default AnyStory adapter is not shipped")
    _assert_close(sample_panel(), PANEL_REFERENCE)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_default_model.py --update")
    DATA.mkdir(exist_ok=True)
    for path, sample in ((BASE_REFERENCE, sample_base), (WIDE_REFERENCE, sample_wide), (PANEL_REFERENCE, sample_panel)):
        Image.fromarray(sample()).save(path)
        print(f"wrote {path}")
