"""Seconds per training step (forward + backward + AdamW) of candidate base-model sizes, 1 thread.

    nice -n 10 python benchmarks/base_step_times.py vae|unet|clip
Used to size the recipes under recipes/ (docs/default-model.md has the numbers).
"""

from __future__ import annotations

import sys
import time

import torch

from anystory_cli.lab.world import vocabulary
from anystory_cli.default_model import (
    TextConfig, UNetConfig, VaeConfig, VisionConfig, build_clip, build_tokenizer, build_unet, build_vae,
)


def step_time(model, loss_fn, steps: int = 4) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps  # the first step warms up allocators


def params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def vae(batch: int = 16):
    x = torch.randn(batch, 3, 64, 64)
    for blocks, layers, latent in [((32, 64, 64), 1, 8), ((32, 64, 64), 2, 8), ((48, 96, 96), 1, 8), ((64, 128, 128), 1, 8)]:
        model = build_vae(VaeConfig(block_out_channels=blocks, layers_per_block=layers, latent_channels=latent))
        fn = lambda: (model(x).sample - x).abs().mean()
        print(f"vae {blocks} lpb={layers} z={latent}: {params(model):.2f} M, batch {batch}: {step_time(model, fn):.2f} s", flush=True)


def unet(batch: int = 32):
    text = TextConfig()
    vae_cfg = VaeConfig()
    x = torch.randn(batch, vae_cfg.latent_channels, 16, 16)
    context = torch.randn(batch, 77, text.hidden_size)
    t = torch.randint(0, 1000, (batch,))
    candidates = [
        UNetConfig((64, 128, 128), 1, 32, (True, True, True)),
        UNetConfig((64, 128, 128), 1, 32, (False, True, True)),
        UNetConfig((64, 128, 192), 2, 32, (False, True, True)),
        UNetConfig((96, 192, 192), 1, 32, (False, True, True)),
        UNetConfig((96, 192, 256), 2, 32, (False, True, True)),
    ]
    for cfg in candidates:
        model = build_unet(cfg, vae_cfg, text)
        fn = lambda: (model(x, t, context).sample - x).pow(2).mean()
        print(f"unet {cfg}: {params(model):.2f} M, batch {batch}: {step_time(model, fn):.2f} s", flush=True)


def clip(batch: int = 64):
    tokenizer = build_tokenizer(vocabulary())
    ids = torch.randint(0, len(tokenizer) - 2, (batch, 40))
    images = torch.randn(batch, 3, 64, 64)
    for hidden, layers in [(128, 4), (192, 6)]:
        text = TextConfig(hidden, hidden * 4, layers, 4, 128)
        vision = VisionConfig(64, 8, hidden, hidden * 4, layers, 4, 128)
        model = build_clip(text, vision, tokenizer)
        fn = lambda: (model.text_projection(model.text_model(input_ids=ids).pooler_output).mean()
                      + model.visual_projection(model.vision_model(pixel_values=torch.cat([images, images])).pooler_output).mean())
        print(f"clip hidden={hidden} layers={layers}: {params(model):.2f} M, batch {batch} captions + {2 * batch} images: {step_time(model, fn):.2f} s", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    {"vae": vae, "unet": unet, "clip": clip}[sys.argv[1]]()
