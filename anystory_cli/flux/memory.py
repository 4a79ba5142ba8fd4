"""Memory plans for AnyStory on FLUX.1: what each part weighs, the peak a plan reaches, and the
fastest plan that fits a card. Plain arithmetic on parameter and token counts, no torch: a
`render --dry-run` answers instantly.

The ledger's parts (FLUX.1-dev + FLUX.1-Redux-dev + anystory_flux.bin; bf16 unless quantized):
the transformer (linear weights, which quantization shrinks, and the rest), the AnyStory
reference and router LoRAs and routing-map adapters (never quantized: they load on top), T5-XXL,
CLIP-L, the VAE, SigLIP and the two subject embedders; per call, the reference keys and values of
every block (on the device, or with offloading on the CPU, one block's on the device at a time),
and the activations of the largest phase, in units of one (tokens x width) bf16
tensor (`STEP_UNITS` and its siblings, measured on a real-width slice by
benchmarks/flux_memory.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from ..errors import InputError

GiB = 1024 ** 3

# Parameter counts of FLUX.1-dev's other parts (diffusers/transformers models built from their
# configurations; tests/test_flux_memory.py recounts them on the meta device).
T5_XXL = {"linear": 4_630_511_616, "other": 131_799_040}   # embedding 32128 x 4096 + norms
CLIP_L = 123_060_480
VAE = {"encoder": 34_274_208, "decoder": 49_545_475}
SIGLIP_SO400M = 428_225_600

# Activations, in bf16 (tokens x width) units, fitted by benchmarks/flux_memory.py on a
# real-width slice at 512 px with one and two characters and checked at 1024 px and on int8
# weights: a denoising step with AnyStory's streams peaks at STEP_UNITS (queries x width) plus
# one (queries x keys) attention bias; a plain FLUX step at PLAIN_UNITS; the reference pass at
# REFERENCE_UNITS (reference tokens x width) on top of the keys and values it records.
STEP_UNITS = 18.1
PLAIN_UNITS = 17.2
REFERENCE_UNITS = 16.1
# The VAE decoder's peak per output pixel, in bf16 units of its last 128-channel feature map
# (measured at 256 and 512 px by benchmarks/flux_memory.py: 10.0 at both); with tiling it
# decodes VAE_TILE-pixel tiles.
DECODE_UNITS = 10.0
DECODE_CHANNELS = 128
VAE_TILE = 512
# What the CUDA context, cuBLAS workspaces and the allocator's fragmentation take beyond the
# tensors (torch.cuda.max_memory_allocated does not see them).
HEADROOM = int(1.0 * GiB)


@dataclass(frozen=True)
class FluxShape:
    """The sizes of a FLUX transformer and the AnyStory parts on it (defaults: FLUX.1-dev)."""

    heads: int = 24
    head_dim: int = 128
    double_blocks: int = 19
    single_blocks: int = 38
    text_width: int = 4096     # T5 width, the context embedder's input and the Redux output
    pooled_dim: int = 768      # CLIP's pooled embedding
    in_channels: int = 64      # 16 latent channels in 2x2 patches
    mlp_ratio: int = 4
    text_tokens: int = 512     # T5 tokens (max_sequence_length)
    lora_rank: int = 128       # the reference and router LoRAs
    routing_rank: int = 128    # the per-block routing-map adapters
    embedder_rank: int = 128
    siglip_width: int = 1152
    subject_tokens: int = 81   # per character, in the text stream
    router_tokens: int = 9     # per character, the router stream
    reference_size: int = 512  # the reference image's side in pixels

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @classmethod
    def from_config(cls, config: dict, **overrides) -> FluxShape:
        """From a FluxTransformer2DModel config.json."""
        return cls(heads=config["num_attention_heads"], head_dim=config["attention_head_dim"],
                   double_blocks=config["num_layers"], single_blocks=config["num_single_layers"],
                   text_width=config["joint_attention_dim"], pooled_dim=config["pooled_projection_dim"],
                   in_channels=config["in_channels"], **overrides)

    # ------------------------------------------------------------------ parameters
    def linears(self) -> dict[str, tuple[int, int]]:
        """Every linear layer of the transformer: name -> (in, out); all have a bias."""
        w, m = self.width, self.mlp_ratio * self.width
        layers = {"x_embedder": (self.in_channels, w), "context_embedder": (self.text_width, w),
                  "time_text_embed.timestep_embedder.linear_1": (256, w),
                  "time_text_embed.timestep_embedder.linear_2": (w, w),
                  "time_text_embed.guidance_embedder.linear_1": (256, w),
                  "time_text_embed.guidance_embedder.linear_2": (w, w),
                  "time_text_embed.text_embedder.linear_1": (self.pooled_dim, w),
                  "time_text_embed.text_embedder.linear_2": (w, w),
                  "norm_out.linear": (w, 2 * w), "proj_out": (w, self.in_channels)}
        double = {"norm1.linear": (w, 6 * w), "norm1_context.linear": (w, 6 * w),
                  **{f"attn.{p}": (w, w) for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                   "add_v_proj", "to_out.0", "to_add_out")},
                  "ff.net.0.proj": (w, m), "ff.net.2": (m, w), "ff_context.net.0.proj": (w, m),
                  "ff_context.net.2": (m, w)}
        single = {"norm.linear": (w, 3 * w), "proj_mlp": (w, m), "proj_out": (w + m, w),
                  **{f"attn.{p}": (w, w) for p in ("to_q", "to_k", "to_v")}}
        for i in range(self.double_blocks):
            layers.update({f"transformer_blocks.{i}.{k}": v for k, v in double.items()})
        for i in range(self.single_blocks):
            layers.update({f"single_transformer_blocks.{i}.{k}": v for k, v in single.items()})
        return layers

    def transformer_params(self) -> tuple[int, int]:
        """(linear weights, everything else: biases and the q/k RMSNorm weights)."""
        layers = self.linears().values()
        norms = (4 * self.double_blocks + 2 * self.single_blocks) * self.head_dim
        return sum(i * o for i, o in layers), sum(o for _, o in layers) + norms

    def lora_params(self) -> int:
        """The reference and router LoRAs (rank `lora_rank` on their target layers)."""
        ref = re.compile(r"x_embedder|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.2)"
                         r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])")
        router = re.compile(r"context_embedder|transformer_blocks\.\d+\.(norm1_context\.linear|attn\.add_[qkv]_proj"
                            r"|attn\.to_add_out|ff_context\.net\.2)"
                            r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])")
        total = 0
        for name, (i, o) in self.linears().items():
            total += sum(self.lora_rank * (i + o) for pattern in (ref, router) if pattern.fullmatch(name))
        return total

    def routing_adapter_params(self) -> int:
        w, r = self.width, self.routing_rank
        return self.blocks * 2 * (w * r + r * w + w)

    def embedder_params(self) -> int:
        """The subject (9x9) and router (3x3) embedders: Redux's projections + corrections + gate."""
        s, t, r = self.siglip_width, self.text_width, self.embedder_rank
        one = (s * 3 * t + 3 * t) + (3 * t * t + t) + r * (s + 3 * t) + 3 * t + r * (3 * t + t) + t + t + 1
        return 2 * one

    # ------------------------------------------------------------------ tokens
    def image_tokens(self, size: int) -> int:
        return (size // 16) ** 2

    def reference_tokens(self, characters: int) -> int:
        return characters * (self.reference_size // 16) ** 2


@dataclass(frozen=True)
class Quantization:
    """How a model's linear weights are stored on the device."""

    name: str
    bytes_per_weight: float  # per linear weight, scales included
    backend: str | None      # the library that does it (None: plain bf16)
    dequantizes_layers: bool = False  # rebuilds a layer's bf16 weight before its matmul (GGUF)
    label: str = ""          # how a plan says it, when not its name (a GGUF file's type and name)


QUANTIZATIONS = {
    "bf16": Quantization("bf16", 2.0, None),
    # torchao Int8WeightOnlyConfig: int8 weights + one bf16 scale per output row (~1 byte). Its
    # matmul makes a transient up to a layer's bf16 weight (55-82 MB measured on the slice, whose
    # largest layer is 113 MB): counted like GGUF's dequantized layer.
    "int8": Quantization("int8", 1.0, "torchao", dequantizes_layers=True),
    # bitsandbytes LLM.int8 (for T5): int8 weights + fp32 row statistics.
    "bnb-int8": Quantization("bnb-int8", 1.0, "bitsandbytes"),
    # bitsandbytes NF4: 4 bits + an fp32 absmax per 64 weights.
    "nf4": Quantization("nf4", 0.5 + 4 / 64, "bitsandbytes"),
    # GGUF Q8_0: blocks of 32 int8 + an fp16 scale; Q4_K_S: about 4.5 bits a weight.
    "gguf-q8": Quantization("gguf-q8", 34 / 32, "gguf", dequantizes_layers=True),
    "gguf-q4": Quantization("gguf-q4", 4.5 / 8, "gguf", dequantizes_layers=True),
}
OFFLOADS = ("none", "model", "group", "sequential")


@dataclass(frozen=True)
class Plan:
    """How the pipeline is placed: the transformer's and T5's storage, and what is offloaded.

    step_time: a denoising step's time relative to bf16 with everything on the GPU. These are
    assumptions from published FLUX figures (diffusers' quantization and offloading guides), not
    measured here; the GPU check script measures them on a card."""

    name: str
    transformer: Quantization
    text_encoder: Quantization
    offload: str
    step_time: float
    vae_tiling: bool = False
    # Parts the model brings already quantized ("transformer": a GGUF file, a saved quantized
    # folder): loaded as they are, never quantized again.
    stored: tuple[str, ...] = ()
    # Everything on the device, but the text encoders and the transformer take turns: the
    # transformer comes once a render has encoded every panel's prompt, the text encoders leave
    # (for the CPU) before the first denoising step.
    text_encoders_leave: bool = False

    def describe(self) -> str:
        transformer = self.transformer.label or self.transformer.name
        t5 = self.text_encoder.name
        transformer += " (already quantized)" if "transformer" in self.stored else ""
        t5 += " (already quantized)" if "text_encoder" in self.stored else ""
        parts = [f"transformer {transformer}", f"T5 {t5}",
                 {"none": "all on the device", "model": "model offload", "group": "group offload (leaf level)",
                  "sequential": "sequential offload"}[self.offload]]
        if self.text_encoders_leave:
            parts.append("text encoders leave after the prompts")
        if self.vae_tiling:
            parts.append("VAE tiling")
        return ", ".join(parts)

    @property
    def weights_key(self) -> str:
        """What of the plan changes pixels: the stored weights ('' when all bf16). Offload and
        VAE tiling do not (a tile is decoded with its neighbours' overlap blended)."""
        transformer = "stored" if "transformer" in self.stored else self.transformer.name
        t5 = "stored" if "text_encoder" in self.stored else self.text_encoder.name
        if {transformer, t5} <= {"stored", "bf16"}:
            return ""  # stored parts' weights are in the model's own fingerprint
        return f"transformer={transformer},t5={t5}"


def weights_id(model_id: str, plan: Plan | None) -> str:
    """A model's id with the plan's stored weights where they change pixels: what panels' and
    character encodings' keys name the model by."""
    key = plan.weights_key if plan is not None else ""
    return f"{model_id}+{key}" if key else model_id


_Q = QUANTIZATIONS
PLANS = (  # fastest first
    Plan("bf16", _Q["bf16"], _Q["bf16"], "none", 1.0),
    Plan("bf16-text-off", _Q["bf16"], _Q["bf16"], "none", 1.0, text_encoders_leave=True),
    Plan("bf16-offload", _Q["bf16"], _Q["bf16"], "model", 1.0),
    Plan("int8", _Q["int8"], _Q["bf16"], "none", 1.1),  # also what a CPU can run (torchao)
    Plan("int8-text-off", _Q["int8"], _Q["bf16"], "none", 1.1, text_encoders_leave=True),
    Plan("int8-offload", _Q["int8"], _Q["bf16"], "model", 1.1),
    Plan("nf4-offload", _Q["nf4"], _Q["bnb-int8"], "model", 1.15),
    Plan("gguf-q8-offload", _Q["gguf-q8"], _Q["bf16"], "model", 1.25),
    Plan("gguf-q4-offload", _Q["gguf-q4"], _Q["bnb-int8"], "model", 1.3),
    Plan("group-offload", _Q["bf16"], _Q["bf16"], "group", 1.5, vae_tiling=True),
    Plan("sequential", _Q["bf16"], _Q["bf16"], "sequential", 4.0, vae_tiling=True),
)
PLAN_NAMES = {p.name: p for p in PLANS}


def slice_plan(quantization: Quantization) -> Plan:
    """Everything resident, the transformer stored as `quantization` (the benchmark's slice)."""
    return Plan(f"slice-{quantization.name}", quantization, _Q["bf16"], "none", 1.0)


@dataclass(frozen=True)
class Workload:
    size: int        # the panel's long side in pixels (square panels: the worst case of that side)
    characters: int  # in one panel


@dataclass(frozen=True)
class Parts:
    """Parameter counts of the parts outside the transformer."""

    t5: dict = field(default_factory=lambda: dict(T5_XXL))
    clip: int = CLIP_L
    vae: dict = field(default_factory=lambda: dict(VAE))
    siglip: int = SIGLIP_SO400M


# ---------------------------------------------------------------------------------------- the ledger
def _bytes(params: float, quantization: Quantization = _Q["bf16"]) -> float:
    return params * quantization.bytes_per_weight


def transformer_bytes(shape: FluxShape, quantization: Quantization) -> float:
    """The transformer with the AnyStory LoRAs and routing adapters (these stay bf16)."""
    linear, other = shape.transformer_params()
    return _bytes(linear, quantization) + 2 * (other + shape.lora_params() + shape.routing_adapter_params())


def reference_kv_bytes(shape: FluxShape, characters: int) -> float:
    """Every block's reference keys and values, kept for the whole call."""
    return 2 * shape.blocks * shape.reference_tokens(characters) * shape.width * 2


def step_activation_bytes(shape: FluxShape, workload: Workload) -> float:
    """A denoising step's activations at its largest block."""
    n = workload.characters
    queries = shape.text_tokens + n * shape.subject_tokens + shape.image_tokens(workload.size)
    if not n:
        return PLAIN_UNITS * queries * shape.width * 2
    keys = queries + shape.reference_tokens(n)
    return STEP_UNITS * queries * shape.width * 2 + queries * keys * 2


def reference_pass_bytes(shape: FluxShape, characters: int, kv_on_device: bool = True) -> float:
    """The reference pass: its activations on top of the keys and values it records. They are
    recorded once: regrouping them per block, (N, L, H, D) -> (1, N*L, H, D), is a view. With
    kv_on_device False (offloading plans) each block's pair leaves for the CPU as it is made."""
    if not characters:
        return 0.0
    kv = reference_kv_bytes(shape, characters)
    held = kv if kv_on_device else kv / shape.blocks
    return REFERENCE_UNITS * shape.reference_tokens(characters) * shape.width * 2 + held


def decode_bytes(size: int, tiling: bool) -> float:
    side = min(size, VAE_TILE) if tiling else size
    return DECODE_UNITS * side * side * DECODE_CHANNELS * 2


def _largest_layer_bytes(shape: FluxShape) -> float:
    return 2 * max(i * o + o for i, o in shape.linears().values())


def phases(shape: FluxShape, plan: Plan, workload: Workload, parts: Parts = Parts(),
           other_bytes: float | None = None) -> dict[str, float]:
    """Bytes on the device in each phase of a call, under `plan`.

    other_bytes: when given, the bytes of the text encoders, VAE and SigLIP as counted (the
    benchmark's slice has tiny ones) instead of the ledger's."""
    t5 = _bytes(parts.t5["linear"], plan.text_encoder) + 2 * parts.t5["other"]
    clip, siglip = 2 * parts.clip, 2 * parts.siglip
    vae = 2 * (parts.vae["encoder"] + parts.vae["decoder"])
    if other_bytes is not None:
        t5, clip, vae, siglip = other_bytes, 0.0, 0.0, 0.0
    # The routing-map adapters stay on the device in every plan (they run inside the transformer's
    # forward: the pipeline excludes them from offloading); SigLIP and the embedders run when a
    # character is encoded, with the VAE's encoder.
    adapters = 2 * shape.routing_adapter_params()
    transformer = transformer_bytes(shape, plan.transformer) - adapters
    encoders = siglip + 2 * shape.embedder_params()
    resident = adapters
    # The reference keys and values: on the device for the whole call when everything is there;
    # with offloading on the CPU, one block's pair on the device while that block runs.
    kv = reference_kv_bytes(shape, workload.characters)
    if plan.offload != "none":
        kv = kv / shape.blocks
    step = step_activation_bytes(shape, workload)
    reference = reference_pass_bytes(shape, workload.characters, kv_on_device=plan.offload == "none")
    if plan.transformer.dequantizes_layers:
        step += _largest_layer_bytes(shape)
        reference += _largest_layer_bytes(shape) if workload.characters else 0
    decode = decode_bytes(workload.size, plan.vae_tiling)
    if plan.offload == "none":
        weights = resident + encoders + t5 + clip + vae + transformer
        if not plan.text_encoders_leave:
            return {"text": weights, "reference": weights + reference, "step": weights + kv + step,
                    "decode": weights + kv + decode}
        # The transformer and the text encoders take turns on the device (memory_apply.place_for_*).
        text, after_text = weights - transformer, weights - t5 - clip
        return {"text": text, "reference": after_text + reference, "step": after_text + kv + step,
                "decode": after_text + kv + decode}
    if plan.offload == "model":  # one model on the device at a time
        return {"text": resident + t5 + clip, "encode": resident + encoders + vae,
                "reference": resident + transformer + reference, "step": resident + transformer + kv + step,
                "decode": resident + vae + decode}
    # group / sequential offload: the weights stream in layer by layer (two layers in flight with
    # prefetching), so what stays is the activations.
    in_flight = (2 if plan.offload == "group" else 1) * _largest_layer_bytes(shape)
    return {"text": resident + in_flight, "reference": resident + in_flight + reference,
            "step": resident + in_flight + kv + step, "decode": resident + in_flight + decode}


def peak(shape: FluxShape, plan: Plan, workload: Workload, parts: Parts = Parts()) -> float:
    return max(phases(shape, plan, workload, parts).values())


def denoising_peak(shape: FluxShape, plan: Plan, workload: Workload, other_bytes: float) -> float:
    """All resident: the weights (the other parts as counted) + the larger of the reference pass
    and a denoising step. What the benchmark measures on its slice."""
    p = phases(shape, plan, workload, other_bytes=other_bytes)
    return max(p["reference"], p["step"])


# ---------------------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class Choice:
    plan: Plan
    peak_bytes: float
    budget_bytes: float | None  # None: a plan named, not chosen for a budget

    def as_dict(self) -> dict:
        return {"plan": self.plan.name, "quantization": {"transformer": self.plan.transformer.name,
                                                         "text_encoder": self.plan.text_encoder.name},
                "offload": self.plan.offload, "vae_tiling": self.plan.vae_tiling,
                "text_encoders_leave": self.plan.text_encoders_leave,
                "estimated_peak_gib": round(self.peak_bytes / GiB, 2),
                "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GiB, 2),
                "relative_step_time": self.plan.step_time}


class DoesNotFit(InputError):
    """No plan fits the memory given."""


# A stored transformer's step time relative to bf16 (the same published figures as PLANS').
_STORED_STEP_TIME = {"bf16": 1.0, "int8": 1.1, "nf4": 1.15, "bnb-int8": 1.15, "gguf": 1.25}


def stored_plans(transformer: Quantization) -> tuple[Plan, ...]:
    """The plans for a model whose transformer comes quantized (a GGUF file, a saved quantized
    folder): only its placement is chosen (offload, T5's storage), fastest first."""
    base = _STORED_STEP_TIME.get("gguf" if transformer.backend == "gguf" else transformer.name, 1.25)
    name, stored = transformer.name, ("transformer",)
    return (Plan(name, transformer, _Q["bf16"], "none", base, stored=stored),
            Plan(f"{name}-text-off", transformer, _Q["bf16"], "none", base, stored=stored, text_encoders_leave=True),
            Plan(f"{name}-offload", transformer, _Q["bf16"], "model", base, stored=stored),
            Plan(f"{name}-offload-t5-int8", transformer, _Q["bnb-int8"], "model", base + 0.05, stored=stored),
            Plan(f"{name}-group-offload", transformer, _Q["bf16"], "group", base * 1.5, vae_tiling=True, stored=stored),
            Plan(f"{name}-sequential", transformer, _Q["bf16"], "sequential", base * 4, vae_tiling=True,
                 stored=stored))


def stored_plan(named: Plan, transformer: Quantization) -> Plan | None:
    """A named plan (--memory bf16-offload, gguf-q8-offload, ...) followed with a stored
    transformer: its placement, when it asks for no transformer quantization or the one stored;
    None when it names another (--memory int8 for a GGUF file)."""
    if named.transformer.backend is not None and not transformer.name.startswith(named.transformer.name):
        return None
    for plan in stored_plans(transformer):
        if (plan.offload, plan.text_encoder, plan.vae_tiling, plan.text_encoders_leave) == (
                named.offload, named.text_encoder, named.vae_tiling, named.text_encoders_leave):
            return plan
    return replace(named, name=f"{transformer.name}-{named.name}", transformer=transformer,
                   stored=("transformer",))


def smallest_size(shape: FluxShape, workload: Workload, parts: Parts = Parts(), plans=PLANS) -> float:
    """The smallest device memory any of `plans` fits in."""
    return min(peak(shape, p, workload, parts) for p in plans) + HEADROOM


def choose_plan(budget_bytes: float, workload: Workload, shape: FluxShape = FluxShape(),
                parts: Parts = Parts(), plans=PLANS) -> Choice:
    """The fastest of `plans` whose peak, plus `HEADROOM`, fits `budget_bytes`; DoesNotFit naming
    the smallest size that would work."""
    for plan in plans:
        need = peak(shape, plan, workload, parts)
        if need + HEADROOM <= budget_bytes:
            return Choice(plan, need, budget_bytes)
    least = smallest_size(shape, workload, parts, plans)
    raise DoesNotFit(f"no memory plan fits {format_size(budget_bytes)} for {workload.characters} character"
                     f"{'s' if workload.characters != 1 else ''} at {workload.size} px; the smallest that works "
                     f"is {math.ceil(least / GiB * 10) / 10:g}GB (--memory)")


# ---------------------------------------------------------------------------------------- devices
# Apple silicon (MPS) shares one memory between the CPU and the GPU: moving a part to the CPU frees
# nothing there, so only the plans that keep every part where it is apply. Quantization does shrink
# it: torchao's int8 weight-only layers (torchao 0.18: an int8 -> bf16 cast and a matmul, plain
# torch operations) and GGUF (diffusers dequantizes in torch) run there; bitsandbytes needs CUDA.
def plans_for(device: str, plans=PLANS) -> tuple[Plan, ...]:
    """Those of `plans` a device can follow ('cuda', 'cuda:1', 'mps', 'cpu'): on MPS, those that
    keep every part where it is."""
    if device.split(":")[0] != "mps":
        return tuple(plans)
    return tuple(p for p in plans if p.offload == "none" and not p.text_encoders_leave)


def check_plan_on(plan: Plan, device: str, dtype: str) -> None:
    """InputError (one line) when `plan` cannot run on `device` at precision `dtype`."""
    kind = device.split(":")[0]
    if plan.offload != "none" and kind != "cuda":
        reason = " (MPS's memory is shared with the CPU: offloading frees nothing)" if kind == "mps" else ""
        raise InputError(f"memory plan {plan.name} offloads from a CUDA GPU; this render runs on {device}{reason}")
    if plan.text_encoders_leave and kind == "mps":
        raise InputError(f"memory plan {plan.name} moves the text encoders to the CPU, which frees nothing in MPS's "
                         f"shared memory; use {plan.name.replace('-text-off', '')}")
    for quantization in (plan.transformer, plan.text_encoder):
        if quantization.backend == "bitsandbytes" and kind != "cuda":
            raise InputError(f"memory plan {plan.name}: {quantization.name} quantization (bitsandbytes) needs a CUDA "
                             f"GPU; this render runs on {device} (use int8, torchao)")
    if kind in ("cuda", "mps") and dtype == "float32":
        raise InputError(f"memory plan {plan.name} counts bfloat16 weights; this render asks for float32 (--dtype)")


# ---------------------------------------------------------------------------------------- sizes
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)\s*", re.IGNORECASE)
_UNITS = {"g": GiB, "m": 1024 ** 2, "t": 1024 ** 4}


def parse_size(value: str | int | float, where: str = "--memory") -> float:
    """'16GB', '12GiB', '24G', '512MB' -> bytes. Sizes are binary (16GB = 16 GiB), as graphics
    cards are counted. Raises InputError naming `where` for anything else."""
    if isinstance(value, bool):
        raise InputError(f"{where}: expected a memory size such as 16GB, got {value!r}")
    if isinstance(value, (int, float)):
        raise InputError(f"{where}: give a unit, e.g. {value}GB (got the bare number {value!r})")
    match = _SIZE.fullmatch(str(value))
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{where}: expected a memory size such as 16GB, 12GiB or 24G, auto, or a plan "
                         f"({', '.join(PLAN_NAMES)}); got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)[0].lower()]


def parse_memory(value: str | int | float, where: str = "--memory") -> float | None:
    """'auto' -> None (ask the device), else the size in bytes (a plan name: `named_plan`)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    return parse_size(value, where)


def named_plan(value: str | int | float) -> Plan | None:
    """The plan `value` names ('int8', 'nf4-offload', ...: a plan forced instead of chosen), or
    None for 'auto' or a size."""
    return PLAN_NAMES.get(value.strip().lower()) if isinstance(value, str) else None


def format_size(size: float) -> str:
    return f"{size / GiB:.4g}GB"


# ---------------------------------------------------------------------------------------- the table
TABLE_SIZES_GB = (8, 12, 16, 24, 40, 80)


def table(shape: FluxShape = FluxShape(), sizes=TABLE_SIZES_GB, panels=(512, 1024), characters=(1, 2, 3, 4)):
    """(card GB, panel px, characters) -> Choice or DoesNotFit, for the docs."""
    rows = []
    for gb in sizes:
        for px in panels:
            for n in characters:
                try:
                    rows.append((gb, px, n, choose_plan(gb * GiB, Workload(px, n), shape)))
                except DoesNotFit as exc:
                    rows.append((gb, px, n, exc))
    return rows


def markdown_table(shape: FluxShape = FluxShape()) -> str:
    """One row per card and panel size, one column per number of characters: the plan, its
    estimated peak and its relative step time."""
    cells: dict[tuple[int, int], list[str]] = {}
    for gb, px, n, choice in table(shape):
        if isinstance(choice, DoesNotFit):
            cell = f"does not fit (needs {smallest_size(shape, Workload(px, n)) / GiB:.1f} GB)"
        else:
            cell = f"{choice.plan.name}, {choice.peak_bytes / GiB:.1f} GiB, ×{choice.plan.step_time:g}"
        cells.setdefault((gb, px), []).append(cell)
    lines = ["| card | panel | 1 character | 2 characters | 3 characters | 4 characters |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {gb} GB | {px} px | " + " | ".join(row) + " |" for (gb, px), row in cells.items()]
    return "\n".join(lines)
