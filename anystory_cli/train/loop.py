"""Training of AnyStory adapters: the paper's two stages (docs/design.md, "Training").

    recipe = load_recipe("stage1.yaml")
    problems = validate_manifest(recipe.data, recipe.stage)   # before any model is loaded
    train(recipe)

Recipe (YAML, unknown keys refused):

    kind: adapter                 # `anystory train` trains adapters; the lab's recipes say base or judge
    stage: 1                      # 1: subject encoder, 2: router
    data: data/train.jsonl        # the manifest (below); relative to the recipe file
    pipeline: models/sdxl         # a diffusers pipeline folder (from_pretrained) or hub id, and
    image_encoder: models/clip-h  # a CLIPVisionModel folder or hub id; `default` for both: the
                                  # embedded default model's base (recipes/world_stage1.yaml)
    init_adapter: null            # adapter file to start from (stage 2: the stage-1 result)
    init_trained_groups: null     # adapter file whose groups this stage trains replace init_adapter's:
                                  # continue a stage after the adapter it started from was retrained
    adapter_options: {}           # AnyStoryConfig overrides: for a fresh adapter, or for
                                  # init_adapter's config (a new router design, say): its parts
                                  # that still fit are kept, the others start fresh, and they
                                  # must all be parts this stage trains
    output_dir: runs/stage1
    lr: 1.0e-4
    lr_scheduler: constant        # diffusers' get_scheduler: constant, constant_with_warmup, linear,
    lr_warmup_steps: 0            # cosine, cosine_with_restarts, polynomial
    batch_size: 1                 # per process
    grad_accumulation: 1
    steps: 1000                   # optimizer steps
    seed: 0
    checkpoint_every: 100
    keep_checkpoints: null        # how many step-N folders stay (the newest); null: every one
    resume: false
    on_corrupt: skip              # skip (counted warning) | stop
    mixed_precision: "no"         # no | fp16 | bf16
    null_subject_prob: 0.1        # stage 1: CLIP condition dropped to the null subject
    resolution: null              # target side in pixels; default: the UNet's native size
    threads: null                 # torch CPU threads
    preview_count: 4              # rows of the sample grid written at every checkpoint
    preview_data: null            # their manifest (default: data)
    preview_steps: 20             # denoising steps and guidance of the previews
    preview_guidance: 4.0
    character_loss_weight: 0.0    # > 0: the diffusion loss weighs pixels inside the target's
                                  # characters (1 + w) times; needs target masks (below)
    routing_loss_weight: 0.1      # stage 2: λ of the routing loss (paper Eq. 4: 0.1)

Manifest: JSONL, one sample per line, paths relative to the manifest's folder.

    stage 1: {"reference": "a.png", "reference_mask": "a_mask.png" | null, "target": "b.png",
              "target_mask": "b_mask.png", "caption": "..."}
             # null reference_mask: the reference's alpha channel segments it; target_mask (the
             # character in the target) is optional unless character_loss_weight > 0
    stage 2: {"image": "s.png", "masks": ["s_0.png", "s_1.png"], "caption": "..."}
             # one mask per instance (white = the instance), the image's size, 1..max_characters
    Other fields of a row are ignored (`anystory world dataset` adds the identity seeds).

Output folder: ``checkpoints/step-NNNNNNN/`` (what ``Accelerator.save_state`` writes: the
optimizer, the learning-rate scheduler and RNG states; ``adapter.safetensors``, the adapter in the
format AnyStoryPipeline loads; ``run_state.json``, the step; see checkpoint.py: a checkpoint folder
appears whole, by rename), ``latest`` (the newest checkpoint's name), ``adapter.safetensors`` (the
last checkpoint's adapter) and ``log.jsonl`` (losses per optimizer step), ``losses.png`` (their
curves) and ``samples.png`` (references, target, generation and routing map of the preview rows;
one per checkpoint in ``samples/``). A checkpoint folder holding ``training_state.safetensors``
instead (the adapter and its optimizer state in one safetensors file) resumes too.

Reproducibility: batch contents, augmentation, noise, timesteps and Gumbel noise are all derived
from (seed, micro-step, process index), so the RNG state *is* the step, and a resumed run
draws exactly what an uninterrupted one would.

Devices: accelerate picks the device and mixed precision; under `torchrun`/`accelerate launch`
each process draws its own samples and all step with the mean gradient (effective batch =
processes x batch_size x grad_accumulation); only the main process writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file

from ..atomic import atomic_path
from ..errors import AnyStoryError, InputError, ModelError, OutputError
from ..hub import model_part_dir, names_hub_part
from ..masks import load_image, mask_array, prepare_reference
from ..sd.adapter import AnyStoryAdapter, AnyStoryConfig, install
from ..sd.attention import AnyStoryContext, InjectionInputs
from ..sd.router import ROUTING_LOSS_WEIGHT, routing_loss
from ..sd.weights import load_adapter, save_adapter
from .checkpoint import Checkpoints, WeightsFile, advance_schedule
from .manifest import manifest_problems, read_manifest
from .recipe_files import read_recipe_yaml

# ---------------------------------------------------------------------------------------------
# recipe

DEFAULT_BASE = "default"  # `pipeline:` / `image_encoder:` value naming the embedded default base


class TrainRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["adapter"] = "adapter"  # what `anystory train` trains (lab recipes: base, judge)
    stage: Literal[1, 2]
    data: Path
    pipeline: Path | None = None
    image_encoder: Path | None = None
    init_adapter: Path | None = None
    init_trained_groups: Path | None = None
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    output_dir: Path
    lr: float = Field(1e-4, gt=0)
    # diffusers.optimization.get_scheduler's schedule of the learning rate over `steps`
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(1, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    steps: int = Field(ge=1)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    # The newest this many checkpoints stay (each holds the adapter and its optimizer state, three
    # times the adapter's size); None keeps every one, to evaluate or resume from any of them.
    keep_checkpoints: int | None = Field(None, ge=1)
    # Stop this run after this many minutes, with a checkpoint (`resume: true` goes on from it):
    # a lent GPU is lent for minutes, not steps.
    max_minutes: float | None = Field(None, gt=0)
    # Processes that decode and augment batches ahead of the training step (0: the training
    # process does it between steps). The same samples either way; a GPU step is shorter than
    # loading its batch on one core.
    loader_workers: int = Field(0, ge=0)
    resume: bool = False
    on_corrupt: Literal["skip", "stop"] = "skip"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    null_subject_prob: float = Field(0.1, ge=0, le=1)
    resolution: int | None = Field(None, ge=8)
    # what the run shows (report.py): at every checkpoint, a loss plot and a grid of
    # samples from the first `preview_count` usable rows of `preview_data` (default: `data`)
    preview_count: int = Field(4, ge=0)
    preview_data: Path | None = None
    preview_steps: int = Field(20, ge=1)
    preview_guidance: float = Field(4.0, ge=1.0)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (default: torch's choice)
    # Not in the paper (which trains on large, well-trained bases): a character covers a tenth of
    # a sprite-world target, so its identity is a tenth of the plain loss; 0 keeps the paper's loss.
    character_loss_weight: float = Field(0.0, ge=0)
    # λ of paper Eq. 4. Stage 2 trains only the router, so λ sets how much its gradient follows the
    # masks rather than the diffusion loss reaching it through straight-through Gumbel gates (Adam
    # ignores the overall scale); small characters make the mask term small, see docs/default-model.md.
    routing_loss_weight: float = Field(ROUTING_LOSS_WEIGHT, ge=0)

    @field_validator("lr")
    @classmethod
    def _finite_lr(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"manifest {value} not found")
        return value


def recipe_from_dict(data: dict, where: str = "recipe") -> TrainRecipe:
    """A TrainRecipe, or InputError naming every bad field (pydantic's messages, one per line)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of recipe fields, got {type(data).__name__}")
    try:
        return TrainRecipe(**data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors()]
        raise InputError(f"{where}: bad training recipe\n" + "\n".join(lines)) from None


def load_recipe(path: str | Path) -> TrainRecipe:
    """Read a YAML recipe; relative paths in it are relative to the recipe file."""
    path = Path(path)
    data = read_recipe_yaml(path)
    if isinstance(data, dict):
        for key in ("data", "pipeline", "image_encoder", "init_adapter", "init_trained_groups", "output_dir",
                    "preview_data"):
            if data.get(key) == DEFAULT_BASE and key in ("pipeline", "image_encoder"):
                continue
            if key in ("pipeline", "image_encoder") and isinstance(data.get(key), str) \
                    and names_hub_part(data[key], path.parent):
                continue  # "org/name": from the Hugging Face cache when the components load
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(path.parent / data[key])
    return recipe_from_dict(data, str(path))


# ---------------------------------------------------------------------------------------------
# samples and augmentation


@dataclass
class Sample:
    target: np.ndarray  # (S, S, 3) uint8
    references: list  # masks.Reference per character, augmented
    masks: np.ndarray  # (N, S, S) float32 instance masks in the target (stage 1: its target_mask or none)
    caption: str


def _square(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    return image.resize((size, size), resample)


def augment_reference(reference, rng: np.random.Generator):
    """Small rotation, random crop, zero-pad (paper): the encoder must not copy the pose/framing."""
    from ..masks import Reference

    size = reference.rgb.shape[0]
    angle = float(rng.uniform(-10, 10))
    rgb = Image.fromarray(reference.rgb).rotate(angle, Image.Resampling.BILINEAR)
    mask = Image.fromarray((reference.mask * 255).astype(np.uint8)).rotate(angle, Image.Resampling.BILINEAR)
    crop = int(round(size * rng.uniform(0.85, 1.0)))  # crop, then shrink-and-pad: scale jitter
    x0, y0 = rng.integers(0, size - crop + 1, size=2)
    box = (int(x0), int(y0), int(x0) + crop, int(y0) + crop)
    inner = max(1, int(round(size * rng.uniform(0.8, 1.0))))
    px, py = rng.integers(0, size - inner + 1, size=2)
    out_rgb, out_mask = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.float32)
    out_rgb[py:py + inner, px:px + inner] = np.asarray(rgb.crop(box).resize((inner, inner), Image.Resampling.BILINEAR))
    out_mask[py:py + inner, px:px + inner] = np.asarray(mask.crop(box).resize((inner, inner)), np.float32) / 255
    out_mask = (out_mask >= 0.5).astype(np.float32)
    if not out_mask.any():  # augmentation cut the character away: keep the plain reference
        return reference
    return Reference(rgb=(out_rgb * out_mask[..., None]).astype(np.uint8), mask=out_mask)


def load_sample(row: dict, stage: int, folder: Path, resolution: int, reference_size: int,
                rng: np.random.Generator) -> Sample:
    """One manifest row, decoded, segmented and augmented. InputError if a file is bad."""
    if stage == 1:
        reference = load_image(folder / row["reference"], "reference")
        mask = None if row.get("reference_mask") is None else load_image(folder / row["reference_mask"], "mask")
        references = [augment_reference(prepare_reference(reference, mask, reference_size), rng)]
        target = load_image(folder / row["target"], "target").convert("RGB")
        paths = [] if row.get("target_mask") is None else [row["target_mask"]]
        masks = _target_masks([load_image(folder / m, "mask") for m in paths], target.size, resolution)
        return Sample(np.asarray(_square(target, resolution)), references, masks, row["caption"])
    image = load_image(folder / row["image"], "image").convert("RGB")
    masks = [load_image(folder / m, "mask") for m in row["masks"]]
    references = [augment_reference(prepare_reference(image, m, reference_size), rng) for m in masks]
    instance = _target_masks(masks, image.size, resolution)
    return Sample(np.asarray(_square(image, resolution)), references, instance, row["caption"])


def _target_masks(masks: list[Image.Image], size: tuple[int, int], resolution: int) -> np.ndarray:
    """(N, S, S) float32 coverage of each mask, resized like the target."""
    if not masks:
        return np.zeros((0, resolution, resolution), np.float32)
    return np.stack([
        np.asarray(_square(Image.fromarray(mask_array(m, size).astype(np.uint8) * 255), resolution,
                           Image.Resampling.BOX), np.float32) / 255 for m in masks])


def _seed_for(*parts: int) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts]


class SampleStream:
    """An endless, seeded stream of samples: epoch e is a permutation drawn from (seed, e);
    micro-batch g of process r takes positions ((g * world + r) * batch ...). Corrupt rows are
    skipped (counted) or stop the run, per the recipe."""

    def __init__(self, recipe: TrainRecipe, reference_size: int, resolution: int, rank: int, world: int,
                 bad_lines: set[int] = frozenset()):
        self.recipe, self.reference_size, self.resolution = recipe, reference_size, resolution
        self.rank, self.world = rank, world
        self.folder = recipe.data.parent
        self.rows = [(n, r) for n, r in read_manifest(recipe.data) if isinstance(r, dict)]
        if not self.rows:
            raise InputError(f"{recipe.data}: the dataset is empty (no usable rows)")
        # Rows the validator refused are dropped up front (and counted); rows that fail later
        # (a file changed during the run) are skipped when met.
        self.rows = [(n, r) for n, r in self.rows if n not in bad_lines]
        if not self.rows:
            raise InputError(f"{recipe.data}: no usable rows")
        self.bad: set[int] = set()
        self.refused = len(bad_lines)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def skipped(self) -> int:
        return self.refused + len(self.bad)

    def _row_at(self, position: int) -> tuple[int, dict]:
        epoch, offset = divmod(position, len(self.rows))
        if epoch not in self._orders:  # one permutation per epoch, not per sample
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng(_seed_for(self.recipe.seed, epoch, 1)).permutation(len(self.rows))
        return self.rows[self._orders[epoch][offset]]

    def batch(self, micro_step: int) -> list[Sample]:
        size = self.recipe.batch_size
        start = (micro_step * self.world + self.rank) * size
        samples, position, tries = [], start, 0
        while len(samples) < size:
            number, row = self._row_at(position)
            rng = np.random.default_rng(_seed_for(self.recipe.seed, micro_step, self.rank, position))
            position, tries = position + 1, tries + 1
            if number in self.bad:
                continue
            try:
                samples.append(load_sample(row, self.recipe.stage, self.folder, self.resolution,
                                           self.reference_size, rng))
            except (InputError, KeyError, TypeError) as exc:
                if self.recipe.on_corrupt == "stop":
                    raise InputError(f"{self.recipe.data}:{number}: {exc}") from None
                self.bad.add(number)
                warnings.warn(f"{self.recipe.data}:{number}: skipped ({exc}); {self.skipped} skipped so far")
                if len(self.bad) == len(self.rows):
                    raise InputError(f"{self.recipe.data}: every row is unusable") from None
        return samples


_WORKER_STREAM: SampleStream | None = None


def _start_loader(stream: SampleStream) -> None:
    global _WORKER_STREAM
    _WORKER_STREAM = stream


def _load_batch(micro_step: int) -> tuple[list[Sample], set[int]]:
    samples = _WORKER_STREAM.batch(micro_step)
    return samples, set(_WORKER_STREAM.bad)


class PrefetchingStream:
    """A SampleStream whose batches `workers` processes load ahead, asked for in order from
    `first` on. Each worker holds a copy of the stream; the rows any of them found bad are merged
    here, so `skipped` counts each row once, as one process would."""

    def __init__(self, stream: SampleStream, workers: int, first: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.stream, self.next, self.window = stream, first, 2 * workers
        # spawn: a forked child must not inherit the parent's CUDA or its threads
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_loader, initargs=(stream,))
        self.pending = {g: self.pool.submit(_load_batch, g) for g in range(first, first + self.window)}

    @property
    def skipped(self) -> int:
        return self.stream.skipped

    def batch(self, micro_step: int) -> list[Sample]:
        if micro_step != self.next:
            raise RuntimeError(f"batches are asked for in order: expected {self.next}, got {micro_step}")
        samples, bad = self.pending.pop(micro_step).result()
        self.stream.bad |= bad
        self.next += 1
        self.pending[self.next + self.window - 1] = self.pool.submit(_load_batch, self.next + self.window - 1)
        return samples

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class Components:
    pipe: Any  # a diffusers StableDiffusion(XL)Pipeline: vae, text encoder(s), tokenizer(s), unet
    image_encoder: Any  # transformers CLIPVisionModel


def load_components(recipe: TrainRecipe) -> Components:
    """The base model from local folders (never downloads)."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPVisionModel

    if recipe.pipeline is None or recipe.image_encoder is None:
        raise InputError("the recipe needs `pipeline` and `image_encoder` (local model folders, "
                         f"or `{DEFAULT_BASE}` for both: the embedded default base model)")
    if str(recipe.pipeline) == DEFAULT_BASE or str(recipe.image_encoder) == DEFAULT_BASE:
        if str(recipe.pipeline) != str(recipe.image_encoder):
            raise InputError(f"`pipeline: {DEFAULT_BASE}` and `image_encoder: {DEFAULT_BASE}` go together")
        from ..model_loading import DEFAULT_MODEL_DIR, load_base

        return Components(*load_base(DEFAULT_MODEL_DIR, panel_lora=False))  # adapters train on squares
    # load_recipe made local paths absolute: a relative one left is a hub id ("org/name")
    pipeline = model_part_dir(str(recipe.pipeline), pipeline=True)
    image_encoder = model_part_dir(str(recipe.image_encoder))
    for path in (pipeline, image_encoder):
        if not path.is_dir():
            raise ModelError(f"{path}: model folder not found")
    pipe = DiffusionPipeline.from_pretrained(str(pipeline), local_files_only=True)
    return Components(pipe, CLIPVisionModel.from_pretrained(str(image_encoder), local_files_only=True))


def trainable_groups(stage: int) -> tuple[str, ...]:
    """Adapter parts each stage trains; everything else is frozen (paper §3.4)."""
    return ("subject_qformer", "reference_net", "subject_kv", "reference_kv") if stage == 1 \
        else ("routing_qformer", "routers")


def make_adapter(recipe: TrainRecipe, components: Components) -> AnyStoryAdapter:
    if recipe.init_adapter is not None:
        adapter = load_adapter(recipe.init_adapter)
        if recipe.adapter_options:
            adapter = _rebuilt_with_options(adapter, recipe)
    else:
        torch.manual_seed(recipe.seed)  # a fresh adapter is part of the seeded run
        options = {"max_characters": 4, **recipe.adapter_options}
        adapter = AnyStoryAdapter.from_unet(components.pipe.unet, components.image_encoder.config.hidden_size,
                                            **options)
    if recipe.init_trained_groups is not None:
        copy_groups(load_adapter(recipe.init_trained_groups), adapter, trainable_groups(recipe.stage))
    return adapter


def _rebuilt_with_options(adapter: AnyStoryAdapter, recipe: TrainRecipe) -> AnyStoryAdapter:
    """`adapter` with its config changed by the recipe's adapter_options: every group whose
    weights still fit is kept; the others start fresh (seeded), and only a group this stage
    trains may do so, since a frozen group left random would be useless."""
    fields = {f.name for f in dataclasses.fields(AnyStoryConfig)}
    unknown = sorted(set(recipe.adapter_options) - fields)
    if unknown:
        raise InputError(f"adapter_options: unknown option(s) {', '.join(unknown)}")
    torch.manual_seed(recipe.seed)  # the fresh groups are part of the seeded run
    config = dataclasses.replace(adapter.spec, **recipe.adapter_options)
    rebuilt = AnyStoryAdapter.from_spec(config, reference_net=adapter.reference_net)
    for group, module in rebuilt.named_children():
        given = getattr(adapter, group).state_dict()
        if _same_layout(module.state_dict(), given):
            module.load_state_dict(given)
        elif group not in trainable_groups(recipe.stage):
            raise InputError(f"adapter_options change the adapter's {group}, which stage {recipe.stage} "
                             "does not train (it would stay random)")
    return rebuilt


def _same_layout(wanted: dict, given: dict) -> bool:
    """Whether two state dicts have the same names and shapes (`given` loads into `wanted`'s module)."""
    return wanted.keys() == given.keys() and all(wanted[k].shape == given[k].shape for k in wanted)


def copy_groups(source: AnyStoryAdapter, target: AnyStoryAdapter, groups: tuple[str, ...]) -> None:
    """Overwrite `groups` of `target` with `source`'s; ModelError if their shapes differ."""
    for group in groups:
        wanted, given = getattr(target, group).state_dict(), getattr(source, group).state_dict()
        if not _same_layout(wanted, given):
            raise ModelError(f"init_trained_groups: its {group} does not fit the adapter's")
        getattr(target, group).load_state_dict({k: v.to(wanted[k].dtype) for k, v in given.items()})


def freeze(components: Components, adapter: AnyStoryAdapter, stage: int) -> list[tuple[str, torch.nn.Parameter]]:
    """requires_grad only on the stage's groups; returns them, named, in a fixed order."""
    for module in (components.pipe.unet, components.pipe.vae, components.image_encoder,
                   getattr(components.pipe, "text_encoder", None), getattr(components.pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    adapter.requires_grad_(False).train()
    for group in trainable_groups(stage):
        getattr(adapter, group).requires_grad_(True)
    return [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# one step


class Encoders:
    """Frozen encoders of a batch: text, CLIP image features, VAE latents."""

    def __init__(self, components: Components, adapter: AnyStoryAdapter, device):
        from transformers import CLIPImageProcessorPil

        self.pipe, self.image_encoder, self.device = components.pipe, components.image_encoder, device
        config = adapter.spec
        # The pipeline's own preprocessing, so training sees what inference sees.
        self.clip_processor = CLIPImageProcessorPil(
            size={"shortest_edge": config.image_size},
            crop_size={"height": config.image_size, "width": config.image_size},
            image_mean=list(config.image_mean), image_std=list(config.image_std))
        self.is_xl = hasattr(self.pipe, "text_encoder_2")

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, dict]:
        if self.is_xl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return embeds, {"text_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return embeds, {}

    @torch.no_grad()
    def clip(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.clip_processor(images=[Image.fromarray(x) for x in images], return_tensors="pt").pixel_values
        hidden = self.image_encoder(pixel_values=pixels.to(self.device), output_hidden_states=True).hidden_states
        return hidden[-2]

    @torch.no_grad()
    def latents(self, images: list[np.ndarray], generator=None) -> torch.Tensor:
        vae = self.pipe.vae
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(self.device) / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor


def _time_ids(batch: int, size: int, device) -> torch.Tensor:
    # SDXL micro-conditioning: original size, crop offset, target size — all the square target.
    return torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)


def injection_inputs(samples: list[Sample], adapter: AnyStoryAdapter, encoders: Encoders, stage: int,
                     latent_size: tuple[int, int], drop: list[bool]) -> tuple[InjectionInputs, torch.Tensor]:
    """Subject tokens, routing features and reference features of a batch (gradients flow into
    whatever the stage trains), plus the (B, N) validity of the character entries."""
    device, size = encoders.device, adapter.config.reference_size
    n = max(len(s.references) for s in samples)
    batch = len(samples)
    refs = [s.references[i] if i < len(s.references) else None for s in samples for i in range(n)]
    zero = np.zeros((size, size, 3), np.uint8)
    # CLIP condition: the segmented reference, or the null subject (all-zero) when dropped; the
    # last row is the null subject itself, the background entry of every sample.
    clip_images = [zero if r is None or drop[k // n] else r.rgb for k, r in enumerate(refs)] + [zero]
    tokens, routing = adapter.encode_features(encoders.clip(clip_images))
    null_tokens, null_routing = tokens[-1], routing[-1]
    tokens = torch.cat([tokens[:-1].view(batch, n, *tokens.shape[1:]),
                        null_tokens.expand(batch, 1, *null_tokens.shape)], dim=1)
    routing = torch.cat([routing[:-1].view(batch, n, -1), null_routing.expand(batch, 1, -1)], dim=1)
    ref_rgb = [zero if r is None else r.rgb for r in refs]
    ref_mask = torch.from_numpy(np.stack([np.zeros((size, size), np.float32) if r is None else r.mask for r in refs]))
    latents = encoders.latents(ref_rgb)
    mask_latent = F.interpolate(ref_mask[:, None].to(device), size=latents.shape[-2:], mode="area")
    features = adapter.reference_net(latents, mask_latent, (size, size))
    valid = torch.tensor([[i < len(s.references) for i in range(n)] for s in samples], device=device)
    fixed = None
    if stage == 1:  # σ ≡ 1: every pixel routed to the one character (paper: no router in stage 1)
        fixed = torch.zeros(batch, n + 1, *latent_size, device=device)
        fixed[:, 0] = 1.0
    inputs = InjectionInputs(
        subject_tokens=tokens, routing_features=routing,
        reference_features={k: v.view(batch, n, *v.shape[1:]) for k, v in features.items()},
        entry_valid=torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1),
        latent_size=latent_size, fixed_routes=fixed, training=True,
    )
    return inputs, valid


def step_loss(samples: list[Sample], adapter, encoders: Encoders, scheduler, stage: int,
              generator: torch.Generator, drop: list[bool], character_weight: float = 0.0,
              routing_weight: float = ROUTING_LOSS_WEIGHT) -> dict[str, torch.Tensor]:
    """Diffusion loss (+ routing loss in stage 2) of one micro-batch, and "total", their sum.
    With target masks it also reports "in_characters", the plain loss inside them (not trained on:
    identity is learned there, and the whole-image loss hides it)."""
    device = encoders.device
    unet = encoders.pipe.unet
    latents = encoders.latents([s.target for s in samples], generator)
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:  # v-prediction
        target = scheduler.get_velocity(latents, noise, timesteps)
    text, added = encoders.text([s.caption for s in samples])
    if added:
        added["time_ids"] = _time_ids(batch, samples[0].target.shape[0], device)
    inputs, valid = injection_inputs(samples, adapter, encoders, stage, tuple(latents.shape[-2:]), drop)
    context = AnyStoryContext(inputs)
    pred = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added or None,
                cross_attention_kwargs={"anystory": context}).sample
    error = (pred.float() - target.float()).pow(2).mean(dim=1)  # (B, h, w)
    coverage = _character_coverage(samples, error.shape[-2:], device)
    losses = {"diffusion": weighted_mean(error, coverage, character_weight)}
    if stage == 2:
        masks = torch.from_numpy(np.stack([_pad(s.masks, valid.shape[1]) for s in samples])).to(device)
        maps = [m.float() for _, m in context.maps + context.coarse_maps]
        losses["routing"] = routing_loss(maps, masks, valid, routing_weight)
    losses["total"] = sum(losses.values())
    if coverage is not None and float(coverage.sum()) > 0:
        losses["in_characters"] = ((error * coverage).sum() / coverage.sum()).detach()
    return losses


def _character_coverage(samples: list[Sample], latent_size, device) -> torch.Tensor | None:
    """(B, h, w) share of each latent pixel covered by the target's characters; None when a
    sample has no target masks."""
    if any(len(s.masks) == 0 for s in samples):
        return None
    union = torch.from_numpy(np.stack([s.masks.sum(axis=0).clip(0, 1) for s in samples]))[:, None]
    return F.interpolate(union, size=tuple(latent_size), mode="area")[:, 0].to(device)


def weighted_mean(error: torch.Tensor, coverage: torch.Tensor | None, character_weight: float) -> torch.Tensor:
    """Mean of (B, h, w) `error` with pixel weights 1 + character_weight * coverage, normalised per
    sample (each sample counts equally, as in the plain mean). Weight 0: exactly the plain mean."""
    if character_weight == 0:
        return error.mean()
    if coverage is None:
        raise InputError("character_loss_weight > 0 needs target masks in every row")
    weights = 1.0 + character_weight * coverage
    return ((error * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))).mean()


def _pad(masks: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([masks, np.zeros((n - len(masks), *masks.shape[1:]), np.float32)])


# ---------------------------------------------------------------------------------------------
# checkpoints


ADAPTER_FILE = "adapter.safetensors"
SINGLE_FILE_STATE = "training_state.safetensors"  # the adapter's optimizer state in one safetensors file


def _adapter_weights(adapter: AnyStoryAdapter) -> WeightsFile:
    """The adapter in a checkpoint: the file AnyStoryPipeline loads, in the training dtype."""

    def load(path: Path) -> None:
        adapter.load_state_dict(load_file(str(path)))

    return WeightsFile(save=lambda path: save_adapter(adapter, path), load=load)


def _restore_single_file_state(checkpoint: Path, adapter, optimizer, lr_schedule) -> int:
    """A checkpoint of the adapter plus `training_state.safetensors` (the optimizer state flattened
    into tensors, its param_groups and the step in the metadata); returns its step."""
    from safetensors import SafetensorError, safe_open

    try:
        adapter.load_state_dict(load_file(str(checkpoint / ADAPTER_FILE)))
        with safe_open(str(checkpoint / SINGLE_FILE_STATE), framework="pt") as handle:
            meta = handle.metadata()
        state: dict[int, dict] = {}
        for name, value in load_file(str(checkpoint / SINGLE_FILE_STATE)).items():
            if name.startswith("optimizer/"):
                _, index, key = name.split("/", 2)
                state.setdefault(int(index), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        start = int(meta["step"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{checkpoint}: the checkpoint does not load ({reason}); {RESTART_HINT}") from None
    advance_schedule(lr_schedule, start)
    return start


RESTART_HINT = "`anystory train RECIPE --restart` starts the run over"


def _append_log(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log rows after the checkpoint: they are about to be recomputed."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(r + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    adapter: AnyStoryAdapter
    step: int
    losses: list[dict]  # per optimizer step of this run
    checkpoint: Path | None
    skipped: int


def check_dataset(recipe: TrainRecipe) -> set[int]:
    """Validate every row before any model is loaded: stop on a bad row, or warn and return the
    line numbers to skip (per `on_corrupt`); an empty or wholly bad dataset always stops."""
    problems = manifest_problems(recipe.data, recipe.stage, target_masks=recipe.character_loss_weight > 0)
    if not problems:
        return set()
    text = [f"{recipe.data}:{line}: {p}" if line else f"{recipe.data}: {p}" for line, p in problems]
    shown = "\n".join(text[:20]) + (f"\n... and {len(text) - 20} more" if len(text) > 20 else "")
    bad_lines = {line for line, _ in problems}
    if recipe.on_corrupt == "stop" or 0 in bad_lines or len(bad_lines) >= len(read_manifest(recipe.data)):
        raise InputError(f"{recipe.data}: the dataset has bad rows:\n{shown}")
    warnings.warn(f"{recipe.data}: {len(bad_lines)} bad row(s) skipped:\n{shown}")
    return bad_lines


def train(recipe: TrainRecipe, components: Components | Callable[[], Components] | None = None,
          accelerator=None, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Run a recipe. `components` (or a factory of them) replaces loading `pipeline` and
    `image_encoder` from disk (tests, benchmarks, callers with a pipeline in memory).

    `progress` gets plain dicts on the main process: {"event": "start", "step", "steps"}, then
    {"event": "step", "step", "steps", <losses>, "samples_per_s"} per optimizer step, and
    {"event": "checkpoint", "step", "path", "plot", "grid"} per checkpoint."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    bad_lines = check_dataset(recipe)
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    # The learning-rate schedule is a function of the optimizer step: stepped once per step on
    # every process (accelerate's default steps it once per process, and not after a skipped step).
    accelerator = accelerator or Accelerator(mixed_precision=recipe.mixed_precision,
                                             cpu=not torch.cuda.is_available(),
                                             step_scheduler_with_optimizer=False)
    if accelerator.step_scheduler_with_optimizer:
        raise InputError("train(): the accelerator must be made with step_scheduler_with_optimizer=False")
    if components is None:
        components = load_components(recipe)
    elif callable(components):
        components = components()
    device = accelerator.device
    pipe = components.pipe.to(device)
    components.image_encoder.to(device)
    adapter = make_adapter(recipe, components).to(device)
    params = freeze(components, adapter, recipe.stage)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=recipe.lr)
    # The optimizer (mixed-precision scaling) and the schedule are prepared, so save_state holds
    # them. The adapter is not wrapped in DDP: its modules run inside the UNet's attention
    # processors, never through a wrapper's forward, so gradients are averaged across processes by
    # hand in `_optimizer_step`; its weights reach the checkpoint through save/load-state hooks.
    optimizer = accelerator.prepare(optimizer)
    lr_schedule = accelerator.prepare(get_scheduler(recipe.lr_scheduler, optimizer, num_training_steps=recipe.steps,
                                                    num_warmup_steps=recipe.lr_warmup_steps))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = Encoders(components, adapter, device)
    resolution = recipe.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    stream = SampleStream(recipe, adapter.config.reference_size, resolution,
                          accelerator.process_index, accelerator.num_processes, bad_lines)
    output = recipe.output_dir
    main = accelerator.is_main_process
    report = progress if (progress is not None and main) else (lambda event: None)
    log = output / "log.jsonl"
    # The adapter, optimizer, schedule and RNG states through Accelerator.save_state / load_state.
    checkpoints = Checkpoints(output / "checkpoints", output / "latest", accelerator=accelerator,
                              weights={ADAPTER_FILE: _adapter_weights(adapter)}, keep=recipe.keep_checkpoints,
                              restart_hint=RESTART_HINT)
    try:
        start, checkpoint = _resume(recipe, checkpoints, adapter, optimizer, lr_schedule) if recipe.resume else (0, None)
    except BaseException:
        checkpoints.close()
        raise
    if checkpoint is not None:
        if main:
            _truncate_log(log, start)
    elif main:
        _prepare_output(output)
        log.unlink(missing_ok=True)
    preview = _Preview(recipe, components, adapter, params) if main else None
    history = []
    report({"event": "start", "step": start, "steps": recipe.steps})
    if recipe.loader_workers:
        stream = PrefetchingStream(stream, recipe.loader_workers, start * recipe.grad_accumulation)
    handle = install(adapter, pipe.unet)
    started, reached = time.monotonic(), start
    try:
        for step in range(start, recipe.steps):
            began = time.perf_counter()
            record = _optimizer_step(recipe, step, stream, adapter, encoders, scheduler, optimizer, params, accelerator)
            lr_schedule.step()
            samples = recipe.batch_size * recipe.grad_accumulation * accelerator.num_processes
            record["samples_per_s"] = round(samples / max(time.perf_counter() - began, 1e-9), 3)
            history.append(record)
            if main:
                _append_log(log, record)
            report({"event": "step", "steps": recipe.steps, **record})
            reached = step + 1
            out_of_time = _out_of_time(recipe, started, accelerator)
            if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps or out_of_time:
                accelerator.wait_for_everyone()
                if main:
                    checkpoint = checkpoints.save(step + 1, {"seed": recipe.seed, "stage": recipe.stage})
                    with atomic_path(output / ADAPTER_FILE) as path:  # the newest adapter, where users look
                        shutil.copyfile(checkpoint / ADAPTER_FILE, path)
                    handle.remove()  # the preview generates through the inference processors
                    try:
                        shown = preview.write(output, step + 1)
                    finally:
                        handle = install(adapter, pipe.unet)
                    report({"event": "checkpoint", "step": step + 1, "path": str(checkpoint), **shown})
                accelerator.wait_for_everyone()
            if out_of_time:
                break
    finally:
        handle.remove()
        checkpoints.close()
        if isinstance(stream, PrefetchingStream):
            stream.close()
    return TrainResult(adapter.eval(), reached, history, checkpoint, stream.skipped)


def _resume(recipe: TrainRecipe, checkpoints: Checkpoints, adapter, optimizer, lr_schedule) -> tuple[int, Path | None]:
    """(step, checkpoint) of the newest checkpoint, restored in place; (0, None) when there is none."""
    found = checkpoints.latest()
    if found is None:
        return 0, None
    if (found / SINGLE_FILE_STATE).is_file() and not (found / "run_state.json").exists():
        return _restore_single_file_state(found, adapter, optimizer, lr_schedule), found
    info = checkpoints.load(found)
    if info.get("stage") != recipe.stage:
        raise ModelError(f"{found}: a stage-{info.get('stage')} checkpoint, and the recipe trains stage "
                         f"{recipe.stage}; {RESTART_HINT}")
    return info["step"], found


def _out_of_time(recipe: TrainRecipe, started: float, accelerator) -> bool:
    """Past `max_minutes`: every process stops at the same step (the slowest one's clock decides)."""
    if recipe.max_minutes is None:
        return False
    late = time.monotonic() - started > recipe.max_minutes * 60
    if accelerator.num_processes > 1:  # a tensor only where processes must agree (a device sync)
        late = bool(accelerator.reduce(torch.tensor(float(late), device=accelerator.device), reduction="max").item())
    return late


def _prepare_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{output}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(output, os.W_OK):
        raise OutputError(f"{output}: the output folder is not writable")


class _Preview:
    """The loss plot and the sample grid of a checkpoint (main process only). A preview that
    fails (out of memory, a bad preview row) is reported in the result, never stops training."""

    def __init__(self, recipe: TrainRecipe, components: Components, adapter, params):
        self.recipe, self.components, self.adapter, self.params = recipe, components, adapter, params
        self.rows = None
        self.plot_warned = False

    def write(self, output: Path, step: int) -> dict:
        from . import report as train_report

        shown = {"plot": None, "grid": None}
        try:
            shown["plot"] = _str_or_none(train_report.plot_losses(output / "log.jsonl", output / "losses.png"))
        except AnyStoryError as exc:
            if not self.plot_warned:
                warnings.warn(f"losses.png is not drawn: {exc}")
            self.plot_warned = True
        if self.recipe.preview_count == 0:
            return shown
        if self.rows is None:
            self.rows = train_report.preview_rows(self.recipe, self.recipe.preview_count)
        was_training = self.adapter.training
        try:
            with torch.random.fork_rng(devices=[]):
                grid = train_report.preview_grid(self.components.pipe, self.components.image_encoder, self.adapter,
                                                 self.rows, self.recipe, output / "samples" / f"step-{step:07d}.png")
            shown["grid"] = _str_or_none(grid)
            if grid is not None:
                with atomic_path(output / "samples.png") as tmp:
                    shutil.copyfile(grid, tmp)
        except (InputError, RuntimeError, OSError, TypeError, ValueError) as exc:
            warnings.warn(f"step {step}: the sample grid was not written ({exc})")
        finally:
            # AnyStoryPipeline freezes the adapter for inference; give the stage its parameters back.
            self.adapter.train(was_training)
            for _, param in self.params:
                param.requires_grad_(True)
        return shown


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _optimizer_step(recipe, step, stream, adapter, encoders, scheduler, optimizer, params, accelerator) -> dict:
    """grad_accumulation micro-batches, then one AdamW step. Every random draw of micro-step g
    comes from (seed, g, process): the torch global RNG (Gumbel noise in the routers) is reseeded
    too."""
    totals: dict[str, float] = {}
    for a in range(recipe.grad_accumulation):
        micro = step * recipe.grad_accumulation + a
        sequence = np.random.SeedSequence(_seed_for(recipe.seed, micro, accelerator.process_index))
        seed = int(sequence.generate_state(1)[0])
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        samples = stream.batch(micro)
        drop_rng = np.random.default_rng(_seed_for(recipe.seed, micro, accelerator.process_index, 7))
        drop = [recipe.stage == 1 and bool(drop_rng.random() < recipe.null_subject_prob) for _ in samples]
        with accelerator.autocast():
            losses = step_loss(samples, adapter, encoders, scheduler, recipe.stage, generator, drop,
                               recipe.character_loss_weight, recipe.routing_loss_weight)
        accelerator.backward(losses["total"] / recipe.grad_accumulation)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / recipe.grad_accumulation
    if accelerator.num_processes > 1:  # data parallel: every rank steps with the mean gradient
        for _, param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = accelerator.reduce(param.grad, reduction="mean")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not all(math.isfinite(v) for v in totals.values()):
        raise ModelError(f"step {step + 1}: the loss is not finite ({totals}); lower the learning rate")
    return {"step": step + 1, **totals}
