"""Cost of an AnyStory FLUX step with 1, 2 and 3 characters against a plain FLUX step, and of
this package's step against the released AnyStory code's, in one process on one small FLUX.

The model is random (the cost does not depend on the values) and built by the reference folder's
tiny_flux.py with more and wider blocks than the test fixture. Token counts keep FLUX.1-dev's
proportions at a quarter of the length: a 256 px image (256 image tokens) against a 512 px one,
128 T5 tokens against 512, references at the image's size (256 tokens per character).

Each configuration draws one image (`output_type="latent"`); its time runs from the prompt to the
final latents: prompt encoding, the reference pass (ours) or the reference stream's cached step
(released), every transformer step and the scheduler. Characters are encoded once beforehand for
both. The app's defaults: one character without the router and the reference from the first
step; two or more with the router and the reference from 9% of the schedule. Configurations run
interleaved, round by round, on one thread; the JSON reports per configuration the median over
rounds of wall and CPU seconds per step.

    python benchmarks/flux_step_overhead.py                      # prints JSON
    python benchmarks/flux_step_overhead.py --rounds 5 --steps 10 --double 4 --single 8 --heads 8

The released code's half needs reference/ (tiny_flux.py and anystory-flux/) beside the project, or
--reference DIR; without it only this package's numbers are printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PROMPT = "a red ball and a blue ball and a green ball play in a park."
SUBJECTS = [((200, 40, 40), (18, 10, 78, 90)), ((40, 60, 200), (8, 20, 88, 80)), ((40, 180, 60), (20, 20, 76, 76))]


def load_tiny_flux(reference: Path):
    spec = importlib.util.spec_from_file_location("tiny_flux_reference", reference / "tiny_flux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def app_options(count: int) -> dict:
    return {"router": count >= 2, "reference_window": (0.0 if count <= 1 else 0.09, 1.0)}


def clocked(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="image and reference side in pixels")
    parser.add_argument("--max-sequence-length", type=int, default=128)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 16 channels each")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if not (args.reference / "tiny_flux.py").is_file():
        sys.exit(f"{args.reference}: tiny_flux.py not found (it builds the model); pass --reference DIR")
    tiny_flux = load_tiny_flux(args.reference)
    tiny_flux.HEADS = args.heads  # wider than the fixture: width = heads * 16
    released_available = (args.reference / "anystory-flux" / "anystory").is_dir()

    from diffusers import FluxPipeline

    from anystory_cli.flux import AnyStoryFluxPipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_flux.build(Path(tmp), double_blocks=args.double, single_blocks=args.single)
        ours = AnyStoryFluxPipeline.from_pretrained(root / "flux", redux=root / "redux",
                                                    adapter=root / "anystory_flux.bin", reference_size=args.size,
                                                    device="cpu")
        plain = FluxPipeline.from_pretrained(str(root / "flux"))
        plain.set_progress_bar_config(disable=True)
        released = tiny_flux.load_official(root, reference_size=args.size) if released_available else None

    subjects = [tiny_flux.subject(color, box) for color, box in SUBJECTS]
    g = torch.Generator().manual_seed(0)
    characters = [ours.encode_character(image, mask=mask, generator=g) for image, mask in subjects]
    common = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": 3.5,
              "output_type": "latent", "max_sequence_length": args.max_sequence_length}

    runs = {"plain": lambda: plain(PROMPT, generator=torch.Generator().manual_seed(0), **common)}
    def ours_run(count):
        return lambda: ours(PROMPT, characters=characters[:count], generator=torch.Generator().manual_seed(0),
                            **common, **app_options(count))

    for count in (1, 2, 3):
        runs[f"ours_{count}"] = ours_run(count)

    if released is not None:
        from anystory.generate import generate as released_generate
        released_conditions = {}
        for count in (1, 2, 3):
            router = count >= 2
            redux, refs, routers, masks = [], [], [], []
            for image, mask in subjects[:count]:
                (redux_c, router_c) = released.encode_redux_maybe_with_router_condition(image, mask, router)
                ref_c, ref_mask = released.encode_ref_condition(image, mask)
                redux.append(redux_c)
                refs.append(ref_c)
                masks.append(ref_mask)
                if router:
                    routers.append(router_c)
            released_conditions[count] = (redux, refs, routers, torch.cat(masks, dim=1))

        def released_run(count):
            redux, refs, routers, mask = released_conditions[count]
            flux = released.flux_pipeline

            def run():
                prompt_embeds, pooled, _ = flux.encode_prompt(PROMPT, prompt_2=None,
                                                              max_sequence_length=args.max_sequence_length)
                released_generate(
                    flux, redux_conditions=redux, ref_conditions=refs, router_conditions=routers, redux_scale=0.6,
                    redux_start_at=0.1, redux_end_at=0.3, ref_shift=0.0, ref_mask=mask,
                    ref_start_at=app_options(count)["reference_window"][0], ref_end_at=1.0, enable_ref_cache=True,
                    prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                    generator=torch.Generator().manual_seed(0), **common)
                for processor in flux.transformer.attn_processors.values():
                    processor.ref_bank = {}
            return run

        for count in (1, 2, 3):
            runs[f"released_{count}"] = released_run(count)

    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(clocked(run))

    def per_step(name, clock):
        return statistics.median(t[clock] for t in times[name]) / args.steps

    result = {
        "config": {"double_blocks": args.double, "single_blocks": args.single, "width": args.heads * 16,
                   "image_px": args.size, "reference_px": args.size,
                   "image_tokens": (args.size // 16) ** 2, "reference_tokens_per_character": (args.size // 16) ** 2,
                   "text_tokens": args.max_sequence_length, "steps": args.steps, "rounds": args.rounds,
                   "threads": 1, "torch": torch.__version__},
        "seconds_per_step": {name: {"wall": round(per_step(name, 0), 4), "cpu": round(per_step(name, 1), 4)}
                             for name in runs},
    }
    cpu = {name: per_step(name, 1) for name in runs}
    result["ours_vs_plain"] = {f"{n}_characters": round(cpu[f"ours_{n}"] / cpu["plain"], 3) for n in (1, 2, 3)}
    if released is not None:
        result["ours_vs_released"] = {f"{n}_characters": round(cpu[f"ours_{n}"] / cpu[f"released_{n}"], 3)
                                      for n in (1, 2, 3)}
        result["released_vs_plain"] = {f"{n}_characters": round(cpu[f"released_{n}"] / cpu["plain"], 3)
                                       for n in (1, 2, 3)}
    result["note"] = "ratios from CPU time per step (medians over rounds); below 1 in ours_vs_released: faster"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
