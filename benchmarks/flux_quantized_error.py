"""How far quantized FLUX transformers draw from the full-precision one, with and without
characters, on the tiny FLUX fixture (tests/data/flux_tiny) on a CPU.

The reference is AnyStoryFluxPipeline in float32. Each variant replaces only the transformer's
weights: torchao int8 weight-only (through `quantization_config`, diffusers' quant_mapping form)
and GGUF files written from the same weights with the `gguf` package (Q8_0, Q5_0, Q4_0: the
types `gguf.quants.quantize` writes in blocks of 32, which the fixture's 32-wide rows allow; the
K-quants need rows of 256). Compute stays float32. Each variant encodes its own characters (the
reference pass runs through its transformer, so its keys and values differ too) and draws the
same prompt and seeds as the reference; reported per variant and case: the final latents'
relative error (||x - x_ref|| / ||x_ref||) and the drawn images' mean and max absolute pixel
difference (of 255), the mean over seeds and the worst seed; with characters, also how well the
variant keeps what the characters change (the relative error of the latents' change from the
no-character image, against float32's change); and how many layers each AnyStory LoRA landed on,
and how many of those on quantized weights.

    python benchmarks/flux_quantized_error.py                    # JSON on stdout, a table on stderr
    python benchmarks/flux_quantized_error.py --out /tmp/q --seeds 0 1 2 3   # + a PNG per variant

The PNGs hold, per seed, the image without characters and with two, at 4x (nearest) to look at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "flux_tiny"
MODEL = FIXTURE / "model"
PROMPT = "a red ball and a blue ball play in a park."
GGUF_TYPES = ("Q8_0", "Q5_0", "Q4_0")


def subjects():
    from PIL import Image

    cases = json.loads((FIXTURE / "cases.json").read_text())
    return [(Image.open(FIXTURE / f["image"]), Image.open(FIXTURE / f["mask"])) for f in cases["subjects"].values()]


def load(variant: str, folder: Path):
    from anystory_cli.flux import AnyStoryFluxPipeline

    options = dict(redux=MODEL / "redux", adapter=MODEL / "anystory_flux.bin", reference_size=64, device="cpu",
                   torch_dtype=torch.float32)
    if variant == "torchao int8":
        from diffusers import PipelineQuantizationConfig, TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        options["quantization_config"] = PipelineQuantizationConfig(
            quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    elif variant.startswith("GGUF "):
        from anystory_cli.flux.memory_apply import load_gguf_transformer
        from anystory_cli.testing import write_gguf_transformer

        path = folder / f"flux-tiny-{variant[5:]}.gguf"
        write_gguf_transformer(MODEL / "flux", path, variant[5:])
        options["transformer"] = load_gguf_transformer(path, MODEL / "flux", dtype=torch.float32)
    return AnyStoryFluxPipeline.from_pretrained(MODEL / "flux", **options)


def quantized_lora_layers(pipe) -> int:
    """Layers that carry a LoRA on a base layer whose weight is not a plain float tensor."""
    return sum(1 for m in pipe.transformer.modules()
               if hasattr(m, "lora_A") and type(m.base_layer.weight) is not torch.nn.Parameter)


def draw(pipe, seed: int, with_characters: bool, steps: int, size: int):
    cast = []
    if with_characters:
        generator = torch.Generator().manual_seed(seed)
        cast = [pipe.encode_character(image, mask, generator=generator) for image, mask in subjects()]
    options = dict(characters=cast, num_inference_steps=steps, height=size, width=size, guidance_scale=3.5)
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", **options).images
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pil", **options).images[0]
    return latents, np.asarray(image.convert("RGB"), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write a PNG per variant here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = ["float32", "torchao int8", *(f"GGUF {t}" for t in GGUF_TYPES)]
    drawn, landed, quantized = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in variants:
            pipe = load(variant, Path(folder))
            landed[variant], quantized[variant] = dict(pipe.lora_layers), quantized_lora_layers(pipe)
            drawn[variant] = {(seed, chars): draw(pipe, seed, chars, args.steps, args.size)
                              for seed in args.seeds for chars in (False, True)}
            print(f"{variant}: drawn", file=sys.stderr)

    rows = []
    for variant in variants[1:]:
        for chars in (False, True):
            errors, means, maxes = [], [], []
            for seed in args.seeds:
                (latents, image), (ref_latents, ref_image) = drawn[variant][seed, chars], drawn["float32"][seed, chars]
                errors.append(((latents - ref_latents).norm() / ref_latents.norm()).item())
                difference = np.abs(image - ref_image)
                means.append(float(difference.mean()))
                maxes.append(float(difference.max()))
            row = {}
            if chars:  # what the characters change in the latents, and how well the variant keeps it
                effects, kept = [], []
                for seed in args.seeds:
                    ref = drawn["float32"][seed, True][0] - drawn["float32"][seed, False][0]
                    ours = drawn[variant][seed, True][0] - drawn[variant][seed, False][0]
                    effects.append((ref.norm() / drawn["float32"][seed, False][0].norm()).item())
                    kept.append(((ours - ref).norm() / ref.norm()).item())
                row = {"character_effect": float(np.mean(effects)),
                       "character_effect_error": {"mean": float(np.mean(kept)), "max": max(kept)}}
            rows.append({**row, "variant": variant, "characters": 2 if chars else 0,
                         "latent_relative_error": {"mean": float(np.mean(errors)), "max": max(errors)},
                         "pixel_difference_mean": {"mean": float(np.mean(means)), "max": max(means)},
                         "pixel_difference_max": {"mean": float(np.mean(maxes)), "max": max(maxes)},
                         "lora_layers": landed[variant], "lora_layers_on_quantized_weights": quantized[variant]})
    if args.out is not None:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            tiles = [np.concatenate([drawn[variant][seed, c][1] for c in (False, True)], 1) for seed in args.seeds]
            grid = Image.fromarray(np.concatenate(tiles, 0).astype(np.uint8))
            grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(
                args.out / f"{variant.replace(' ', '-').lower()}.png")
    print(json.dumps({"seeds": args.seeds, "steps": args.steps, "size": args.size, "threads": args.threads,
                      "reference_lora_layers": landed["float32"], "rows": rows}, indent=2))
    print("| transformer | characters | latents' relative error | mean pixel difference | max pixel difference "
          "| characters' effect kept (error) |\n|---|---|---|---|---|---|", file=sys.stderr)
    for row in rows:
        effect = (f"{100 * row['character_effect_error']['mean']:.1f} % (worst "
                  f"{100 * row['character_effect_error']['max']:.1f} %)" if "character_effect" in row else "")
        print(f"| {row['variant']} | {row['characters']} | {100 * row['latent_relative_error']['mean']:.2f} % "
              f"(worst {100 * row['latent_relative_error']['max']:.2f} %) | "
              f"{row['pixel_difference_mean']['mean']:.2f} (worst {row['pixel_difference_mean']['max']:.2f}) | "
              f"{row['pixel_difference_max']['mean']:.1f} (worst {row['pixel_difference_max']['max']:.0f}) | "
              f"{effect} |", file=sys.stderr)
    effect = [r["character_effect"] for r in rows if "character_effect" in r][0]
    print(f"the characters move float32's final latents by {100 * effect:.2f} % of their norm", file=sys.stderr)


if __name__ == "__main__":
    main()
