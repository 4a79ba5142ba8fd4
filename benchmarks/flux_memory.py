"""The FLUX memory ledger (`anystory_cli.flux.memory`) against measured peaks, on a real-width
slice of FLUX.1-dev, and the ledger's table for whole FLUX.1-dev on GPUs of 8-80 GB.

The slice: FLUX.1-dev's transformer at its real width (3072 = 24 heads of 128, T5 width 4096,
64 latent channels, CLIP pooled width 768) with one double and one single block, the AnyStory
reference and router LoRAs (rank 128) and routing-map adapters (rank 128) on every target, and
the real token counts: 512 T5 tokens, 81 subject and 9 router tokens per character, 1024 image
tokens at 512 px and 4096 at 1024 px, 1024 reference tokens per character (reference_size 512).
The text encoders, VAE and SigLIP are tiny (their bytes are counted, not modelled): the ledger's
formulas for them are checked against the real configurations' parameter counts in the tests.

Each configuration draws one step through this package's pipeline (`output_type="latent"`,
the subject tokens, reference and router all on in that step, as in the steps of a real run
where their windows overlap) in a fresh process, under torch.profiler with profile_memory=True.
The profiler records every allocation and free of torch's CPU allocator, so the running sum of
its events is what torch.cuda.max_memory_allocated reports on a GPU: the bytes of live tensors,
not the process's RSS (which adds the allocator's cache, the libraries and Python). The measured
peak = the bytes of every weight and buffer held when the call starts + the highest running sum
of allocations during the call.

    python benchmarks/flux_memory.py                 # measured vs ledger, JSON (~10 min on 2 cores)
    python benchmarks/flux_memory.py --table         # the docs/flux.md table, from the ledger only
    python benchmarks/flux_memory.py --timing        # CPU seconds of a step with 0-3 characters at 512 px
    python benchmarks/flux_memory.py --deep          # the reference pass on a 24-block slice (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anystory_cli.flux import memory  # noqa: E402  (torch-free)

FIXTURE = ROOT / "tests" / "data" / "flux_tiny" / "model" / "flux"
SLICE = memory.FluxShape(double_blocks=1, single_blocks=1, siglip_width=16)  # tiny SigLIP
CASES = [(512, 0), (512, 1), (512, 2), (1024, 0), (1024, 1), (1024, 2)]
MODES = ["bf16", "int8"]  # the quantizations that run on a CPU (torchao int8 weight-only)
PROMPT = "a red ball and a blue ball and a green ball play in a park."
SUBJECTS = [((200, 40, 40), (18, 10, 78, 90)), ((40, 60, 200), (8, 20, 88, 80)), ((40, 180, 60), (20, 20, 76, 76))]


# ---------------------------------------------------------------------------------------- the slice
def build_slice(root: Path, shape: memory.FluxShape = SLICE, seed: int = 0) -> Path:
    """Write flux/ (real-width transformer slice, tiny text encoders and VAE), redux/ (tiny SigLIP,
    Redux embedder at T5 width) and anystory_flux.bin (random, the released layout) under root."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines import ReduxImageEncoder
    from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, \
        T5EncoderModel

    from anystory_cli.flux.embedders import SubjectEmbedder
    from anystory_cli.flux.weights import LORA_TARGETS
    from transformers import CLIPTokenizer, T5Tokenizer

    torch.manual_seed(seed)
    siglip_width = 16
    tok = CLIPTokenizer.from_pretrained(FIXTURE / "tokenizer")  # the test fixture's tiny tokenizers
    tok2 = T5Tokenizer.from_pretrained(FIXTURE / "tokenizer_2")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=shape.pooled_dim, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=shape.pooled_dim,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=shape.text_width, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=shape.in_channels // 4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=shape.in_channels, num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks, attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=shape.text_width, pooled_projection_dim=shape.pooled_dim, guidance_embeds=True,
        axes_dims_rope=_rope_axes(shape.head_dim))
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
        shift=3.0, use_dynamic_shifting=True)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                 tokenizer_2=tok2, transformer=transformer).save_pretrained(root / "flux")
    SiglipVisionModel(SiglipVisionConfig(
        hidden_size=siglip_width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=384,
        patch_size=14)).save_pretrained(root / "redux" / "image_encoder")
    ReduxImageEncoder(redux_dim=siglip_width, txt_in_features=shape.text_width).save_pretrained(
        root / "redux" / "image_embedder")

    g = torch.Generator().manual_seed(seed + 1)
    parts = {"ref": {}, "router": {}}
    for name, module in transformer.named_modules():
        for part, pattern in LORA_TARGETS.items():
            if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
                r = shape.lora_rank
                parts[part][f"transformer.{name}.lora_A.weight"] = (
                    torch.randn(r, module.in_features, generator=g) / module.in_features ** 0.5).bfloat16()
                parts[part][f"transformer.{name}.lora_B.weight"] = (
                    torch.randn(module.out_features, r, generator=g) * 1e-3).bfloat16()
    blocks = [f"transformer_blocks.{i}" for i in range(shape.double_blocks)]
    blocks += [f"single_transformer_blocks.{i}" for i in range(shape.single_blocks)]
    r, w = shape.routing_rank, shape.width
    for block in blocks:
        for proj in ("to_q", "to_k"):
            prefix = f"transformer.{block}.attn.processor.{proj}_routing_map_lora_"
            parts["router"][prefix + "A.weight"] = (torch.randn(r, w, generator=g) / w ** 0.5).bfloat16()
            parts["router"][prefix + "B.weight"] = (torch.randn(w, r, generator=g) / r ** 0.5).bfloat16()
            parts["router"][prefix + "B.bias"] = torch.zeros(w, dtype=torch.bfloat16)
    for grid, target, prefix in ((9, "redux", ""), (3, "router", "router_embedder.")):
        embedder = SubjectEmbedder(siglip_width, shape.text_width, lora_rank=shape.embedder_rank, grid=grid)
        state = {prefix + k: v.bfloat16() for k, v in embedder.state_dict().items()}
        if target == "redux":
            parts["redux"] = state
        else:
            parts["router"].update(state)
    torch.save(parts, root / "anystory_flux.bin")
    return root


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    side = 3 * head_dim // 8  # FLUX.1: 16, 56, 56 for 128
    return head_dim - 2 * side, side, side


def load_pipeline(root: Path, mode: str, device: str = "cpu", reference_size: int = 512):
    """AnyStoryFluxPipeline over the slice in bf16, the transformer quantized as `mode` says
    (through diffusers' quantization_config, as a user's load would be)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from anystory_cli.flux import AnyStoryFluxPipeline
    from anystory_cli.flux.memory_apply import transformer_quantization_config

    dtype = torch.bfloat16
    quantization = transformer_quantization_config(memory.QUANTIZATIONS[mode]) if mode != "bf16" else None
    transformer = FluxTransformer2DModel.from_pretrained(root / "flux", subfolder="transformer", dtype=dtype,
                                                         quantization_config=quantization)
    return AnyStoryFluxPipeline.from_pretrained(root / "flux", redux=root / "redux", adapter=root / "anystory_flux.bin",
                                                reference_size=reference_size, torch_dtype=dtype, device=device,
                                                transformer=transformer)


def resident_bytes(modules) -> int:
    """Bytes of every distinct tensor storage the modules hold (quantized tensor subclasses are
    counted through their inner tensors)."""
    import torch
    seen, total = set(), 0

    def count(t):
        nonlocal total
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                count(getattr(t, name))
            return
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            count(t)
    return total


def allocation_peak(fn, marks: list) -> tuple[int, list[int]]:
    """Run fn under torch.profiler(profile_memory=True); return the highest running sum of the
    CPU allocator's allocations minus frees, and the same within each window [marks[i],
    marks[i+1]) of time.time_ns() stamps that fn appends to `marks`."""
    import torch._C._profiler as P
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == P._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    window_peaks = [0] * max(len(marks) - 1, 0)
    window_start_live = [None] * len(window_peaks)
    for stamp, size in events:
        live += size
        peak = max(peak, live)
        for i in range(len(window_peaks)):
            if marks[i] <= stamp < marks[i + 1]:
                if window_start_live[i] is None:
                    window_start_live[i] = live - size
                window_peaks[i] = max(window_peaks[i], live - window_start_live[i])
    return peak, window_peaks


def worker(root: Path, mode: str, cases: list[tuple[int, int]]) -> list[dict]:
    import gc

    import torch

    from anystory_cli.flux.reference import prepare_reference

    torch.manual_seed(0)
    pipe = load_pipeline(root, mode)
    g = torch.Generator().manual_seed(0)
    subjects = [_subject(color, box) for color, box in SUBJECTS]
    characters = [pipe.encode_character(*prepare_reference(image, mask), generator=g) for image, mask in subjects]
    modules = [pipe.transformer, pipe.anystory_adapter, pipe.text_encoder, pipe.text_encoder_2, pipe.vae,
               pipe.redux_image_encoder, pipe.subject_embedder, pipe.router_embedder]
    parts = {"transformer_and_adapters": resident_bytes([pipe.transformer, pipe.anystory_adapter]),
             "embedders": resident_bytes([pipe.subject_embedder, pipe.router_embedder]),
             "tiny_parts": resident_bytes([pipe.text_encoder, pipe.text_encoder_2, pipe.vae,
                                           pipe.redux_image_encoder])}
    resident = resident_bytes(modules) + sum(t.nbytes for c in characters for t in c.tensors().values())
    results = []
    for size, count in cases:
        gc.collect()
        marks: list[int] = []
        handles = [pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(time.time_ns())),
                   pipe.transformer.register_forward_hook(lambda *a: marks.append(time.time_ns()))]

        def call():
            with torch.no_grad():
                pipe(PROMPT, characters=characters[:count], num_inference_steps=1, height=size, width=size,
                     output_type="latent", redux_window=(0.0, 1.0), reference_window=(0.0, 1.0),
                     router=count >= 2, generator=torch.Generator().manual_seed(0), max_sequence_length=512)

        start = time.perf_counter()
        peak, windows = allocation_peak(call, marks)
        for handle in handles:
            handle.remove()
        # windows: [reference pass, between, step] with characters; [step] without.
        results.append({"mode": mode, "size": size, "characters": count, "resident_bytes": resident,
                        "resident_parts": parts, "call_peak_bytes": peak, "peak_bytes": resident + peak,
                        "transformer_call_peaks": windows[::2], "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


# Narrow but deep: with 24 blocks the recorded reference keys and values outweigh the reference
# pass's activations several times, so a second copy of them would show in the pass's peak.
DEEP = memory.FluxShape(heads=2, head_dim=64, double_blocks=1, single_blocks=23, text_width=64, pooled_dim=32,
                        lora_rank=8, routing_rank=8, embedder_rank=8, siglip_width=16, reference_size=256)


def reference_pass_peak(pipe, characters) -> int:
    """The allocations' peak from the start of the reference pass to the start of the first
    denoising step (the pass, and what the pipeline does with what it recorded before the loop)."""
    import torch

    marks: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: marks.append(time.time_ns()))

    def call():
        with torch.no_grad():
            pipe("a red ball and a blue ball", characters=characters, num_inference_steps=1, height=64, width=64,
                 output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0))

    try:
        _, windows = allocation_peak(call, marks)
    finally:
        handle.remove()
    return windows[0]


def deep_worker(root: Path) -> dict:
    """The reference pass on the DEEP slice with two characters, against the ledger."""
    import torch

    from anystory_cli.flux.reference import prepare_reference

    torch.set_num_threads(1)
    build_slice(root, DEEP)
    pipe = load_pipeline(root, "bf16", reference_size=DEEP.reference_size)
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*prepare_reference(*_subject(c, b)), generator=g) for c, b in SUBJECTS[:2]]
    measured = reference_pass_peak(pipe, characters)
    kv = memory.reference_kv_bytes(DEEP, 2)
    ledger = memory.reference_pass_bytes(DEEP, 2)
    return {"slice": vars(DEEP), "characters": 2, "measured_bytes": measured, "kv_bytes": int(kv),
            "ledger_bytes": int(ledger), "error": round(ledger / measured - 1, 3),
            "with_a_second_copy_bytes": int(max(ledger, 2 * kv))}


def vae_worker(sizes=(256, 512)) -> list[dict]:
    """FLUX.1's VAE decoder at its real configuration (random weights, bf16): the peak of decoding
    one image, above its weights, per size."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False).to(torch.bfloat16).eval()
    results = []
    for size in sizes:
        latent = torch.randn(1, 16, size // 8, size // 8, dtype=torch.bfloat16)

        def decode():
            with torch.no_grad():
                vae.decode(latent)

        peak, _ = allocation_peak(decode, [])
        results.append({"size": size, "decode_peak_bytes": peak,
                        "units": round(peak / (size * size * memory.DECODE_CHANNELS * 2), 2)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def timing_worker(root: Path, rounds: int, size: int = 512) -> dict:
    """CPU seconds (one thread) of a denoising step on the slice with 0 (plain FLUX), 1, 2 and 3
    characters (subject tokens, reference and router all on): the transformer's last forward in a
    1-step call (the one before it, with characters, is the reference pass), interleaved round by
    round; medians over rounds."""
    import statistics

    import torch

    from anystory_cli.flux.reference import prepare_reference

    torch.set_num_threads(1)  # CPU time of one thread: no spinning worker threads on a shared machine
    pipe = load_pipeline(root, "bf16")
    g = torch.Generator().manual_seed(0)
    characters = [pipe.encode_character(*prepare_reference(*_subject(c, b)), generator=g) for c, b in SUBJECTS]
    stamps: list[float] = []
    pipe.transformer.register_forward_pre_hook(lambda *a: stamps.append(time.process_time()))
    pipe.transformer.register_forward_hook(lambda *a: stamps.append(time.process_time()))

    def step_seconds(count) -> float:
        stamps.clear()
        with torch.no_grad():
            pipe(PROMPT, characters=characters[:count], num_inference_steps=1, height=size, width=size,
                 output_type="latent", redux_window=(0.0, 1.0), reference_window=(0.0, 1.0), router=count >= 2,
                 generator=torch.Generator().manual_seed(0), max_sequence_length=512)
        return stamps[-1] - stamps[-2]

    times = {count: [] for count in range(4)}
    for _ in range(rounds):
        for count in times:
            times[count].append(step_seconds(count))
            print(count, times[count][-1], file=sys.stderr, flush=True)
    step = {count: statistics.median(t) for count, t in times.items()}
    return {"image_px": size, "threads": 1, "rounds": rounds,
            "cpu_seconds_per_step": {f"{c}_characters": round(v, 2) for c, v in step.items()},
            "vs_plain": {f"{c}_characters": round(step[c] / step[0], 3) for c in (1, 2, 3)}}


def _subject(color, box, size: int = 96):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), (255, 255, 255))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).ellipse(box, fill=tuple(color))
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


# ---------------------------------------------------------------------------------------- reports
def compare(measured: list[dict]) -> list[dict]:
    rows = []
    for m in measured:
        tiny = m["resident_parts"]["tiny_parts"]
        plan = memory.slice_plan(memory.QUANTIZATIONS[m["mode"]])
        est = memory.denoising_peak(SLICE, plan, memory.Workload(m["size"], m["characters"]), other_bytes=tiny)
        weights = (memory.transformer_bytes(SLICE, plan.transformer) + 2 * SLICE.embedder_params() + tiny)
        rows.append({"mode": m["mode"], "size": m["size"], "characters": m["characters"],
                     "measured_gib": round(m["peak_bytes"] / memory.GiB, 3), "ledger_gib": round(est / memory.GiB, 3),
                     "error": round(est / m["peak_bytes"] - 1, 3),
                     "measured_weights_gib": round(m["resident_bytes"] / memory.GiB, 3),
                     "ledger_weights_gib": round(weights / memory.GiB, 3),
                     "measured_call_mib": round(m["call_peak_bytes"] / 2 ** 20, 1),
                     "ledger_call_mib": round((est - weights) / 2 ** 20, 1),
                     "call_error": round((est - weights) / m["call_peak_bytes"] - 1, 3)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the docs table from the ledger and stop")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--timing", action="store_true", help="measure a step's cost with 0-3 characters instead")
    parser.add_argument("--rounds", type=int, default=1, help="--timing rounds")
    parser.add_argument("--deep", action="store_true", help="the reference pass on a 24-block slice instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measured", type=Path, help="reuse a measurement JSON instead of measuring")
    args = parser.parse_args()
    if args.table:
        print(memory.markdown_table())
        return
    if args.worker:
        print(json.dumps(worker(args.root, args.worker, CASES)))
        return
    if args.deep:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(deep_worker(Path(tmp)), indent=2))
        return
    if args.timing:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps({"slice": vars(SLICE), **timing_worker(build_slice(Path(tmp)), args.rounds)}, indent=2))
        return
    if args.measured:
        measured = json.loads(args.measured.read_text())
    else:
        measured = []
        with tempfile.TemporaryDirectory() as tmp:
            root = build_slice(Path(tmp))
            for mode in args.modes:  # a fresh process per mode: nothing cached from the last one
                out = subprocess.run([sys.executable, __file__, "--worker", mode, "--root", str(root)],
                                     check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                measured += json.loads(out.stdout)
    rows = compare(measured)
    print(json.dumps({"slice": vars(SLICE), "ledger_vs_measured": rows,
                      "worst_error": max(abs(r["error"]) for r in rows),
                      "worst_call_error": max(abs(r["call_error"]) for r in rows), "measured": measured}, indent=2))


if __name__ == "__main__":
    main()
