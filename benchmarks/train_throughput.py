"""Training throughput of `anystory train`: samples/second of stage 1 and stage 2, and the cost of
one training step relative to a plain UNet fine-tuning step of the same model and batch.

The model is the default model's architecture (anystory_cli/assets/default configs and
recipes/base_unet.yaml; random weights where none are shipped yet: the cost does not depend on
the values) with the adapter options of recipes/world_stage1.yaml; data are a small world dataset
written to a temporary folder. The three kinds of step run interleaved, round by round, in one
process, so machine noise hits them alike; each number is the median over the rounds.

    python benchmarks/train_throughput.py                 # prints JSON
    python benchmarks/train_throughput.py --rounds 8 --batch 8 --threads 1
    python benchmarks/train_throughput.py --mixed-precision bf16     # CPUs with AVX512-BF16 / AMX

A plain fine-tuning step: VAE-encode the batch, encode the captions, noise, UNet forward,
v-prediction MSE, backward, AdamW over every UNet weight. An AnyStory step adds the CLIP image
encoder, both QFormers and the ReferenceNet on the references, and the injected attention; its
optimizer covers only the stage's parameters (the UNet is frozen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from anystory_cli.train.recipe_files import read_recipe_yaml  # noqa: E402
from anystory_cli.train.loop import (Components, Encoders, SampleStream, _optimizer_step, freeze,  # noqa: E402
                                make_adapter, recipe_from_dict)
from anystory_cli import default_model as B  # noqa: E402
from anystory_cli.lab.world.dataset import write_dataset  # noqa: E402


def default_architecture() -> Components:
    """The default model's parts: shipped weights where they exist, else the configs alone."""
    torch.manual_seed(0)
    tokenizer = B.load_tokenizer()
    vae = B.load_vae()
    text = B.load_text_encoder(tokenizer)
    image_encoder = B.load_image_encoder()
    try:
        unet = B.load_unet()
    except Exception:  # not shipped yet: the recipe's architecture, random weights
        unet_config = B.UNetConfig.from_dict(read_recipe_yaml(ROOT / "recipes" / "base_unet.yaml")["unet"])
        unet = B.build_unet(unet_config, B.read_config("vae"), B.read_config("text_encoder"))
    return Components(B.assemble_pipeline(vae, text, tokenizer, unet), image_encoder)


class PlainStep:
    """A plain UNet fine-tuning step on the same samples (the baseline)."""

    def __init__(self, parts: Components, encoders: Encoders, precision: str):
        from diffusers import DDPMScheduler

        self.unet, self.encoders = parts.pipe.unet, encoders
        self.scheduler = DDPMScheduler.from_config(parts.pipe.scheduler.config)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def __call__(self, samples) -> None:
        self.unet.requires_grad_(True).train()
        generator = torch.Generator().manual_seed(0)
        latents = self.encoders.latents([s.target for s in samples], generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        text, _ = self.encoders.text([s.caption for s in samples])
        with self.autocast:
            pred = self.unet(self.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        F.mse_loss(pred.float(), self.scheduler.get_velocity(latents, noise, t)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.unet.requires_grad_(False).eval()


class StageStep:
    def __init__(self, stage: int, parts: Components, data: Path, batch: int, out: Path, precision: str):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from anystory_cli.sd.adapter import install

        options = read_recipe_yaml(ROOT / "recipes" / "world_stage1.yaml")["adapter_options"]
        self.recipe = recipe_from_dict(dict(stage=stage, data=str(data), output_dir=str(out), steps=10**6,
                                            batch_size=batch, adapter_options=options,
                                            mixed_precision=precision))
        self.parts = parts
        self.adapter = make_adapter(self.recipe, parts)
        self.accelerator = Accelerator(cpu=True, mixed_precision=precision)
        self.encoders = Encoders(parts, self.adapter, torch.device("cpu"))
        self.scheduler = DDPMScheduler.from_config(parts.pipe.scheduler.config)
        self.stream = SampleStream(self.recipe, self.adapter.config.reference_size, 64, 0, 1)
        self.install = install
        self.step = 0

    def __call__(self) -> None:
        params = freeze(self.parts, self.adapter, self.recipe.stage)
        optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-5)
        handle = self.install(self.adapter, self.parts.pipe.unet)
        try:
            _optimizer_step(self.recipe, self.step, self.stream, self.adapter, self.encoders, self.scheduler,
                            optimizer, params, self.accelerator)
        finally:
            handle.remove()
        self.step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="bf16 autocast (all three kinds of step alike)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = {stage: write_dataset(tmp / f"stage{stage}", stage, 64, seed=stage) for stage in (1, 2)}
        parts = default_architecture()
        stages = {stage: StageStep(stage, parts, data[stage], args.batch, tmp / f"out{stage}", args.mixed_precision)
                  for stage in (1, 2)}
        plain = PlainStep(parts, stages[1].encoders, args.mixed_precision)
        plain_batch = stages[1].stream.batch(0)
        runs = {"plain": lambda: plain(plain_batch), "stage1": stages[1], "stage2": stages[2]}
        for run in runs.values():  # warm-up: first calls allocate and pick kernels
            run()
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                began = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - began)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    adapter_params = sum(p.numel() for p in stages[1].adapter.parameters())
    trained = {stage: sum(p.numel() for _, p in freeze(parts, stages[stage].adapter, stage)) for stage in (1, 2)}
    report = {
        "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
        "mixed_precision": args.mixed_precision,
        "unet_parameters": sum(p.numel() for p in parts.pipe.unet.parameters()),
        "adapter_parameters": adapter_params,
        "trained_parameters": {f"stage{s}": n for s, n in trained.items()},
        "seconds_per_step": {k: round(v, 3) for k, v in median.items()},
        "samples_per_second": {k: round(args.batch / v, 2) for k, v in median.items()},
        "step_vs_plain_finetuning": {k: round(v / median["plain"], 2) for k, v in median.items() if k != "plain"},
        "spread": {k: [round(min(v), 3), round(max(v), 3)] for k, v in seconds.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
