"""Prompt embeddings instead of a prompt, as diffusers pipelines take them (compel, long prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from anystory_cli.errors import InputError

STEPS = 2
CAPTION = "a red blob on grass"


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def is_xl(pipe):
    return getattr(pipe.base, "text_encoder_2", None) is not None


def encoded(pipe, caption=CAPTION, negative=None):
    """The caption encoded by the base pipeline: the keyword arguments a diffusers call takes."""
    base = pipe.base
    if is_xl(pipe):
        pe, npe, pooled, npooled = base.encode_prompt(caption, device=pipe.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=negative)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled)
    pe, npe = base.encode_prompt(caption, pipe.device, 1, True, negative_prompt=negative)
    return dict(prompt_embeds=pe, negative_prompt_embeds=npe)


def test_embeddings_without_characters_are_the_plain_pipeline_given_them(story_pipe):
    embeds = encoded(story_pipe, negative="blurry")
    plain = story_pipe.base(prompt=None, num_inference_steps=STEPS, generator=generator(), output_type="np",
                            **embeds).images
    got = story_pipe(prompt=None, subject_scale=0.0, num_inference_steps=STEPS, generator=generator(),
                     output_type="np", **embeds).images
    assert np.array_equal(got, plain)
    # The embeddings are what is drawn: another caption's embeddings draw another picture.
    other = story_pipe(subject_scale=0.0, num_inference_steps=STEPS, generator=generator(), output_type="np",
                       **encoded(story_pipe, "a blue cube at night", negative="blurry")).images
    assert not np.array_equal(other, got)


def test_embeddings_of_a_caption_draw_what_the_caption_draws(story_pipe):
    character = story_pipe.encode_character(tiny.sprite())
    common = dict(characters=[character], num_inference_steps=STEPS, output_type="np", return_routing=True)
    by_text = story_pipe(CAPTION, generator=generator(), **common)
    by_embeds = story_pipe(generator=generator(), **common, **encoded(story_pipe))
    assert np.array_equal(by_text.images, by_embeds.images)
    assert torch.equal(by_text.routing_maps, by_embeds.routing_maps)


def test_positive_embeddings_alone_use_the_base_s_empty_negative(story_pipe):
    embeds = encoded(story_pipe)
    positive = {k: v for k, v in embeds.items() if not k.startswith("negative")}
    by_text = story_pipe(CAPTION, subject_scale=0.0, num_inference_steps=STEPS, generator=generator(),
                         output_type="np").images
    got = story_pipe(subject_scale=0.0, num_inference_steps=STEPS, generator=generator(), output_type="np",
                     **positive).images
    assert np.array_equal(got, by_text)


def test_a_batch_of_embeddings_with_several_images_each(story_pipe):
    character = story_pipe.encode_character(tiny.sprite())
    embeds = {k: torch.cat([v, v]) for k, v in encoded(story_pipe).items()}
    out = story_pipe(characters=[character], num_images_per_prompt=2, num_inference_steps=STEPS,
                     generator=generator(), output_type="np", return_routing=True, **embeds)
    assert len(out.images) == 4
    assert out.routing_maps.shape[0] == 4


def test_prompt_inputs_are_checked_as_diffusers_does_in_one_typed_error(story_pipe):
    embeds = encoded(story_pipe)
    call = dict(num_inference_steps=STEPS, output_type="np")
    with pytest.raises(InputError, match="either prompt or prompt_embeds, not neither"):
        story_pipe(**call)
    with pytest.raises(InputError, match="not both"):
        story_pipe(CAPTION, **call, **embeds)
    with pytest.raises(InputError, match="negative_prompt or negative_prompt_embeds"):
        story_pipe(negative_prompt="blurry", **call, **embeds)
    with pytest.raises(InputError, match="same shape"):
        story_pipe(**call, **{**embeds, "negative_prompt_embeds": embeds["negative_prompt_embeds"][:, :5]})
    with pytest.raises(InputError, match=r"shape \(batch, tokens"):
        story_pipe(**call, **{**embeds, "prompt_embeds": embeds["prompt_embeds"][..., :3]})
    with pytest.raises(InputError, match="prompt must be a string"):
        story_pipe(prompt=7, **call)
    if is_xl(story_pipe):
        with pytest.raises(InputError, match="needs pooled_prompt_embeds"):
            story_pipe(**call, **{k: v for k, v in embeds.items() if k != "pooled_prompt_embeds"})
    else:
        with pytest.raises(InputError, match="pooled_prompt_embeds is for SDXL"):
            story_pipe(**call, **embeds, pooled_prompt_embeds=torch.zeros(1, 32))


def test_route_latents_takes_embeddings():
    pipe = tiny.tiny_story_pipeline()
    character = pipe.encode_character(tiny.sprite())
    latents = torch.randn(1, 4, 16, 16, generator=generator())
    by_text = pipe.route_latents(latents, 500, CAPTION, [character])
    by_embeds = pipe.route_latents(latents, 500, None, [character],
                                   prompt_embeds=encoded(pipe)["prompt_embeds"])
    assert by_text.keys() == by_embeds.keys()
    assert all(torch.equal(by_text[k], by_embeds[k]) for k in by_text)
