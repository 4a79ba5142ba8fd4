"""Cost of one denoising step with 1, 2 and 3 characters, relative to the plain pipeline.

Everything runs in one process on the same small SDXL-shaped UNet (random weights; the cost does
not depend on the values), interleaved round by round so that machine noise hits every
configuration alike. A step is the time between two consecutive step-end callbacks of the
diffusers pipeline (UNet with classifier-free guidance + scheduler). Peak memory is the peak
resident set size *during generation* (the high-water mark is reset after the model is built and
the characters are encoded), measured per configuration in a fresh subprocess.

    python benchmarks/step_overhead.py            # prints JSON
    python benchmarks/step_overhead.py --rounds 5 --steps 6

Two clocks, both interleaved: wall time on 2 threads (what a user waits for) and the main thread's
CPU time on 1 thread (the same work, but insensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from anystory_cli import testing as tiny
from anystory_cli.sd.pipeline import AnyStoryPipeline

LATENT = 64  # 512x512 images through a factor-8 VAE
REFERENCE = 256  # references at half the target size, as in the paper (512 vs 1024)


def small_sdxl():
    """An SDXL-shaped pipeline: no attention at the first level, 1/2/4 transformer layers."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = tiny.tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256), norm_num_groups=32, attention_head_dim=(2, 4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny.tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(tiny.tiny_text_config(tokenizer, projection=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=tiny.tiny_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    encoder = tiny.tiny_image_encoder()
    adapter = tiny.tiny_adapter(unet, encoder, reference_size=REFERENCE, num_subject_tokens=64)
    return AnyStoryPipeline.from_pipe(pipe, encoder, adapter)


def step_times(pipe, characters, steps, clock=time.perf_counter):
    stamps = []

    def on_step_end(_pipe, _step, _t, kwargs):
        stamps.append(clock())
        return kwargs

    kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end)
    if characters is None:
        pipe.base("two characters on a hill", **kwargs)
    else:
        pipe("two characters on a hill", characters=characters, **kwargs)
    return [b - a for a, b in zip(stamps, stamps[1:])]


CONFIGS = {"plain": None, "1 character": 1, "2 characters": 2, "3 characters": 3}


def characters_for(pipe, count):
    if count is None:
        return None
    colours = [(220, 40, 40), (40, 40, 220), (40, 200, 40)]
    return [pipe.encode_character(tiny.sprite(c, size=96, seed=i)) for i, c in enumerate(colours[:count])]


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # Linux: "5" resets VmHWM to the current RSS
        refs.write("5")


def peak_memory(config: str, steps: int) -> float:
    """Peak RSS in MiB while a fresh process generates with `config` (model loading excluded)."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", config, "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)

    pipe = small_sdxl()
    if args.memory_of:
        characters = characters_for(pipe, CONFIGS[args.memory_of])
        _reset_peak_rss()
        step_times(pipe, characters, args.steps)
        print(_peak_rss_mib())
        return

    characters = {name: characters_for(pipe, count) for name, count in CONFIGS.items()}
    report = {
        "unet": "SDXL-shaped, blocks (64, 128, 256), transformer layers (1, 2, 4), latents 64x64, CFG",
        "reference_latents": REFERENCE // 8,
        # Wall time on 2 threads is what a user waits; the main thread's CPU time on 1 thread is
        # the same work measured without the noise of other processes on a shared machine.
        "wall_clock_2_threads": measure(pipe, characters, args, threads=2, clock=time.perf_counter),
        "cpu_time_1_thread": measure(pipe, characters, args, threads=1, clock=time.thread_time),
        "peak_rss_during_generation_mib": {name: round(peak_memory(name, 2)) for name in CONFIGS},
    }
    print(json.dumps(report, indent=2))


def measure(pipe, characters, args, threads, clock):
    """Median step time per configuration, interleaved round by round; ratios to plain."""
    torch.set_num_threads(threads)
    step_times(pipe, characters["plain"], 2, clock)  # warm-up
    samples = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            samples[name] += step_times(pipe, characters[name], args.steps, clock)
    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "steps_measured": len(samples["plain"]),
        "plain_step_s": round(median["plain"], 4),
        "step_ratio": {name: round(median[name] / median["plain"], 3) for name in CONFIGS if name != "plain"},
    }


if __name__ == "__main__":
    main()
