"""AnyStoryPipeline as a diffusers pipeline: registered parts, save/load, from_pipe both ways,
offload hooks on every part, per-call state, and the call conventions diffusers users rely on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import tiny
from anystory_cli.errors import ModelError
from anystory_cli.sd.adapter import AnyStoryAdapter
from anystory_cli.sd.pipeline import AnyStoryPipeline, AnyStorySDPipeline, AnyStoryXLPipeline

STEPS = 2
PARTS = ("vae", "text_encoder", "unet", "image_encoder", "adapter")


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def latents(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe("a red blob", generator=generator(), output_type="latent", **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_story_pipeline()


@pytest.fixture(scope="module")
def mira(pipe):
    return pipe.encode_character(tiny.sprite(), name="mira")


def test_the_image_encoder_and_the_adapter_are_registered_components(pipe):
    assert isinstance(pipe, AnyStorySDPipeline) and isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe, AnyStoryPipeline)
    components = pipe.components
    assert components["adapter"] is pipe.adapter and isinstance(pipe.adapter, AnyStoryAdapter)
    assert type(components["image_encoder"]).__name__ == "CLIPVisionModel"
    assert components["feature_extractor"].crop_size == {"height": 32, "width": 32}  # the adapter's size
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")


def test_save_pretrained_and_from_pretrained_draw_the_same_latents(pipe, mira, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "AnyStorySDPipeline"
    assert index["adapter"] == ["anystory_cli.sd.adapter", "AnyStoryAdapter"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    back = AnyStoryPipeline.from_pretrained(tmp_path)  # the shape comes from model_index.json
    assert type(back) is AnyStorySDPipeline and back.model_id == pipe.model_id
    assert torch.equal(latents(back, characters=[mira]), latents(pipe, characters=[mira]))


def test_an_sdxl_pipeline_round_trips_as_the_xl_shape(tmp_path):
    xl = tiny.tiny_story_pipeline(tiny.tiny_sdxl_pipeline())
    assert isinstance(xl, AnyStoryXLPipeline) and isinstance(xl, StableDiffusionXLPipeline)
    character = xl.encode_character(tiny.sprite(), name="mira")
    xl.save_pretrained(tmp_path)
    back = AnyStoryPipeline.from_pretrained(tmp_path)
    assert type(back) is AnyStoryXLPipeline
    # Within rounding: diffusers' own StableDiffusionXLPipeline round trip differs by ~2e-7 here
    # too (its loaded UNet computes on the file's memory, aligned differently).
    torch.testing.assert_close(latents(back, characters=[character], num_inference_steps=1),
                               latents(xl, characters=[character], num_inference_steps=1), atol=1e-5, rtol=0)


def test_from_pipe_shares_the_base_weights_and_the_base_class_draws_plain_again():
    base = tiny.tiny_sd_pipeline()
    encoder = tiny.tiny_image_encoder()
    story = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder))
    assert all(getattr(story, name) is getattr(base, name) for name in ("unet", "vae", "text_encoder", "scheduler"))
    story(  # a call with a character leaves nothing behind on the shared parts
        "a red blob", characters=[story.encode_character(tiny.sprite())], num_inference_steps=1)
    plain = StableDiffusionPipeline.from_pipe(story)
    assert type(plain) is StableDiffusionPipeline and plain.unet is base.unet
    fresh = tiny.tiny_sd_pipeline()
    assert torch.equal(plain("a red blob", num_inference_steps=STEPS, generator=generator(), output_type="latent").images,
                       fresh("a red blob", num_inference_steps=STEPS, generator=generator(), output_type="latent").images)


def test_from_pipe_refuses_a_pipeline_without_a_unet_shape_it_knows():
    class Other:
        unet = tiny.tiny_sd_unet()

    with pytest.raises(ModelError, match="StableDiffusionPipeline or a StableDiffusionXLPipeline"):
        AnyStoryPipeline.from_pipe(Other(), tiny.tiny_image_encoder(), None)


def test_two_pipelines_sharing_a_unet_do_not_see_each_other():
    base = tiny.tiny_sd_pipeline()
    encoder = tiny.tiny_image_encoder()
    first = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder, seed=1))
    alone = latents(first, characters=[first.encode_character(tiny.sprite())])
    second = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder, seed=2))
    other = latents(second, characters=[second.encode_character(tiny.sprite())])
    assert not torch.equal(alone, other)
    assert torch.equal(latents(first, characters=[first.encode_character(tiny.sprite())]), alone)


def test_model_offload_puts_a_hook_on_every_part(mira):
    pipe = tiny.tiny_story_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")  # a CUDA machine passes its GPU; the hooks are the same
    hooks = {name: type(getattr(pipe.components[name], "_hf_hook", None)).__name__ for name in PARTS}
    assert hooks == dict.fromkeys(PARTS, "CpuOffload")
    assert pipe._execution_device == torch.device("cpu", 0)
    character = pipe.encode_character(tiny.sprite(), name="mira")
    assert torch.equal(character.subject_tokens, mira.subject_tokens)
    plain = tiny.tiny_story_pipeline()
    assert torch.equal(latents(pipe, characters=[character]), latents(plain, characters=[character]))


def test_sequential_offload_puts_hooks_on_every_part():
    pipe = tiny.tiny_story_pipeline()
    pipe.enable_sequential_cpu_offload(device="cpu")
    for name in PARTS:
        assert type(getattr(pipe.components[name], "_hf_hook", None)).__name__ == "AlignDevicesHook", name
    # the adapter's weights wait on the meta device until one of its modules runs
    assert {p.device.type for p in pipe.adapter.parameters()} == {"meta"}


def test_the_callback_runs_once_per_step_with_the_tensors_it_asked_for(pipe, mira):
    seen = []

    def callback(step_pipe, step, timestep, tensors):
        seen.append((step, sorted(tensors), tuple(tensors["prompt_embeds"].shape)))
        return tensors

    latents(pipe, characters=[mira], num_inference_steps=3, callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    # guidance on: the prompt embeddings are the [unconditional; conditional] batch
    assert seen == [(step, ["latents", "prompt_embeds"], (2, 77, 32)) for step in range(3)]


def test_a_callback_that_asks_for_no_latents_still_gets_the_figures_pasted(pipe, mira):
    seen = []
    latents(pipe, characters=[mira], figure_boxes=[(0.1, 0.1, 0.6, 0.9)], paste_at=0.9, num_inference_steps=3,
            callback_on_step_end=lambda p, step, t, tensors: seen.append(sorted(tensors)) or tensors,
            callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert seen == [["latents", "prompt_embeds"]] * 3


def test_images_per_prompt_latents_output_types_and_return_dict(pipe, mira):
    two = latents(pipe, characters=[mira], num_images_per_prompt=2)
    assert two.shape == (2, 4, 16, 16) and not torch.equal(two[0], two[1])
    start = torch.randn(1, 4, 16, 16, generator=generator(3))
    given = latents(pipe, characters=[mira], latents=start)
    assert torch.equal(given, latents(pipe, characters=[mira], latents=start.clone()))
    assert not torch.equal(given, latents(pipe, characters=[mira]))
    kinds = {kind: pipe("a red blob", characters=[mira], num_inference_steps=1, output_type=kind).images
             for kind in ("pil", "np", "pt")}
    assert kinds["pil"][0].size == (32, 32)
    assert isinstance(kinds["np"], np.ndarray) and kinds["np"].shape == (1, 32, 32, 3)
    assert isinstance(kinds["pt"], torch.Tensor) and kinds["pt"].shape == (1, 3, 32, 32)
    as_tuple = pipe("a red blob", characters=[mira], num_inference_steps=1, output_type="latent",
                    return_routing=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 4, 16, 16) and as_tuple[1].shape == (1, 2, 32, 32)


def test_the_callers_cross_attention_kwargs_travel_beside_ours(pipe, mira):
    """A LoRA scale in cross_attention_kwargs reaches diffusers as in a plain call (0 switches a
    loaded LoRA's effect off), and the characters still reach the processors."""
    from peft import LoraConfig

    base = tiny.tiny_sd_pipeline()
    encoder = tiny.tiny_image_encoder()
    story = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder))
    character = story.encode_character(tiny.sprite())
    without = latents(story, characters=[character])
    base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]))
    assert not torch.equal(latents(story, characters=[character]), without)
    assert torch.equal(latents(story, characters=[character], cross_attention_kwargs={"scale": 0.0}), without)
