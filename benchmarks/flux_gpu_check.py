"""The memory plans on a lent GPU, in under 10 minutes: writes $OUT/flux_gpu_check.json.

1. Tiny FLUX (tests/data/flux_tiny) drawn through diffusers' FluxPipeline in bf16 and with each
   quantization (torchao int8 weight-only, bitsandbytes NF4 and LLM.int8, a GGUF Q8_0 transformer
   written here): final latents' relative error against bf16, and the seconds per call.
2. The real-width slice of benchmarks/flux_memory.py under each plan that fits on one card (bf16,
   torchao int8, NF4; model offload): torch.cuda.max_memory_allocated of one step with 0, 1 and 2
   characters at 512 and 1024 px against the ledger, and the seconds per denoising step (a 3-step
   call minus a 1-step call, over 2), which give the plans' relative step times.
3. FLUX.1's VAE decoder at 512 and 1024 px (random weights): its peak against the ledger's.
4. Placement on the slice (bf16, 2 characters, 512 and 1024 px): the text encoders leaving before
   the first denoising step (plan bf16 against bf16-text-off: the bytes allocated when the first
   transformer call starts, where the text encoders are then, the call's peak, equal latents), and
   the reference K/V cache on the CPU under model offload (where the cache is stored, pinned or
   not, the call's peak against the cache kept on the GPU, equal latents).

Each part records its own failure and the script goes on. --dry runs the same code on the CPU
with small sizes, to check the script itself before spending GPU time:

    OUT=/tmp/out python benchmarks/flux_gpu_check.py --dry
    python benchmarks/flux_gpu_check.py               # on the GPU machine; $OUT gets the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import flux_memory  # noqa: E402

from anystory_cli.flux import memory  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "flux_tiny" / "model" / "flux"
Q = memory.QUANTIZATIONS


def recorded(results: dict, name: str, fn):
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a check script reports every failure and goes on
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "traceback": traceback.format_exc(limit=4)}
    results[name + "_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {json.dumps(results[name])[:300]}", file=sys.stderr, flush=True)


class Device:
    def __init__(self, dry: bool):
        import torch
        self.torch = torch
        self.name = "cpu" if dry else "cuda"
        if not dry and not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry to check the script on a CPU")

    def sync(self):
        if self.name == "cuda":
            self.torch.cuda.synchronize()

    def peak_of(self, fn) -> int:
        """The allocator's peak during fn, above what was allocated before it."""
        torch = self.torch
        if self.name == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        peak, _ = flux_memory.allocation_peak(fn, [])
        return peak

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated() if self.name == "cuda" else 0


def tiny_renders(device: Device, tmp: Path) -> dict:
    """Part 1: the fixture through each quantization; errors against bf16."""
    torch = device.torch
    from diffusers import FluxPipeline

    from anystory_cli.flux import memory_apply

    dtype = torch.bfloat16
    call = dict(num_inference_steps=4, height=64, width=64, output_type="latent", max_sequence_length=32)

    def draw(pipe):
        start = time.perf_counter()
        out = pipe("a red ball in a park", generator=torch.Generator().manual_seed(0), **call).images
        device.sync()
        return out.float().cpu(), time.perf_counter() - start

    reference, seconds = draw(FluxPipeline.from_pretrained(str(FIXTURE), dtype=dtype).to(device.name))
    results = {"bf16": {"seconds": round(seconds, 3)}}
    quantizations = ["int8", "gguf-q8"] + ([] if device.name == "cpu" else ["nf4", "bnb-int8"])
    for name in quantizations:
        def one(name=name):
            plan = memory.Plan(name, Q[name], Q["bf16"], "none", 1.0)
            transformer = None
            if Q[name].backend == "gguf":
                from anystory_cli.testing import write_gguf_transformer
                write_gguf_transformer(FIXTURE, tmp / "tiny-Q8_0.gguf")
                transformer = memory_apply.load_gguf_transformer(tmp / "tiny-Q8_0.gguf", FIXTURE, dtype=dtype)
            pipe = memory_apply.load_flux_pipeline(FIXTURE, plan, dtype=dtype, transformer=transformer)
            latents, seconds = draw(pipe)
            return {"relative_error": round(((latents - reference).norm() / reference.norm()).item(), 5),
                    "seconds": round(seconds, 3)}
        recorded(results, name, one)
    return results


def slice_plans(device: Device, root: Path, cases, modes) -> dict:
    """Part 2: the slice's peaks and step times per plan."""
    torch = device.torch
    from anystory_cli.flux.reference import prepare_reference

    results = {}
    for mode, offload in modes:
        def one(mode=mode, offload=offload):
            pipe = flux_memory.load_pipeline(root, mode, device="cpu" if offload else device.name,
                                             reference_size=flux_memory.SLICE.reference_size)
            if offload:
                pipe.enable_model_cpu_offload()
            g = torch.Generator().manual_seed(0)
            characters = [pipe.encode_character(*prepare_reference(*flux_memory._subject(c, b)), generator=g)
                          for c, b in flux_memory.SUBJECTS[:2]]
            rows = []
            for size, count in cases:
                def call(steps, size=size, count=count):
                    with torch.no_grad():
                        pipe(flux_memory.PROMPT, characters=characters[:count], num_inference_steps=steps,
                             height=size, width=size, output_type="latent", redux_window=(0.0, 1.0),
                             reference_window=(0.0, 1.0), router=count >= 2, max_sequence_length=512,
                             generator=torch.Generator().manual_seed(0))
                resident = device.allocated()
                peak = device.peak_of(lambda: call(1))
                timings = {}
                for steps in (1, 3):
                    start = time.perf_counter()
                    call(steps)
                    device.sync()
                    timings[steps] = time.perf_counter() - start
                plan = memory.slice_plan(Q[mode])
                ledger = memory.denoising_peak(flux_memory.SLICE, plan, memory.Workload(size, count), other_bytes=0)
                ledger_call = ledger - memory.transformer_bytes(flux_memory.SLICE, Q[mode]) - 2 * (
                    flux_memory.SLICE.embedder_params())
                rows.append({"size": size, "characters": count, "resident_bytes": resident, "call_peak_bytes": peak,
                             "ledger_call_bytes": int(ledger_call),
                             "step_seconds": round((timings[3] - timings[1]) / 2, 4)})
            return rows
        recorded(results, f"{mode}{'-offload' if offload else ''}", one)
    return results


def vae_decode(device: Device, sizes) -> dict:
    torch = device.torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False).to(device.name, torch.bfloat16).eval()
    rows = []
    for size in sizes:
        latent = torch.randn(1, 16, size // 8, size // 8, dtype=torch.bfloat16, device=device.name)

        def decode():
            with torch.no_grad():
                vae.decode(latent)
        rows.append({"size": size, "peak_bytes": device.peak_of(decode),
                     "ledger_bytes": int(memory.decode_bytes(size, tiling=False))})
    return rows


def placement_checks(device: Device, root: Path, cases) -> dict:
    """Part 4: the text encoders' and the reference cache's placement, each against its default."""
    import gc

    torch = device.torch
    from anystory_cli.flux.memory_apply import apply_plan
    from anystory_cli.flux.reference import prepare_reference

    def loaded(plan_name):
        pipe = flux_memory.load_pipeline(root, "bf16", device="cpu", reference_size=flux_memory.SLICE.reference_size)
        plan = memory.PLAN_NAMES[plan_name]
        if plan.offload != "none" and device.name == "cpu":  # the dry run: offloading needs CUDA
            pipe.to("cpu")
            pipe.reference_kv_device = "cpu"
        else:
            apply_plan(pipe, plan, device.name)
        g = torch.Generator().manual_seed(0)
        characters = [pipe.encode_character(*prepare_reference(*flux_memory._subject(c, b)), generator=g)
                      for c, b in flux_memory.SUBJECTS[:2]]
        return pipe, characters

    def draw(pipe, characters, size, count) -> dict:
        seen: dict = {}
        made = pipe._reference_pass

        def recording(*args, **kwargs):
            capture = made(*args, **kwargs)
            first = next(iter(capture.kv.values()))[0]
            seen["kv_device"], seen["kv_pinned"] = str(first.device), bool(first.is_pinned())
            return capture

        def first_call(_module, _args):
            if "allocated_at_first_transformer_call" not in seen:
                seen["allocated_at_first_transformer_call"] = device.allocated()
                seen["text_encoders_at_first_transformer_call"] = [str(pipe.text_encoder.device),
                                                                   str(pipe.text_encoder_2.device)]
        pipe._reference_pass = recording
        handle = pipe.transformer.register_forward_pre_hook(first_call)
        out = {}

        def call():
            with torch.no_grad():
                out["latents"] = pipe(flux_memory.PROMPT, characters=characters[:count], num_inference_steps=2,
                                      height=size, width=size, output_type="latent", max_sequence_length=512,
                                      generator=torch.Generator().manual_seed(0)).images.float().cpu()
        try:
            before = device.allocated()
            seen["call_peak_bytes"] = before + device.peak_of(call)
        finally:
            handle.remove()
            del pipe._reference_pass
        return {**seen, "latents": out["latents"]}

    def released():
        gc.collect()
        if device.name == "cuda":
            torch.cuda.empty_cache()

    results = {}
    drawn: dict = {}  # (size, count) -> plan -> what it drew; one pipeline on the device at a time
    for plan_name in ("bf16", "bf16-text-off"):
        pipe, characters = loaded(plan_name)
        results["text_encoder_bytes"] = flux_memory.resident_bytes([pipe.text_encoder, pipe.text_encoder_2])
        for size, count in cases:
            drawn.setdefault((size, count), {})[plan_name] = draw(pipe, characters, size, count)
        del pipe, characters
        released()
    rows = []
    for (size, count), plans in drawn.items():
        latents = [p.pop("latents") for p in plans.values()]
        rows.append({"size": size, "characters": count, **plans, "latents_equal": bool(torch.equal(*latents))})
    results["text_encoders"] = rows

    pipe, characters = loaded("bf16-offload")
    rows = []
    for size, count in cases:
        seen = {}
        for where in ("cpu", None):
            pipe.reference_kv_device = where
            seen[f"cache_on_{where or 'device'}"] = draw(pipe, characters, size, count)
        latents = [d.pop("latents") for d in seen.values()]
        rows.append({"size": size, "characters": count, **seen, "latents_equal": bool(torch.equal(*latents)),
                     "ledger_cache_bytes": int(memory.reference_kv_bytes(flux_memory.SLICE, count))})
    results["reference_cache_model_offload"] = rows
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU, small sizes: check the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    device = Device(args.dry)
    torch = device.torch
    results = {"device": torch.cuda.get_device_name() if device.name == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "dry": args.dry}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recorded(results, "tiny_renders", lambda: tiny_renders(device, tmp))
        if args.dry:  # a narrow slice: the same code, seconds on a CPU
            flux_memory.SLICE = memory.FluxShape(heads=2, head_dim=64, double_blocks=1, single_blocks=1,
                                                 siglip_width=16, lora_rank=8, routing_rank=8, embedder_rank=8,
                                                 reference_size=64)
            cases, modes = [(64, 0), (64, 2)], [("bf16", False), ("int8", False)]
        else:
            cases = flux_memory.CASES
            modes = [("bf16", False), ("int8", False), ("nf4", False), ("bf16", True)]
        root = flux_memory.build_slice(tmp / "slice", flux_memory.SLICE)
        results["slice"] = vars(flux_memory.SLICE)
        recorded(results, "slice_plans", lambda: slice_plans(device, root, cases, modes))
        recorded(results, "vae_decode", lambda: vae_decode(device, (64, 128) if args.dry else (512, 1024)))
        recorded(results, "placement", lambda: placement_checks(device, root, [(64, 2)] if args.dry
                                                                  else [(512, 2), (1024, 2)]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "flux_gpu_check.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
