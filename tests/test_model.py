"""The AnyStory model on tiny random SD-1.5- and SDXL-shaped components (offline, CPU)."""

from __future__ import annotations

import contextlib
import copy
import math
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from anystory_cli.errors import InputError, ModelError
from anystory_cli.sd.adapter import install, module_key
from anystory_cli.sd.attention import AnyStoryContext, InjectionInputs
from anystory_cli.sd.reference_net import ReferenceNet, _strip_cross_attention
from anystory_cli.sd.pipeline import AnyStoryPipeline
from anystory_cli.sd.weights import CharacterEncoding, load_adapter, save_adapter

STEPS = 2


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny.tiny_story_pipeline()


@pytest.fixture(scope="module")
def sd_characters(sd_pipe):
    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (230, 200, 20)]
    return [sd_pipe.encode_character(tiny.sprite(c, seed=i), name=f"c{i}") for i, c in enumerate(colours)]


def plain(pipe, **kwargs):
    """The wrapped diffusers pipeline alone."""
    return pipe.base("a red blob on grass", num_inference_steps=STEPS, generator=generator(),
                     output_type="np", **kwargs).images


def story(pipe, characters=(), **kwargs):
    return pipe("a red blob on grass", characters=characters, num_inference_steps=STEPS,
                generator=generator(), output_type="np", **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. equivalence with the plain pipeline


def test_no_characters_and_zero_subject_strength_is_the_plain_pipeline(story_pipe):
    expected = plain(story_pipe)
    got = story(story_pipe, subject_scale=0.0).images
    assert np.array_equal(got, expected)


def test_characters_with_injection_switched_off_are_the_plain_pipeline(story_pipe):
    character = story_pipe.encode_character(tiny.sprite())
    got = story(story_pipe, [character], subject_scale=0.0, reference_scale=None).images
    assert np.array_equal(got, plain(story_pipe))


def test_characters_change_the_image(story_pipe):
    character = story_pipe.encode_character(tiny.sprite())
    assert not np.array_equal(story(story_pipe, [character]).images, plain(story_pipe))


@contextlib.contextmanager
def installed(pipe):
    """The pipeline's processors on its UNet for a block (a call installs them for itself)."""
    handle = install(pipe.adapter, pipe.unet)
    try:
        yield pipe.unet
    finally:
        handle.remove()


def test_a_call_leaves_the_unet_as_it_found_it():
    """The processors and the forward hook are the call's: before and after it the UNet has its
    own processors, no hook of ours and no new parameters."""
    base = tiny.tiny_sd_pipeline()
    before = dict(base.unet.attn_processors)
    state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    encoder = tiny.tiny_image_encoder()
    pipe = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder))
    seen = {}

    def look(step_pipe, step, timestep, tensors):
        seen.update(processors=set(type(p).__name__ for p in step_pipe.unet.attn_processors.values()),
                    hooks=len(step_pipe.unet._forward_pre_hooks))
        return tensors

    pipe("a red blob", characters=[pipe.encode_character(tiny.sprite())], num_inference_steps=1,
         callback_on_step_end=look, output_type="latent")
    assert seen == {"processors": {"CrossAttentionProcessor", "SelfAttentionProcessor"}, "hooks": 1}
    assert set(base.unet.state_dict()) == set(state), "installing must not add UNet parameters"
    after = base.unet.attn_processors
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert not base.unet._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# 2. routing confines influence, layer by layer


def _inputs(characters, size, training, routes, scale=0.0):
    tokens = torch.stack([c.subject_tokens for c in characters] + [torch.zeros_like(characters[0].subject_tokens)])
    routing = torch.stack([c.routing_feature for c in characters] + [torch.zeros_like(characters[0].routing_feature)])
    return InjectionInputs(
        subject_tokens=tokens[None], routing_features=routing[None],
        reference_features={k: torch.stack([c.reference_features[k] for c in characters])[None]
                            for k in characters[0].reference_features},
        entry_valid=torch.ones(1, len(characters) + 1, dtype=torch.bool), latent_size=size,
        fixed_routes=routes, reference_scale=scale, training=training,
    )


def _three_way_routes(size):
    """Left third -> character 1, middle third -> character 2, right third -> background."""
    h, w = size
    owner = torch.div(torch.arange(w) * 3, w, rounding_mode="floor").expand(h, w)
    return torch.nn.functional.one_hot(owner, 3).permute(2, 0, 1)[None].float(), owner


def _changed(character, seed):
    torch.manual_seed(seed)
    return CharacterEncoding(
        subject_tokens=torch.randn_like(character.subject_tokens),
        routing_feature=torch.randn_like(character.routing_feature),
        reference_features={k: torch.randn_like(v) for k, v in character.reference_features.items()},
        model_id=character.model_id,
    )


@pytest.mark.parametrize("training", [False, True], ids=["gathered", "dense"])
def test_a_pixel_routed_to_character_1_ignores_character_2(sd_pipe, sd_characters, training):
    with installed(sd_pipe) as unet:
        _check_pixels_ignore_the_other_character(sd_pipe, sd_characters, training, unet)


def _check_pixels_ignore_the_other_character(sd_pipe, sd_characters, training, unet):
    size = (16, 16)
    routes, _ = _three_way_routes(size)
    first, second = sd_characters[:2]
    context_a = AnyStoryContext(_inputs([first, second], size, training, routes, scale=0.5))
    context_b = AnyStoryContext(_inputs([first, _changed(second, 1)], size, training, routes, scale=0.5))
    torch.manual_seed(0)
    text = torch.randn(1, 7, 32)
    checked = 0
    for name, attn in unet.named_modules():
        if not (name.endswith(".attn1") or name.endswith(".attn2")):
            continue
        tokens = attn.to_q.in_features
        for context in (context_a, context_b):
            context.begin_forward(1)
        hidden = torch.randn(1, 256 // (4 if tokens == 64 else 1), tokens)
        layer_size = context_a.spatial_size(hidden.shape[1])
        for context in (context_a, context_b):
            context.previous_routes = torch.nn.functional.interpolate(routes, size=layer_size)
        context_text = text if name.endswith(".attn2") else None
        with torch.no_grad():
            out_a = attn.processor(attn, hidden, context_text, anystory=context_a)
            out_b = attn.processor(attn, hidden, context_text, anystory=context_b)
        _, owner = _three_way_routes(layer_size)
        owner = owner.flatten()
        assert torch.equal(out_a[0, owner != 1], out_b[0, owner != 1]), name
        if name.endswith(".attn2") or "down_blocks.0" not in name:
            assert not torch.allclose(out_a[0, owner == 1], out_b[0, owner == 1]), name
        checked += 1
    assert checked == 14


def test_dense_and_gathered_paths_agree(sd_pipe, sd_characters):
    with installed(sd_pipe) as unet:
        _check_dense_and_gathered_agree(sd_characters, unet)


def _check_dense_and_gathered_agree(sd_characters, unet):
    size = (16, 16)
    routes, _ = _three_way_routes(size)
    torch.manual_seed(0)
    text = torch.randn(1, 7, 32)
    for name, attn in unet.named_modules():
        if not (name.endswith(".attn1") or name.endswith(".attn2")):
            continue
        hidden = torch.randn(1, 256 if attn.to_q.in_features == 32 else 64, attn.to_q.in_features)
        outputs = []
        for training in (False, True):
            context = AnyStoryContext(_inputs(sd_characters[:2], size, training, routes, scale=0.7))
            context.begin_forward(1)
            context.previous_routes = routes
            with torch.no_grad():
                outputs.append(attn.processor(attn, hidden, text if name.endswith(".attn2") else None,
                                              anystory=context))
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_attention_with_lse_matches_sdpa_and_its_reference_form():
    from anystory_cli.sd.attention import _attention_with_lse_reference, attention_with_lse

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    out, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(lse, (q @ k.transpose(-1, -2) / 8**0.5).logsumexp(-1))
    ref_out, ref_lse = _attention_with_lse_reference(q, k, v)
    torch.testing.assert_close(ref_out, out)
    torch.testing.assert_close(ref_lse, lse)


# ---------------------------------------------------------------------------------------------
# 3. ReferenceNet: once per character; encodings round-trip


def test_reference_net_runs_once_per_character_never_per_step(tmp_path):
    base = tiny.tiny_sd_pipeline()
    encoder = tiny.tiny_image_encoder()
    pipe = AnyStoryPipeline.from_pipe(base, encoder, tiny.tiny_adapter(base.unet, encoder))
    calls = []
    pipe.adapter.reference_net.register_forward_hook(lambda *a: calls.append(1))
    characters = [pipe.encode_character(tiny.sprite(c, seed=i)) for i, c in enumerate([(200, 0, 0), (0, 0, 200)])]
    assert len(calls) == 2
    first = pipe("two blobs", characters=characters, num_inference_steps=4, generator=generator(), output_type="np")
    assert len(calls) == 2, "the ReferenceNet must not run inside the denoising loop"

    for i, character in enumerate(characters):
        character.save(tmp_path / f"c{i}.safetensors")
    loaded = [CharacterEncoding.load(tmp_path / f"c{i}.safetensors") for i in range(2)]
    again = pipe("two blobs", characters=loaded, num_inference_steps=4, generator=generator(), output_type="np")
    assert np.array_equal(first.images, again.images)
    assert len(calls) == 2


def test_fresh_reference_net_matches_the_unet_on_the_latent_alone():
    unet = tiny.tiny_sd_unet()
    net = ReferenceNet.from_unet(unet)
    assert all(block.attn2 is None for block in net.unet.modules() if hasattr(block, "attn2"))
    assert not any(".attn2." in k for k in net.unet.state_dict())
    stripped = copy.deepcopy(unet)
    _strip_cross_attention(stripped)
    expected = {}
    for name, module in stripped.named_modules():
        if name.endswith(".attn1"):
            module.register_forward_pre_hook(lambda m, a, k, name=name: expected.__setitem__(name, a[0]), with_kwargs=True)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    stripped(latents, 0, encoder_hidden_states=torch.zeros(1, 1, 32))
    got = net(latents, torch.rand(1, 1, 16, 16), (32, 32))  # the mask channel starts at zero weight
    assert list(got) == list(expected)[1:]
    for name, features in got.items():
        torch.testing.assert_close(features, expected[name])


def test_an_adapter_made_from_a_unet_carrying_a_lora_is_made_from_its_base_weights():
    """A UNet with a style LoRA already on it (peft layers): the ReferenceNet copy and the new K/V
    weights come from the base weights, as from the plain UNet."""
    from peft import LoraConfig

    plain = tiny.tiny_sd_unet()
    with_lora = copy.deepcopy(plain)
    with_lora.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="style")
    encoder = tiny.tiny_image_encoder()
    expected = tiny.tiny_adapter(plain, encoder).state_dict()  # same seed: same random parts
    got = tiny.tiny_adapter(with_lora, encoder).state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------
# 4. ReferenceNet size on the real SDXL UNet config (meta device, no weights)

SDXL_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


def test_reference_net_size_on_sdxl_matches_the_paper():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
        net = ReferenceNet(SDXL_UNET_CONFIG)
    full = sum(p.numel() for p in unet.parameters())
    light = sum(p.numel() for p in net.parameters())
    assert abs(full / 2.57e9 - 1) < 0.01, full
    assert abs(light / 2.02e9 - 1) < 0.01, light


# ---------------------------------------------------------------------------------------------
# 5. router maps


def test_routing_maps_are_per_layer_distributions_averaged_at_image_size(sd_pipe, sd_characters):
    import torch.nn.functional as F

    out = story(sd_pipe, sd_characters[:3], return_routing=True)
    assert out.routing_maps.shape == (1, 4, 32, 32)
    torch.testing.assert_close(out.routing_maps.sum(dim=1), torch.ones(1, 32, 32))
    upsampled = []
    for name, maps in out.routing_layers.items():
        assert maps.shape[1] == 4, name
        assert maps.min() >= 0.0
        torch.testing.assert_close(maps.sum(dim=1), torch.ones(1, *maps.shape[-2:]))
        upsampled.append(F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out.routing_maps, torch.stack(upsampled).mean(dim=0))


def test_recording_the_routing_maps_changes_no_pixel(sd_pipe, sd_characters):
    """The soft maps are computed only when recorded; the gates, and so the image, are the same."""
    recorded = story(sd_pipe, sd_characters[:3], return_routing=True, reference_scale=0.5)
    unrecorded = story(sd_pipe, sd_characters[:3], reference_scale=0.5)
    assert np.array_equal(recorded.images, unrecorded.images)


def test_entry_argmax_is_the_first_maximum_like_argmax():
    from anystory_cli.sd.router import MASKED, entry_argmax

    torch.manual_seed(0)
    for trial in range(20):
        maps = torch.randint(0, 3, (2, 4, 97)).float()  # many ties
        maps[:, :, :5] = MASKED if trial % 2 else float("nan")
        if trial % 3 == 0:  # a layout that is not contiguous
            maps = maps.transpose(0, 1).contiguous().transpose(0, 1)
        assert torch.equal(entry_argmax(maps), maps.argmax(dim=1))
        assert torch.equal(entry_argmax(maps, keepdim=True), maps.argmax(dim=1, keepdim=True))


def test_pixel_sort_is_made_once_per_routing_and_resolution(sd_pipe, sd_characters, monkeypatch):
    """A cross-attention layer sorts its pixels by its new gates; the self-attention layer after it
    reads the same gates at the same resolution and reuses that sort."""
    from anystory_cli.sd import attention

    sorts = []
    original = attention._pixel_groups
    monkeypatch.setattr(attention, "_pixel_groups", lambda gates: sorts.append(gates.shape) or original(gates))
    sd_pipe("a red blob on grass", characters=sd_characters[:2], num_inference_steps=1, generator=generator(),
            output_type="latent", reference_scale=0.5)
    cross_layers = len(sd_pipe.adapter.spec.cross_layers)
    resolution_changes = sum(1 for a, b in zip(sorts, sorts[1:]) if a[-1] != b[-1])
    assert len(sorts) == cross_layers + resolution_changes


def test_router_hard_routes_and_fully_masked_rows_stay_finite():
    from anystory_cli.sd.router import MASKED, LayerRouter, hard_routes

    torch.manual_seed(0)
    router = LayerRouter(routing_dim=8, latent_dim=6, hidden_dim=4)
    routing, latents = torch.randn(2, 3, 8), torch.randn(2, 10, 6)
    bias = torch.zeros(2, 3, 10)
    bias[:, :2] = MASKED  # two entries forbidden everywhere: their refinement rows are fully masked
    coarse, logits = router(routing, latents, bias)
    assert torch.isfinite(coarse).all() and torch.isfinite(logits).all()
    maps = logits.softmax(dim=1)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 10))
    for training in (False, True):
        gates = hard_routes(logits, training=training)
        assert torch.equal(gates.sum(dim=1), torch.ones(2, 10))
        assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard_routes(logits, training=False).argmax(dim=1), torch.full((2, 10), 2))
    everything_masked = router(routing, latents, torch.full((2, 3, 10), MASKED))
    assert all(torch.isfinite(x).all() for x in everything_masked)


@pytest.mark.parametrize("context_layers", [0, 1, 2])
def test_router_keys_see_exactly_context_layers_of_neighbourhood(context_layers):
    """The coarse map at a pixel depends on the tokens within `context_layers` grid steps of it
    (0: the paper's per-token projection), and on none further away."""
    from anystory_cli.sd.router import LayerRouter

    torch.manual_seed(0)
    router = LayerRouter(routing_dim=8, latent_dim=6, hidden_dim=4, context_layers=context_layers, context_dim=5)
    routing, tokens = torch.randn(1, 3, 8), torch.randn(1, 7 * 9, 6)
    changed = tokens.clone()
    changed[0, 3 * 9 + 4] += 1.0  # the token at row 3, column 4 of a 7x9 grid
    before, _ = router(routing, tokens, None, (7, 9))
    after, _ = router(routing, changed, None, (7, 9))
    moved = (after - before).abs().amax(dim=1).view(7, 9) > 1e-6
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(9), indexing="ij")
    within = torch.maximum((rows - 3).abs(), (cols - 4).abs()) <= context_layers
    assert torch.equal(moved, within)


def test_router_with_context_layers_needs_the_grid_size():
    from anystory_cli.sd.router import LayerRouter

    router = LayerRouter(routing_dim=8, latent_dim=6, hidden_dim=4, context_layers=1)
    with pytest.raises(ValueError, match="grid size"):
        router(torch.randn(1, 3, 8), torch.randn(1, 12, 6), None)
    with pytest.raises(ValueError, match="grid size"):
        router(torch.randn(1, 3, 8), torch.randn(1, 12, 6), None, (3, 5))


def test_adapters_saved_before_router_context_load_with_the_paper_s_router(tmp_path):
    """A config written without the router_context fields (an adapter with the paper's
    per-token routers) reads as context_layers 0 with the same weight shapes."""
    import json

    from anystory_cli.sd.adapter import AnyStoryConfig

    config = json.loads(AnyStoryConfig.for_unet(tiny.tiny_sd_pipeline().unet, 32).to_json())
    for key in ("router_context_layers", "router_context_dim"):
        config.pop(key)
    assert AnyStoryConfig.from_json(json.dumps(config)).router_context_layers == 0


def test_regions_steer_the_router(sd_pipe, sd_characters):
    boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    out = story(sd_pipe, sd_characters[:2], regions=boxes, return_routing=True)
    for name, maps in out.routing_layers.items():
        h, w = maps.shape[-2:]
        left = torch.arange(w) < w / 2
        assert maps[0, 0][:, ~left].max() < 1e-3, f"{name}: character 1 outside its box"
        assert maps[0, 1][:, left].max() < 1e-3, f"{name}: character 2 outside its box"


def test_mask_regions_confine_the_router_like_boxes(sd_pipe, sd_characters):
    """A region given as a mask (array or PIL image, any size) confines its character as the
    equivalent box does."""
    left = np.zeros((64, 64), np.float32)
    left[:, :32] = 1.0
    right = Image.fromarray(((1.0 - left) * 255).astype(np.uint8))
    boxes = story(sd_pipe, sd_characters[:2], regions=[(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)],
                  return_routing=True)
    masks = story(sd_pipe, sd_characters[:2], regions=[left, right], return_routing=True)
    np.testing.assert_array_equal(masks.images, boxes.images)
    for name, maps in masks.routing_layers.items():
        w = maps.shape[-1]
        assert maps[0, 0][:, w // 2:].max() < 1e-3 and maps[0, 1][:, : w // 2].max() < 1e-3, name


def test_a_box_thinner_than_a_latent_pixel_still_covers_one(sd_pipe, sd_characters):
    """A thin box is rounded out to at least one latent pixel: the character is routed there and
    nowhere else (a box covering no pixel would drop the character silently)."""
    thin = (0.5, 0.25, 0.51, 0.27)  # 0.16 x 0.32 latent pixels on the 16 x 16 grid
    out = story(sd_pipe, sd_characters[:1], regions=[thin], return_routing=True)
    finest = max(out.routing_layers.values(), key=lambda m: m.shape[-1])
    h, w = finest.shape[-2:]
    allowed = torch.zeros(h, w, dtype=torch.bool)
    allowed[int(0.25 * h): max(int(0.25 * h) + 1, math.ceil(0.27 * h)),
            int(0.5 * w): max(int(0.5 * w) + 1, math.ceil(0.51 * w))] = True
    assert allowed.sum() == 1
    character = finest[0, 0]
    assert character[~allowed].max() < 1e-3
    assert character[allowed].max() > 1e-6  # the one pixel is open to it


def test_height_and_width_must_be_multiples_of_the_latent_grid_and_of_8(sd_pipe):
    """The latents are the VAE's scale smaller; the base pipeline itself refuses sizes that are not
    multiples of 8 (a raw ValueError): one InputError for both."""
    assert sd_pipe.base.vae_scale_factor == 2  # the tiny VAE: 30 would fit its grid, not the base's check
    with pytest.raises(InputError, match="height and width must be multiples of 8, got 31x32"):
        sd_pipe("a hill", height=31, width=32, num_inference_steps=1)
    with pytest.raises(InputError, match="multiples of 8, got 32x30"):
        sd_pipe("a hill", height=32, width=30, num_inference_steps=1)


def test_four_characters_each_stay_in_their_own_column(sd_pipe, sd_characters):
    columns = [(i / 4, 0.0, (i + 1) / 4, 1.0) for i in range(4)]
    out = story(sd_pipe, sd_characters, regions=columns, return_routing=True)
    assert out.images.shape == (1, 32, 32, 3) and out.routing_maps.shape[1] == 5
    for name, maps in out.routing_layers.items():
        w = maps.shape[-1]
        for i in range(4):
            inside = (torch.arange(w) >= i * w // 4) & (torch.arange(w) < (i + 1) * w // 4)
            assert maps[0, i][:, ~inside].max() < 1e-3, f"{name}: character {i + 1} outside its column"
    three = story(sd_pipe, sd_characters[:3], regions=columns[:3]).images
    assert np.abs(out.images - three).max() > 1e-3  # the fourth character is drawn


# ---------------------------------------------------------------------------------------------
# 6. the training-time path


def test_training_path_reaches_router_and_qformers_not_the_frozen_unet():
    from anystory_cli.sd.router import routing_loss

    base = tiny.tiny_sd_pipeline()
    encoder = tiny.tiny_image_encoder()
    unet = base.unet.requires_grad_(False)
    adapter = tiny.tiny_adapter(unet, encoder).train()
    handle = install(adapter, unet)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    features = torch.randn(2, 3, 17, 32)  # (B, N+1 incl. the zero image, T, D)
    tokens, routing = adapter.encode_features(features.flatten(0, 1))
    references = adapter.reference_net(torch.randn(4, 4, 16, 16), torch.ones(4, 1, 16, 16), (32, 32))
    inputs = InjectionInputs(
        subject_tokens=tokens.view(2, 3, *tokens.shape[1:]),
        routing_features=routing.view(2, 3, -1),
        reference_features={k: v.view(2, 2, *v.shape[1:]) for k, v in references.items()},
        entry_valid=torch.ones(2, 3, dtype=torch.bool), latent_size=(16, 16), training=True,
    )
    context = AnyStoryContext(inputs)
    pred = unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 7, 32),
                cross_attention_kwargs={"anystory": context}).sample
    masks = torch.zeros(2, 2, 32, 32)
    masks[:, 0, :, :16] = 1
    masks[:, 1, :, 16:] = 1
    maps = [m for _, m in context.maps + context.coarse_maps]
    loss = pred.pow(2).mean() + routing_loss(maps, masks)
    loss.backward()

    def has_grad(module):
        grads = [p.grad for p in module.parameters()]
        return all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    assert len(context.maps) == 7
    assert has_grad(adapter.routers) and has_grad(adapter.routing_qformer) and has_grad(adapter.subject_qformer)
    assert has_grad(adapter.subject_kv) and has_grad(adapter.reference_kv)
    assert all(p.grad is None for p in unet.parameters())
    torch.optim.SGD(adapter.parameters(), lr=0.1).step()
    assert all(torch.equal(unet_before[k], v) for k, v in unet.state_dict().items())
    handle.remove()


# ---------------------------------------------------------------------------------------------
# weights


def test_adapter_file_alone_rebuilds_the_modules(tmp_path, sd_pipe, sd_characters):
    path = save_adapter(sd_pipe.adapter, tmp_path / "adapter.safetensors")
    loaded = load_adapter(path)
    assert loaded.config == sd_pipe.adapter.config
    for (k, a), (k2, b) in zip(sd_pipe.adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    base = tiny.tiny_sd_pipeline()
    pipe = AnyStoryPipeline.from_pipe(base, sd_pipe.image_encoder, path)
    assert pipe.model_id == sd_pipe.model_id
    character = pipe.encode_character(tiny.sprite())
    assert np.array_equal(story(pipe, [character]).images,
                          story(sd_pipe, [sd_pipe.encode_character(tiny.sprite())]).images)


def test_fp16_adapter_file_loads(tmp_path, sd_pipe):
    path = save_adapter(sd_pipe.adapter, tmp_path / "a16.safetensors", dtype=torch.float16)
    assert path.stat().st_size < 0.6 * save_adapter(sd_pipe.adapter, tmp_path / "a32.safetensors").stat().st_size
    assert load_adapter(path).subject_qformer.queries.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# bad input: typed errors, never a shape error from inside torch


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "I", "RGB"])
def test_reference_image_modes_are_accepted(sd_pipe, mode):
    rgba = tiny.sprite()
    mask = np.asarray(rgba.getchannel("A")) > 0
    if mode in ("RGBA", "LA"):
        image, kwargs = rgba.convert(mode), {}
    elif mode == "P":
        image, kwargs = rgba.convert("RGBA").convert("P"), {"mask": mask}
    elif mode in ("I;16", "I"):
        grey = np.asarray(rgba.convert("L"), dtype=np.uint16) * 257
        image, kwargs = Image.fromarray(grey), {"mask": mask}
        image = image.convert("I") if mode == "I" else image
        assert image.mode == mode
    else:
        image, kwargs = rgba.convert(mode), {"mask": mask}
    character = sd_pipe.encode_character(image, **kwargs)
    # The same character as the 8-bit RGB image it shows, with the same mask.
    grey = mode in ("LA", "L", "I;16", "I")
    shown = (rgba.convert("L") if grey else rgba.convert("P") if mode == "P" else rgba.convert(mode)).convert("RGB")
    expected = sd_pipe.encode_character(shown, mask=mask)
    assert torch.equal(character.subject_tokens, expected.subject_tokens)
    assert torch.equal(character.figure, expected.figure)
    for layer, features in expected.reference_features.items():
        assert torch.equal(character.reference_features[layer], features), layer


def test_bad_masks_are_typed_errors(sd_pipe):
    opaque = tiny.sprite().convert("RGB")
    with pytest.raises(InputError, match="mask is 10x10 but the image is 48x48"):
        sd_pipe.encode_character(opaque, mask=Image.new("L", (10, 10), 255))
    with pytest.raises(InputError, match="mask has shape"):
        sd_pipe.encode_character(opaque, mask=np.ones((48, 47)))
    with pytest.raises(InputError, match="empty"):
        sd_pipe.encode_character(opaque, mask=np.zeros((48, 48)))
    with pytest.raises(InputError, match="no transparency"):
        sd_pipe.encode_character(opaque)
    with pytest.raises(InputError, match="expected a PIL image"):
        sd_pipe.encode_character(np.zeros((4, 4, 3)))


def test_too_many_characters_is_a_typed_error(sd_pipe, sd_characters):
    with pytest.raises(InputError, match="5 characters in one image, but this model supports at most 4"):
        story(sd_pipe, sd_characters + sd_characters[:1])


def test_foreign_encoding_and_bad_regions_are_typed_errors(sd_pipe, sd_characters):
    foreign = copy.copy(sd_characters[0])
    foreign.model_id = "someone-else"
    with pytest.raises(InputError, match="encode the character again"):
        story(sd_pipe, [foreign])
    with pytest.raises(InputError, match="2 regions for 1 characters"):
        story(sd_pipe, sd_characters[:1], regions=[None, None])
    with pytest.raises(InputError, match=r"regions\[0\]: box"):
        story(sd_pipe, sd_characters[:1], regions=[(0.5, 0, 0.2, 1)])


def test_adapter_for_another_base_model_is_refused():
    sd, sdxl = tiny.tiny_sd_pipeline(), tiny.tiny_sdxl_pipeline()
    encoder = tiny.tiny_image_encoder()
    adapter = tiny.tiny_adapter(sd.unet, encoder)
    with pytest.raises(ModelError, match="adapter does not fit this base model"):
        AnyStoryPipeline.from_pipe(sdxl, encoder, adapter)
    wide_encoder = tiny.tiny_image_encoder()
    wide_encoder.config.hidden_size = 48
    with pytest.raises(ModelError, match="image features of width 32"):
        AnyStoryPipeline.from_pipe(sd, wide_encoder, adapter)


def test_missing_or_foreign_adapter_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_adapter(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_adapter(tmp_path / "junk.safetensors")


def test_module_keys_have_no_dots():
    assert module_key("down_blocks.1.attentions.0.transformer_blocks.0.attn2") == \
        "down_blocks__1__attentions__0__transformer_blocks__0__attn2"


def test_without_guidance_and_with_several_images_per_prompt(sd_pipe, sd_characters):
    """No unconditional half (guidance 1) and two images: every row is routed on its own."""
    one = story(sd_pipe, sd_characters[:2], guidance_scale=1.0, return_routing=True)
    assert one.routing_maps.shape == (1, 3, 32, 32)
    torch.testing.assert_close(one.routing_maps.sum(dim=1), torch.ones(1, 32, 32))
    two = story(sd_pipe, sd_characters[:2], num_images_per_prompt=2, return_routing=True)
    assert two.images.shape == (2, 32, 32, 3) and two.routing_maps.shape == (2, 3, 32, 32)
    # Each image from its own noise, routed on its own: the two differ in pixels and in maps.
    assert np.abs(two.images[0] - two.images[1]).max() > 1e-3
    assert (two.routing_maps[0] - two.routing_maps[1]).abs().max() > 1e-3
    single = story(sd_pipe, sd_characters[:2], return_routing=True)
    np.testing.assert_allclose(two.images[0], single.images[0], atol=1e-4)  # the first noise is the same
    torch.testing.assert_close(two.routing_maps[0], single.routing_maps[0], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# 3. reference guidance: the unconditional half of classifier-free guidance draws without references


def _guided_unet_call(pipe, characters, reference_guidance: bool, one_hot: bool) -> torch.Tensor:
    """One UNet call on a classifier-free-guidance batch [unconditional; conditional] of the
    same latents, with fixed routes (one-hot thirds: the gathered path; every character
    everywhere: the dense one), so that the references can reach the unconditional half only
    through the self-attention. Returns the two rows' predictions (2, C, h, w)."""
    size = (16, 16)
    inputs = pipe._injection_inputs(characters, None, 1, size, 1.0, 0.5, False, route=not one_hot,
                                    reference_guidance=reference_guidance)
    if one_hot:
        inputs = dataclasses.replace(inputs, fixed_routes=_three_way_routes(size)[0])
    torch.manual_seed(0)
    latents = torch.randn(1, 4, *size).repeat(2, 1, 1, 1)
    text = torch.randn(2, 7, 32)
    with torch.no_grad(), installed(pipe) as unet:
        return unet(latents, 500, encoder_hidden_states=text,
                    cross_attention_kwargs={"anystory": AnyStoryContext(inputs)}).sample


@pytest.mark.parametrize("one_hot", [True, False], ids=["gathered", "dense"])
@pytest.mark.parametrize("reference_guidance", [True, False])
def test_reference_guidance_keeps_references_out_of_the_unconditional_half(sd_pipe, sd_characters,
                                                                            reference_guidance, one_hot):
    first, second = sd_characters[:2]
    torch.manual_seed(3)
    other = dataclasses.replace(second, reference_features={k: torch.randn_like(v)
                                                            for k, v in second.reference_features.items()})
    before = _guided_unet_call(sd_pipe, [first, second], reference_guidance, one_hot)
    after = _guided_unet_call(sd_pipe, [first, other], reference_guidance, one_hot)
    assert not torch.allclose(before[1], after[1]), "the conditional half must see the references"
    unconditional_change = (before[0] - after[0]).abs().max().item()
    if not reference_guidance:
        assert unconditional_change > 1e-3
    elif one_hot:
        assert unconditional_change == 0.0
    else:  # masked keys in one softmax: the fused kernel's rounding, not the references
        assert unconditional_change < 1e-5


def test_reference_guidance_changes_nothing_without_guidance(sd_pipe, sd_characters):
    """Guidance 1 has no unconditional half: the setting has nothing to act on."""
    with_it = story(sd_pipe, sd_characters[:2], guidance_scale=1.0, reference_guidance=True).images
    without = story(sd_pipe, sd_characters[:2], guidance_scale=1.0, reference_guidance=False).images
    assert np.array_equal(with_it, without)
    guided = [story(sd_pipe, sd_characters[:2], reference_guidance=flag).images for flag in (True, False)]
    assert not np.array_equal(*guided)
