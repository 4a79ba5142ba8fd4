"""The tiny builders tests import as `tiny`: they live in anystory_cli.testing (benchmarks use them
too); this module re-exports them and keeps tests offline."""

from __future__ import annotations

import os

from anystory_cli.testing import (  # noqa: F401
    TINY_ADAPTER_OPTIONS,
    sprite,
    tiny_adapter,
    tiny_image_encoder,
    tiny_scheduler,
    tiny_sd_pipeline,
    tiny_sd_unet,
    tiny_sdxl_pipeline,
    tiny_sdxl_unet,
    tiny_story_pipeline,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vae,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_text_config = tiny_text_config  # the name older tests use
