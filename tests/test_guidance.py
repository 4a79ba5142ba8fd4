"""Classifier-free guidance in a limited interval of noise levels (`anystory_cli/sd/guidance.py`), on
tiny real diffusers pipelines: which steps are guided, and that the ends of the range reproduce
the plain pipeline's two modes exactly (guided everywhere) or within float noise (nowhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from anystory_cli.errors import InputError
from anystory_cli.sd.guidance import UNGUIDED_SCALE, check_interval, guided_call_kwargs

STEPS = 4
PROMPT = "a red blob on grass"


@pytest.fixture(scope="module")
def base():
    return tiny.tiny_sd_pipeline()


@pytest.fixture(scope="module")
def story_pipe():
    return tiny.tiny_story_pipeline()


def draw(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def scales_used(pipe, guidance: float, interval) -> tuple[list[int], list[float]]:
    """(timesteps, guidance scale of each step), read by a user callback after each step."""
    seen: list[tuple[int, float]] = []

    def spy(step_pipe, step, timestep, tensors):
        seen.append((int(timestep), float(step_pipe.guidance_scale)))
        return tensors

    pipe(PROMPT, num_inference_steps=STEPS, output_type="np",
         **guided_call_kwargs(pipe, guidance, interval, STEPS, spy))
    return [t for t, _ in seen], [s for _, s in seen]


def test_only_the_steps_inside_the_interval_are_guided(base):
    timesteps, scales = scales_used(base, 5.0, (0.0, 0.5))
    total = base.scheduler.config.num_train_timesteps
    assert len(timesteps) == STEPS  # the user's callback still runs after every step
    expected = [5.0 if t / total <= 0.5 else UNGUIDED_SCALE for t in timesteps]
    assert scales == pytest.approx(expected)
    assert 5.0 in scales and UNGUIDED_SCALE in scales  # the tiny schedule crosses 0.5 T
    assert scales[0] == UNGUIDED_SCALE  # the noisiest step comes first


def test_the_whole_range_is_the_plain_pipeline_call(base):
    assert guided_call_kwargs(base, 4.0, (0.0, 1.0), STEPS) == {"guidance_scale": 4.0, "callback_on_step_end": None}
    assert guided_call_kwargs(base, 4.0, None, STEPS)["guidance_scale"] == 4.0
    assert guided_call_kwargs(base, 1.0, (0.0, 0.5), STEPS)["guidance_scale"] == 1.0  # no guidance to limit


def test_an_interval_holding_no_step_draws_the_conditional_prediction(base):
    """Guidance nowhere == the pipeline without guidance (scale 1: conditional rows only), up to
    the 1e-6 of the unconditional difference the two-row batch keeps."""
    unguided = draw(base, guidance_scale=1.0)
    nowhere = draw(base, **guided_call_kwargs(base, 6.0, (0.0, 1e-4), STEPS))
    guided = draw(base, guidance_scale=6.0)
    assert np.abs(nowhere - unguided).max() < 1e-4
    assert np.abs(guided - unguided).max() > 1e-2  # guidance matters on this pipeline


def test_anystory_pipeline_passes_the_interval_and_keeps_the_user_callback(story_pipe):
    calls = []

    def on_step(step_pipe, step, timestep, tensors):
        calls.append(step)
        return tensors

    everywhere = draw(story_pipe, characters=[], subject_scale=0.0, guidance_scale=6.0)
    plain_base = draw(story_pipe.base, guidance_scale=6.0)
    whole = draw(story_pipe, characters=[], subject_scale=0.0, guidance_scale=6.0, guidance_interval=(0.0, 1.0))
    assert np.array_equal(everywhere, plain_base) and np.array_equal(whole, plain_base)
    limited = draw(story_pipe, characters=[], subject_scale=0.0, guidance_scale=6.0, guidance_interval=(0.0, 0.5),
                   callback_on_step_end=on_step)
    same_on_base = draw(story_pipe.base, **guided_call_kwargs(story_pipe.base, 6.0, (0.0, 0.5), STEPS))
    assert calls == list(range(STEPS))
    assert np.array_equal(limited, same_on_base) and not np.array_equal(limited, plain_base)


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.7, 0.2), (-0.1, 0.5), (0.0, 1.5)])
def test_an_interval_outside_the_schedule_is_refused(interval, base):
    with pytest.raises(InputError, match="0 <= low < high <= 1"):
        check_interval(interval)
    with pytest.raises(InputError, match="0 <= low < high <= 1"):
        guided_call_kwargs(base, 4.0, interval, STEPS)


def test_an_unnamed_scale_is_the_base_pipelines_own_default():
    """SDXL guides at 5.0 when no scale is named (SD 1.5 at 7.5): with an interval the scale must
    still be the base's own, so the whole range draws what the plain SDXL call draws."""
    pipe = tiny.tiny_story_pipeline(tiny.tiny_sdxl_pipeline())
    plain = draw(pipe.base)
    whole = draw(pipe, characters=[], subject_scale=0.0, guidance_interval=(0.0, 1.0))
    assert np.array_equal(whole, plain)
