"""The figure paste (`figures.py`): each character's reference pasted into its place at one early
step, on tiny real pipelines (offline, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from anystory_cli.errors import InputError
from anystory_cli.sd.figures import compose_figures, figure_of, fit_in_box, paste_step
from anystory_cli.plan import FIGURE_GROUND, FIGURE_HEIGHT, figure_boxes
from anystory_cli.sd.weights import CharacterEncoding

STEPS = 4
LEFT, RIGHT = (0.0, 0.2, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny.tiny_story_pipeline()


@pytest.fixture(scope="module")
def characters(sd_pipe):
    return [sd_pipe.encode_character(tiny.sprite(c, seed=i), name=f"c{i}")
            for i, c in enumerate([(220, 40, 40), (40, 40, 220)])]


def draw(pipe, characters, **kwargs):
    return pipe("a red blob on grass", characters=characters, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


# ---------------------------------------------------------------------------------------------
# the figure and where it stands


def test_the_figure_is_the_reference_cropped_to_its_mask(sd_pipe, characters):
    rgb = np.zeros((10, 12, 3), np.uint8)
    mask = np.zeros((10, 12), np.float32)
    mask[2:7, 3:5] = 1
    rgb[mask > 0] = (200, 10, 10)
    figure = figure_of(rgb, mask)
    assert figure.shape == (5, 2, 4) and figure.dtype == np.uint8
    assert (figure[..., 3] == 255).all() and (figure[..., 0] == 200).all()
    # encode_character keeps the figure of its prepared reference, as uint8 RGBA
    from anystory_cli.masks import prepare_reference

    reference = prepare_reference(tiny.sprite((220, 40, 40), seed=0), None, sd_pipe.adapter.config.reference_size)
    figure = characters[0].figure
    assert figure.dtype == torch.uint8
    np.testing.assert_array_equal(figure.numpy(), figure_of(reference.rgb, reference.mask))


def test_a_figure_fits_its_box_at_its_aspect_standing_on_the_bottom_edge():
    # a 20x10 figure in a box 32 px tall and 64 wide: height-bound, centred, feet on the bottom
    top, left, h, w = fit_in_box((20, 10), (0.0, 0.5, 1.0, 1.0), 64, 64)
    assert (h, w) == (32, 16) and top + h == 64 and left == 24
    # a narrow box bounds the width instead, and the aspect ratio stays
    top, left, h, w = fit_in_box((20, 10), (0.5, 0.0, 0.625, 1.0), 64, 64)
    assert (h, w) == (16, 8) and top + h == 64 and left == 32


def test_lower_figures_are_painted_over_higher_ones():
    red = np.zeros((4, 4, 4), np.uint8); red[...] = (255, 0, 0, 255)
    blue = np.zeros((4, 4, 4), np.uint8); blue[...] = (0, 0, 255, 255)
    canvas, covered = compose_figures([blue, red], [(0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.75)], 8, 8)
    assert tuple(canvas[7, 4]) == (0, 0, 255)  # only the lower (blue) one reaches the bottom row
    assert tuple(canvas[4, 4]) == (0, 0, 255)  # where they overlap, the lower one is in front
    assert covered.sum() == 64


def test_figure_boxes_stand_inside_the_regions_on_the_ground_line():
    regions = [(0.0, 0.2, 1 / 3, 1.0), (1 / 3, 0.2, 2 / 3, 1.0), (2 / 3, 0.2, 1.0, 1.0)]
    for region, box in zip(regions, figure_boxes(regions)):
        assert box[0] == region[0] and box[2] == region[2]
        assert box[3] == pytest.approx(FIGURE_GROUND) and box[3] - box[1] == pytest.approx(FIGURE_HEIGHT[3])
    # a region lower than a figure is filled, never left
    low = (0.1, 0.1, 0.4, 0.3)
    assert figure_boxes([low]) == [low]


# ---------------------------------------------------------------------------------------------
# the paste itself


def test_the_paste_replaces_the_latents_inside_the_figures_once_noised_to_the_next_step(sd_pipe, characters):
    base = sd_pipe.base
    base.scheduler.set_timesteps(STEPS)
    timesteps = base.scheduler.timesteps  # 751, 501, 251, 1 on the tiny DDIM
    figure = characters[0].figure.numpy()
    paste_at = float(timesteps[2]) / base.scheduler.config.num_train_timesteps
    step_end = paste_step(base, [figure], [LEFT], (32, 32), paste_at, torch.Generator().manual_seed(5))
    side = 32 // base.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))

    untouched = step_end(base, 0, timesteps[0], {"latents": latents.clone()})["latents"]
    assert torch.equal(untouched, latents)  # the next step (501) is above paste_at
    pasted = step_end(base, 1, timesteps[1], {"latents": latents.clone()})["latents"]
    changed = (pasted != latents).any(dim=1)[0]
    assert changed.any() and not changed[:, side // 2:].any(), "only inside the left figure"
    # inside, exactly the figures' latents noised to the next step by the scheduler
    canvas, _ = compose_figures([figure], [LEFT], 32, 32)
    from anystory_cli.sd.figures import encode_canvas

    clean = encode_canvas(base.vae, canvas, "cpu", torch.float32)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    expected = base.scheduler.add_noise(clean, noise, timesteps[2].reshape(1))
    assert torch.allclose(pasted[:, :, changed], expected[:, :, changed], atol=1e-5)
    # once only
    again = step_end(base, 2, timesteps[2], {"latents": latents.clone()})["latents"]
    assert torch.equal(again, latents)


def test_a_paste_that_is_never_reached_or_has_no_box_draws_the_image_without_it(sd_pipe, characters):
    without = draw(sd_pipe, characters, regions=[LEFT, RIGHT])
    never = draw(sd_pipe, characters, regions=[LEFT, RIGHT], figure_boxes=[LEFT, RIGHT], paste_at=0.0005)
    no_box = draw(sd_pipe, characters, regions=[LEFT, RIGHT], figure_boxes=[None, None], paste_at=1.0)
    pasted = draw(sd_pipe, characters, regions=[LEFT, RIGHT], figure_boxes=[LEFT, RIGHT], paste_at=1.0)
    assert np.array_equal(never, without) and np.array_equal(no_box, without)
    assert not np.array_equal(pasted, without)


def test_the_paste_is_deterministic_and_keeps_the_caller_s_callback(sd_pipe, characters):
    seen = []

    def callback(_pipe, step, _t, tensors):
        seen.append(step)
        return tensors

    first = draw(sd_pipe, characters, figure_boxes=[LEFT, RIGHT], paste_at=0.6, callback_on_step_end=callback)
    second = draw(sd_pipe, characters, figure_boxes=[LEFT, RIGHT], paste_at=0.6)
    assert np.array_equal(first, second) and seen == list(range(STEPS))


def test_paste_inputs_are_typed_errors(sd_pipe, characters):
    with pytest.raises(InputError, match="one figure box per character"):
        draw(sd_pipe, characters, paste_at=0.5)
    with pytest.raises(InputError, match="noise level"):
        draw(sd_pipe, characters, figure_boxes=[LEFT, RIGHT], paste_at=1.5)
    bare = CharacterEncoding(characters[0].subject_tokens, characters[0].routing_feature,
                             characters[0].reference_features, characters[0].model_id, name="old")
    with pytest.raises(InputError, match="old: its encoding has no figure"):
        draw(sd_pipe, [bare], figure_boxes=[LEFT], paste_at=0.5)
    # no characters: nothing to paste, the plain image
    assert np.array_equal(draw(sd_pipe, [], paste_at=0.5, subject_scale=0.0), draw(sd_pipe, [], subject_scale=0.0))


def test_an_encoding_file_keeps_its_figure_exactly(tmp_path, characters):
    path = characters[0].save(tmp_path / "c.safetensors", dtype=torch.float16)
    loaded = CharacterEncoding.load(path)
    assert loaded.figure.dtype == torch.uint8 and torch.equal(loaded.figure, characters[0].figure)
    assert loaded.subject_tokens.dtype == torch.float16


def test_an_encoding_saved_before_figures_loads_and_a_paste_asks_to_encode_again(tmp_path, sd_pipe, characters):
    from safetensors.torch import save_file

    old = characters[0].tensors()
    del old["figure"]
    path = tmp_path / "old.safetensors"
    save_file(old, str(path), metadata={"format": "anystory-character/1", "model_id": characters[0].model_id,
                                        "name": "mira"})
    loaded = CharacterEncoding.load(path)
    assert loaded.figure is None and torch.equal(loaded.subject_tokens, characters[0].subject_tokens)
    draw(sd_pipe, [loaded], regions=[LEFT])  # drawn as before, without a paste
    with pytest.raises(InputError, match="mira: its encoding has no figure to paste; encode it again"):
        draw(sd_pipe, [loaded], regions=[LEFT], figure_boxes=[LEFT], paste_at=0.5)


def test_a_vae_that_must_run_in_fp32_encodes_the_canvas_in_fp32_and_stays_fp16():
    """SDXL's VAE overflows in fp16 (config.force_upcast): the canvas is encoded as diffusers
    decodes, in fp32, and the VAE is handed back in fp16."""
    from anystory_cli.sd.figures import encode_canvas

    canvas = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    vae = tiny.tiny_vae().eval().to(torch.float16)
    vae.register_to_config(force_upcast=False)  # AutoencoderKL's own default is True
    seen = []
    encode = vae.encode
    vae.encode = lambda pixels: seen.append((vae.dtype, pixels.dtype)) or encode(pixels)
    plain = encode_canvas(vae, canvas, "cpu", torch.float16)
    vae.register_to_config(force_upcast=True)
    upcast = encode_canvas(vae, canvas, "cpu", torch.float16)
    assert seen == [(torch.float16, torch.float16), (torch.float32, torch.float32)]
    assert vae.dtype == torch.float16 and plain.dtype == upcast.dtype == torch.float16
    assert torch.isfinite(upcast).all()
