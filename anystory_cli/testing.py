"""Tiny real models for tests and benchmarks: random, offline, built in milliseconds.

Real diffusers and transformers classes (an SD-1.5- and an SDXL-shaped pipeline, a CLIP image
encoder, an AnyStory adapter, an `AnyStoryPipeline` over them) from small configs, so a test or a
benchmark runs the same code as a user on SDXL, only with small weights. Nothing is downloaded:
the tokenizer is built in memory.

    from anystory_cli import testing
    pipe = testing.tiny_story_pipeline()              # AnyStoryPipeline over a tiny SD 1.5
    mira = pipe.encode_character(testing.sprite((220, 40, 40)), name="mira")
"""

from __future__ import annotations

import torch


def tiny_tokenizer():
    """A real CLIPTokenizer built offline: one token per printable ASCII character, no merges.
    The end-of-text token gets the largest id (CLIPTextModel pools at argmax(input_ids))."""
    import string

    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    assert len(tokenizer) == len(vocab), "tokenizer did not take its vocabulary"
    return tokenizer


def tiny_text_config(tokenizer, hidden=32, projection=None):
    """A small CLIPTextConfig that fits `tokenizer` (its special tokens' ids included)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_unet(cross_attention_dim=32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
    )


def tiny_sd_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(tokenizer)), tokenizer=tokenizer,
        unet=tiny_sd_unet(), scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_sdxl_unet(), scheduler=tiny_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )).eval()


TINY_ADAPTER_OPTIONS = dict(
    image_size=32, num_subject_tokens=4, qformer_hidden_dim=32, qformer_heads=4,
    routing_dim=32, router_hidden_dim=16, reference_size=32,
)


def tiny_adapter(unet, image_encoder, seed: int = 0, **options):
    from anystory_cli.sd.adapter import AnyStoryAdapter

    torch.manual_seed(seed)
    return AnyStoryAdapter.from_unet(unet, image_encoder.config.hidden_size, **{**TINY_ADAPTER_OPTIONS, **options})


def sprite(color=(220, 40, 40), size=48, seed=0):
    """An RGBA reference: a coloured blob with a pattern on a transparent background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inside = ((yy - size / 2) ** 2 / (size / 2.5) ** 2 + (xx - size / 2) ** 2 / (size / 3) ** 2) < 1
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = np.array(color, np.uint8)
    rgba[..., :3][(yy // 4) % 2 == 0] = rng.integers(0, 255, 3, dtype=np.uint8)
    rgba[..., 3] = inside * 255
    return Image.fromarray(rgba, "RGBA")


def tiny_story_pipeline(base=None):
    """A tiny real AnyStoryPipeline over `base` (default: the SD-1.5-shaped tiny pipeline)."""
    from anystory_cli.sd.pipeline import AnyStoryPipeline

    base = base if base is not None else tiny_sd_pipeline()
    encoder = tiny_image_encoder()
    return AnyStoryPipeline.from_pipe(base, encoder, tiny_adapter(base.unet, encoder))


def write_gguf_transformer(flux_folder, path, quant_type: str = "Q8_0") -> None:
    """A FLUX folder's transformer as a GGUF file, as the `gguf` package writes one: 2-D weights
    whose rows are multiples of 32 as `quant_type` (a type `gguf.quants.quantize` writes in blocks
    of 32: Q8_0, Q5_0, Q4_0, ...), the rest F32, under diffusers' own names."""
    import gguf
    import numpy as np
    from diffusers import FluxTransformer2DModel

    kind = gguf.GGMLQuantizationType[quant_type]
    transformer = FluxTransformer2DModel.from_pretrained(str(flux_folder), subfolder="transformer")
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in transformer.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
