"""Training of the default model's base components on the sprite world: VAE, CLIP, UNet.

    nice -n 10 anystory train recipes/base_vae.yaml        (recipes/train_base.sh starts them in the background)

One loop (`train`) serves the three recipes; a *task* supplies the batch loss and what to publish.
Every run is resumable: every `checkpoint_minutes` its state (fp32 weights and EMA, AdamW
moments, the learning-rate schedule, RNG states, step and elapsed time) is written into
`<state_dir>/<run>.state/step-N/` by the adapter trainer's checkpoint code
(anystory_cli/train/checkpoint.py: accelerate's state files, renamed into place whole; only the
newest is kept), and the part's fp16 subfolder of the published model folder (diffusers
`save_pretrained`) and its entry in `training_status.json` are rewritten at the same moment. Batch
contents and noise are derived from (seed, step) alone, so a resumed run draws exactly what an
uninterrupted run would have drawn, and ends with the same weights.

Order: VAE and CLIP first (they can run side by side); the UNet needs the final VAE (its latents)
and the final text tower (its conditioning). The CLIP recipe freezes and publishes the text tower
after `text_steps`, then keeps training the image tower on identity, so the UNet can start early.

A later UNet recipe can continue a finished one (`init_from_published`, its own `run_name`), for
example on more image shapes (`sizes`: the panels a comic page asks for) or on a lent GPU (`device`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..train.checkpoint import SCHEDULE_FILE, Checkpoints, WeightsFile, advance_schedule
from ..train.recipe_files import read_recipe_yaml, recipe_error
from ..errors import InputError, ModelError
from .. import default_model as bm
from .world.identity import ATTRIBUTE_CLASSES, identity_from_seed
from .world.parallel import ordered_map
from .world.rng import WorldRng, stable_hash
from .world.scenes import placeable_scene, pool_scene, random_reference, vocabulary

SINGLE_FILE_FORMAT = "anystory-base-state/1"  # the format of a single-file state
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# ---------------------------------------------------------------------------------------------
# recipes: what a person writes (pydantic, unknown keys forbidden)


def to_config(config_cls, value):
    """A recipe's mapping -> the frozen dataclass config of a model, naming unknown keys."""
    if isinstance(value, config_cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {config_cls.__name__} fields")
    known = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        return config_cls.from_dict(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: Literal["base"] = "base"  # what `anystory train` trains
    seed: int = 0
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    # The learning rate (lr_schedule): linear from 0 at step 0 to lr at warmup_steps, then a cosine
    # to lr * min_lr_ratio at `steps` (transformers' cosine_with_min_lr).
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    checkpoint_minutes: float = Field(default=5.0, gt=0)
    max_hours: float = Field(default=3.0, gt=0)  # wall-clock cap over all resumed runs together
    threads: int = Field(default=1, gt=0)
    log_every: int = Field(default=25, gt=0)
    # Processes that render scene pools (the same pools whatever the number): a GPU host's cores.
    render_workers: int = Field(default=1, gt=0)
    # Relative paths are relative to the recipe file's folder.
    assets_dir: str = "../anystory_cli/assets/default"
    state_dir: str = "../checkpoints"
    cache_dir: str = "../runs"  # rendered scene pools and encoded latents (recomputed when missing)
    # AdamW moments in the checkpoint: bfloat16 halves their size (resume then is close, not exact).
    moment_dtype: Literal["float32", "bfloat16"] = "float32"
    # Stem of the state, log and lock files (default: the model's name). A second recipe of the
    # same model, such as a continuation, needs its own: it must not resume the first one's state.
    run_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")

    @property
    def run(self) -> str:
        return self.run_name or self.model


class VaeRecipe(RecipeBase):
    model: Literal["vae"]
    vae: bm.VaeConfig = bm.VaeConfig()
    kl_weight: float = Field(default=1e-4, ge=0)
    edge_weight: float = Field(default=1.0, ge=0)  # L1 on image gradients: keeps stripes and outlines
    reference_share: float = Field(default=0.25, ge=0, le=1)  # segmented references (AnyStory's input)
    scale_batch: int = Field(default=256, gt=0)  # images used to measure the latent scale factor

    @field_validator("vae", mode="before")
    @classmethod
    def _vae_config(cls, value):
        return to_config(bm.VaeConfig, value)


class ClipRecipe(RecipeBase):
    model: Literal["clip"]
    text: bm.TextConfig = bm.TextConfig()
    vision: bm.VisionConfig = bm.VisionConfig()
    text_steps: int = Field(gt=0)  # after this the text tower is final (the UNet may start)
    # Scenes rendered once and reused (rendering costs ~25 % of a step on a busy CPU); 0 = fresh each step.
    scene_pool: int = Field(default=50_000, ge=0)
    identity_batch: int = Field(default=32, gt=1)  # identities per step, two views each
    identity_weight: float = Field(default=1.0, ge=0)
    attribute_weight: float = Field(default=1.0, ge=0)
    identity_temperature: float = Field(default=0.1, gt=0)

    @field_validator("text", mode="before")
    @classmethod
    def _text_config(cls, value):
        return to_config(bm.TextConfig, value)

    @field_validator("vision", mode="before")
    @classmethod
    def _vision_config(cls, value):
        return to_config(bm.VisionConfig, value)

    @model_validator(mode="after")
    def _text_final_before_the_end(self):
        if self.text_steps > self.steps:  # the text tower would never be final: the UNet would wait forever
            raise ValueError(f"text_steps ({self.text_steps}) must not exceed steps ({self.steps})")
        return self


class UNetRecipe(RecipeBase):
    model: Literal["unet"]
    unet: bm.UNetConfig = bm.UNetConfig()
    ema_decay: float = Field(default=0.999, gt=0, lt=1)
    caption_dropout: float = Field(default=0.1, ge=0, le=1)  # for classifier-free guidance
    pool_size: int = Field(default=50_000, gt=0)  # scenes of the shared pool, encoded once by the frozen VAE
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_steps: int = Field(default=25, gt=0)
    guidance_scale: float = Field(default=4.0, ge=1)
    # Start from the UNet published in assets_dir (its EMA weights) instead of a fresh one.
    init_from_published: bool = False
    # Image shapes trained on, [height, width] in pixels; each step's batch has one of them, drawn
    # with `size_weights`. Default: the VAE's square only. A UNet sees any shape, but draws well
    # only those it was trained on: wide and tall panels need their own.
    sizes: list[tuple[int, int]] | None = None
    size_weights: list[float] | None = None
    size_pool: int = Field(default=10_000, gt=0)  # scenes per shape other than the pool_size square
    # Train a LoRA of this rank over the frozen published UNet (default_model's panel LoRA, published
    # as anystory_panel_lora.safetensors, used for non-square panels only) instead of the UNet itself.
    panel_lora_rank: int | None = Field(default=None, gt=0)
    device: str = "auto"  # auto: cuda when there is one, so the same recipe runs on a lent GPU

    @field_validator("unet", mode="before")
    @classmethod
    def _unet_config(cls, value):
        return to_config(bm.UNetConfig, value)

    @model_validator(mode="after")
    def _consistent(self):
        if self.panel_lora_rank is not None and not self.init_from_published:
            raise ValueError("panel_lora_rank trains over the published UNet: it needs init_from_published")
        if self.init_from_published and self.run_name is None:
            raise ValueError("init_from_published needs a run_name of its own (not the published run's state)")
        if self.size_weights is not None:
            if self.sizes is None or len(self.size_weights) != len(self.sizes):
                raise ValueError("size_weights needs one weight per entry of sizes")
            if min(self.size_weights) < 0 or sum(self.size_weights) <= 0:
                raise ValueError("size_weights must be non-negative with a positive sum")
        if self.sizes is not None and any(h <= 0 or w <= 0 for h, w in self.sizes):
            raise ValueError("sizes are [height, width] in pixels, both positive")
        return self


Recipe = Annotated[Union[VaeRecipe, ClipRecipe, UNetRecipe], Field(discriminator="model")]

DEFAULT_SAMPLE_PROMPTS = (
    "one character on grass during the day , it is standing in the center",
    "one character on a beach at sunset , it is jumping on the left",
    "one character in the snow at night near a tree , it is waving on the right",
    "two characters in a forest during the day , the left one is standing , the right one is waving",
    "two characters on a hill at night near a house , the left one is jumping , the right one is standing",
    "three characters on a beach during the day near a rock , the left one is standing , "
    "the middle one is waving , the right one is jumping",
    "three characters in the snow at sunset , the left one is waving , the middle one is standing , "
    "the right one is standing",
    "four characters on grass at sunset near a tree , the left one is standing , the second one is "
    "jumping , the third one is waving , the right one is standing",
)


def parse_recipe(data: Any, source: str = "recipe"):
    """Validate a recipe mapping; InputError names the file, the field and what was expected."""
    if not isinstance(data, dict) or "model" not in data:
        raise InputError(f"{source}: a recipe is a mapping with `model: vae | clip | unet`")
    try:
        return TypeAdapter(Recipe).validate_python(data)
    except ValidationError as exc:
        # loc starts with the recipe kind ("vae", ...); empty when `model` itself is wrong.
        raise recipe_error(exc, source, skip=1) from None


def load_recipe(path: str | Path):
    """(recipe, folder that its relative paths refer to)."""
    path = Path(path)
    return parse_recipe(read_recipe_yaml(path), str(path)), path.resolve().parent


# ---------------------------------------------------------------------------------------------
# small helpers


def step_generator(recipe, step: int, salt: str = "") -> torch.Generator:
    """Randomness of one step, from (model, seed, step) only: resume draws what a run would have."""
    return torch.Generator().manual_seed(stable_hash("base-train", recipe.model, recipe.seed, step, salt) % (1 << 62))


def step_rng(recipe, step: int, salt: str = "") -> WorldRng:
    return WorldRng("base-train", recipe.model, recipe.seed, step, salt)


def lr_schedule(optimizer, recipe):
    """The recipe's learning rate per step, transformers' `cosine_with_min_lr` schedule: at step s
    below `warmup_steps` it is lr * s / warmup_steps (0 at step 0), then a cosine from lr that
    reaches lr * min_lr_ratio at `steps`. A LambdaLR stepped once after each optimizer step."""
    from transformers.optimization import get_scheduler

    return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=recipe.warmup_steps,
                         num_training_steps=recipe.steps,
                         scheduler_specific_kwargs={"min_lr_rate": recipe.min_lr_ratio})


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> the CLIP-normalised input AnyStoryPipeline gives the image encoder."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def segmented_reference(identity_seed: int, rng_seed: int, size: int) -> np.ndarray:
    """A random view of an identity, segmented exactly as AnyStoryPipeline.encode_character does."""
    from PIL import Image

    from ..masks import prepare_reference

    rgba = random_reference(identity_seed, rng_seed, size)
    return prepare_reference(Image.fromarray(rgba, "RGBA"), size=size).rgb


def scene_batch(rng: WorldRng, count: int, size: int | tuple[int, int]):
    """`count` training scenes with 1-4 characters (uniform where they fit), drawn from `rng`."""
    scenes = []
    for _ in range(count):
        seed = rng.integer(1 << 40)  # seed, then count: the order the shipped model's pools were drawn in
        scenes.append(placeable_scene(rng, seed, 1 + rng.integer(4), "train", size))
    return scenes


def scene_pool(cache_dir: Path, count: int, size: int | tuple[int, int], seed: int = 0,
               workers: int = 1) -> tuple[torch.Tensor, list[str]]:
    """`count` training scenes with 1-4 characters: uint8 (N, H, W, 3) images and captions.
    `size`: a square's side or (height, width). `workers` > 1 renders in that many processes,
    with the same result.

    Rendered once and cached on disk; the CLIP and UNet recipes share it (same seed and size)."""
    height, width = (size, size) if isinstance(size, int) else size
    shape = f"{height}" if height == width else f"{height}x{width}"  # squares keep their old file names
    path = Path(cache_dir) / f"scenes_{seed}_{count}_{shape}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            captions = json.loads(handle.metadata()["captions"])
        return load_file(str(path))["images"], captions
    rng = WorldRng("scene-pool", seed) if height == width else WorldRng("scene-pool", seed, height, width)
    jobs = []
    for _ in range(count):  # seed, then count: the order the shipped model's pools were drawn in
        scene_seed = rng.integer(1 << 40)
        jobs.append((scene_seed, 1 + rng.integer(4), (height, width)))
    with ordered_map(pool_scene, jobs, workers) as scenes:
        rendered = list(scenes)
    images = torch.from_numpy(np.stack([image for image, _ in rendered])) if rendered else \
        torch.empty((0, height, width, 3), dtype=torch.uint8)
    captions = [caption for _, caption in rendered]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, str(tmp), metadata={"captions": json.dumps(captions)})
    return images, captions


def draw_train_identities(rng: WorldRng, count: int) -> list[int]:
    from .world.identity import draw_identity_seed

    seeds: list[int] = []
    looks: set = set()
    while len(seeds) < count:
        seed = draw_identity_seed(rng, "train")
        if identity_from_seed(seed).key() not in looks:  # identical looks would be false negatives
            looks.add(identity_from_seed(seed).key())
            seeds.append(seed)
    return seeds


def image_grid(rows: list[np.ndarray], upscale: int = 3):
    """rows of uint8 (N, H, W, 3) -> one PIL image, nearest-neighbour enlarged (pixel art)."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    picture = Image.fromarray(grid)
    return picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)


def save_png(picture, path: Path) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def decode_to_uint8(vae, latents: torch.Tensor) -> np.ndarray:
    images = vae.decode(latents).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# tasks: one per recipe kind


class VaeTask:
    """L1 + image-gradient L1 + a small KL. The gradient term is why stripes and dots survive:
    plain MSE/L1 on a factor-4 latent averages 1-2 px patterns into their mean colour."""

    def __init__(self, recipe: VaeRecipe, paths: "RunPaths"):
        self.recipe, self.paths = recipe, paths
        torch.manual_seed(recipe.seed)
        self.vae = bm.build_vae(recipe.vae)
        self.modules = {"vae": self.vae}
        self.preview = self._batch(step_rng(recipe, -1, "preview"), 16)

    def _batch(self, rng: WorldRng, count: int) -> np.ndarray:
        size = self.recipe.vae.sample_size
        images = []
        for _ in range(count):
            if rng.chance(self.recipe.reference_share):
                images.append(segmented_reference(draw_train_identities(rng, 1)[0], rng.integer(1 << 40), size))
            else:
                images.append(scene_batch(rng, 1, size)[0].image)
        return np.stack(images)

    def loss(self, step: int):
        x = to_pixels(self._batch(step_rng(self.recipe, step), self.recipe.batch_size))
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=step_generator(self.recipe, step))
        y = self.vae.decode(z).sample
        l1 = (y - x).abs().mean()
        edge = _gradient_l1(y, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = l1 + self.recipe.edge_weight * edge + self.recipe.kl_weight * kl
        return loss, {"l1": l1.item(), "edge": edge.item(), "kl": kl.item()}

    @torch.no_grad()
    def scaling_factor(self) -> float:
        """1 / std of the latent means over a fixed batch: unit-variance latents for the UNet."""
        images = self._batch(step_rng(self.recipe, -2, "scale"), self.recipe.scale_batch)
        means = torch.cat([self.vae.encode(to_pixels(images[i : i + 64])).latent_dist.mean
                           for i in range(0, len(images), 64)])
        return float(1.0 / means.std())

    @torch.no_grad()
    def publish(self, step: int, final: bool) -> dict:
        self.vae.eval()
        scale = self.scaling_factor()
        config = bm.VaeConfig(**{**self.recipe.vae.to_dict(), "scaling_factor": scale})
        self.vae.register_to_config(scaling_factor=scale)
        bm.save_asset("vae", self.vae, config, self.paths.assets, status=_status(step, final))
        recon = decode_to_uint8(self.vae, self.vae.encode(to_pixels(self.preview)).latent_dist.mean)
        save_png(image_grid([self.preview[:8], recon[:8], self.preview[8:], recon[8:]]),
                 self.paths.state / "vae_reconstructions.png")
        self.vae.train()
        return {"scaling_factor": scale}


def _gradient_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return 0.5 * ((dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean())


class AttributeHeads(torch.nn.Module):
    """One linear classifier per identity attribute, reading the mean of the image tower's
    penultimate hidden states: exactly the tokens AnyStory's QFormer reads."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(classes))
                                          for name, classes in ATTRIBUTE_CLASSES.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


class ClipTask:
    """Two towers, three terms:
    - caption <-> scene InfoNCE (CLIP's loss; identical captions in a batch count as positives);
    - identity InfoNCE between two random views of the same character (different pose, facing,
      scale), other characters in the batch as negatives: same identity close, others far;
    - attribute classification from the penultimate hidden states (silhouette, colours, pattern,
      accessory, eyes), which makes identity readable exactly where the QFormer looks.
    The text tower is frozen after `text_steps`; the image tower keeps learning."""

    def __init__(self, recipe: ClipRecipe, paths: "RunPaths"):
        self.recipe, self.paths = recipe, paths
        torch.manual_seed(recipe.seed)
        self.tokenizer = bm.build_tokenizer(vocabulary())
        self.clip = bm.build_clip(recipe.text, recipe.vision, self.tokenizer)
        self.heads = AttributeHeads(recipe.vision.hidden_size)
        self.identity_projection = torch.nn.Linear(recipe.vision.hidden_size, recipe.vision.projection_dim)
        self.modules = {"clip": self.clip, "heads": self.heads, "identity_projection": self.identity_projection}
        self.size = recipe.vision.image_size
        self.pool = (scene_pool(paths.cache, recipe.scene_pool, self.size, recipe.seed, recipe.render_workers)
                     if recipe.scene_pool else None)

    def _scenes(self, step: int) -> tuple[np.ndarray, list[str]]:
        if self.pool is None:
            scenes = scene_batch(step_rng(self.recipe, step, "scenes"), self.recipe.batch_size, self.size)
            return np.stack([s.image for s in scenes]), [s.caption for s in scenes]
        images, captions = self.pool
        index = torch.randint(0, len(captions), (self.recipe.batch_size,), generator=step_generator(self.recipe, step))
        return images[index].numpy(), [captions[i] for i in index.tolist()]

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        # Padding to the longest caption: EOS pooling under a causal mask ignores what follows.
        return self.tokenizer(captions, padding="longest", return_tensors="pt").input_ids

    def _caption_loss(self, step: int):
        images, captions = self._scenes(step)
        text_frozen = step >= self.recipe.text_steps
        with torch.set_grad_enabled(not text_frozen):
            text = self.clip.text_projection(self.clip.text_model(input_ids=self._tokens(captions)).pooler_output)
        image = self.clip.visual_projection(
            self.clip.vision_model(pixel_values=clip_pixels(images)).pooler_output)
        logits = self.clip.logit_scale.exp().clamp(max=100) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        accuracy = (same[torch.arange(len(captions)), logits.argmax(dim=1)] > 0).float().mean()
        return loss, accuracy

    def _identity_loss(self, step: int):
        rng = step_rng(self.recipe, step, "identities")
        seeds = draw_train_identities(rng, self.recipe.identity_batch)
        views = [segmented_reference(s, rng.integer(1 << 40), self.size) for s in seeds for _ in range(2)]
        out = self.clip.vision_model(pixel_values=clip_pixels(np.stack(views)), output_hidden_states=True)
        embedding = F.normalize(self.identity_projection(out.pooler_output), dim=-1)
        a, b = embedding[0::2], embedding[1::2]
        logits = a @ b.T / self.recipe.identity_temperature
        labels = torch.arange(len(seeds))
        contrastive = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        logits_per_attr = self.heads(out.hidden_states[-2].mean(dim=1))
        attribute_loss, correct = 0.0, []
        for name, logits_a in logits_per_attr.items():
            target = torch.tensor([identity_from_seed(s).attributes()[name] for s in seeds for _ in range(2)])
            attribute_loss = attribute_loss + F.cross_entropy(logits_a, target, ignore_index=-1)
            valid = target >= 0
            correct.append((logits_a.argmax(dim=1)[valid] == target[valid]).float().mean())
        attribute_loss = attribute_loss / len(logits_per_attr)
        retrieval = (logits.argmax(dim=1) == labels).float().mean()
        return contrastive, attribute_loss, retrieval, torch.stack(correct).mean()

    def loss(self, step: int):
        caption, caption_acc = self._caption_loss(step)
        identity, attributes, retrieval, attr_acc = self._identity_loss(step)
        loss = caption + self.recipe.identity_weight * identity + self.recipe.attribute_weight * attributes
        return loss, {"caption": caption.item(), "caption_acc": caption_acc.item(), "identity": identity.item(),
                      "identity_acc": retrieval.item(), "attributes": attributes.item(), "attribute_acc": attr_acc.item()}

    def publish(self, step: int, final: bool) -> dict:
        text_final = step >= self.recipe.text_steps
        text = bm.build_text_encoder(self.recipe.text, self.tokenizer)
        text.load_state_dict(self.clip.text_model.state_dict())
        bm.save_asset("text_encoder", text, self.recipe.text, self.paths.assets,
                      status=_status(min(step, self.recipe.text_steps), text_final))
        image = bm.build_image_encoder(self.recipe.vision)
        image.load_state_dict(self.clip.vision_model.state_dict())
        bm.save_asset("image_encoder", image, self.recipe.vision, self.paths.assets, status=_status(step, final))
        bm.write_vocab(vocabulary(), self.paths.assets)
        return {"text_final": text_final}


class EMA:
    """Exponential moving average of a module's weights (the sampled and shipped UNet)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, source: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early, when weights move fast
        for ema, live in zip(self.module.parameters(), source.parameters()):
            if live.requires_grad:  # frozen weights (under a panel LoRA) stay as they are
                ema.lerp_(live, 1 - decay)


class UNetTask:
    """v-prediction diffusion loss on frozen-VAE latents, conditioned on the frozen text tower's
    last hidden states; 10 % of captions dropped to "" (what the pipeline's negative prompt is).
    Each step's batch comes from the pool of one image shape (`sizes`)."""

    def __init__(self, recipe: UNetRecipe, paths: "RunPaths"):
        self.recipe, self.paths = recipe, paths
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if recipe.device == "auto"
                                   else recipe.device)
        # A continuation starts from a finished UNet; once it has a state of its own, the UNet it
        # published at its last checkpoint is its own unfinished one.
        # A panel LoRA always sits on the published UNet, which it never changes.
        starts_from_published = recipe.init_from_published and (recipe.panel_lora_rank is not None
                                                                 or not paths.has_state())
        require_final(paths.assets, ("vae", "text_encoder") + (("unet",) if starts_from_published else ()))
        self.vae_config = bm.read_config("vae", paths.assets)
        self.text_config = bm.read_config("text_encoder", paths.assets)
        self.vae = bm.load_vae(paths.assets).requires_grad_(False).to(self.device)
        self.tokenizer = bm.load_tokenizer(paths.assets)
        self.text_encoder = bm.load_text_encoder(self.tokenizer, paths.assets).requires_grad_(False).to(self.device)
        torch.manual_seed(recipe.seed)
        self.unet = bm.build_unet(recipe.unet, self.vae_config, self.text_config)
        if starts_from_published:
            self.unet.load_state_dict(bm.load_unet(paths.assets).float().state_dict())
        if recipe.panel_lora_rank is not None:
            self.unet.requires_grad_(False)
            bm.add_panel_lora(self.unet, recipe.panel_lora_rank)  # only its weights train
        self.unet.to(self.device)
        self.ema = EMA(self.unet, recipe.ema_decay)
        self.modules = {"unet": self.unet, "ema": self.ema.module}
        self.scheduler = bm.build_training_scheduler()
        square = self.vae_config.sample_size
        self.sizes = [tuple(size) for size in (recipe.sizes or [(square, square)])]
        self.weights = torch.tensor(recipe.size_weights or [1.0] * len(self.sizes), dtype=torch.float64)
        if self.device.type == "cuda":  # TF32 matmuls and convolutions: a GPU's fast fp32 path; the
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # few shapes
            torch.backends.cudnn.benchmark = True  # each get their fastest kernels once
        self.empty_ids = self._token_ids([""])  # a dropped caption: what the pipeline's negative prompt is
        self.pools = [self._pool(size) for size in self.sizes]

    def _pool(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One shape's scene pool on the training device: latents encoded once (means, scaled) and
        captions tokenized once (tokenizing a batch each step held a GPU back). The latents are
        cached on disk, keyed by the VAE weights, so a resumed run does not pay for them again.
        The VAE's own square keeps the shared pool of pool_size scenes (and its cache name); other
        shapes have size_pool each."""
        square = size == (self.vae_config.sample_size,) * 2
        count = self.recipe.pool_size if square else self.recipe.size_pool
        images, captions = scene_pool(self.paths.cache, count, size[0] if square else size, self.recipe.seed,
                                      self.recipe.render_workers)
        return self._latents(images, count, size, square), self._token_ids(captions)

    def _latents(self, images: torch.Tensor, count: int, size: tuple[int, int], square: bool) -> torch.Tensor:
        vae_file = self.paths.assets / "vae" / "diffusion_pytorch_model.safetensors"
        shape = () if square else tuple(size)  # the square's key predates other shapes
        key = stable_hash("latents", self.recipe.seed, count, *shape, vae_file.read_bytes()) % (1 << 48)
        cache = self.paths.cache / f"latents_{key:012x}.safetensors"
        if cache.is_file():
            return load_file(str(cache))["latents"].float().to(self.device)
        latents = []
        with torch.no_grad():
            chunk = 512 if self.device.type == "cuda" else 64
            for start in range(0, len(images), chunk):
                pixels = to_pixels(images[start : start + chunk].numpy()).to(self.device)
                mean = self.vae.encode(pixels).latent_dist.mean
                latents.append((mean * self.vae_config.scaling_factor).half().cpu())
        latents = torch.cat(latents).contiguous()
        with atomic_path(cache) as tmp:
            save_file({"latents": latents}, str(tmp))
        return latents.float().to(self.device)

    def _token_ids(self, captions: list[str]) -> torch.Tensor:
        ids = [self.tokenizer(captions[start : start + 4096], padding="max_length", max_length=bm.MAX_PROMPT_TOKENS,
                              truncation=True, return_tensors="pt").input_ids
               for start in range(0, len(captions), 4096)]
        return torch.cat(ids).to(self.device)

    def loss(self, step: int):
        gen = step_generator(self.recipe, step)
        # one draw less with a single shape: a square-only recipe draws exactly what it always did
        shape = 0 if len(self.sizes) == 1 else int(torch.multinomial(self.weights, 1, generator=gen))
        latents, token_ids = self.pools[shape]
        index = torch.randint(0, len(token_ids), (self.recipe.batch_size,), generator=gen)
        drop = torch.rand(len(index), generator=gen) < self.recipe.caption_dropout
        index, drop = index.to(self.device), drop.to(self.device)
        x0 = latents[index]
        with torch.no_grad():
            context = self.text_encoder(torch.where(drop[:, None], self.empty_ids, token_ids[index])).last_hidden_state
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(index),), generator=gen)
        noise, t = noise.to(self.device), t.to(self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        prediction = self.unet(noisy, t, context).sample
        loss = F.mse_loss(prediction, target)
        return loss, {}

    def after_step(self, step: int) -> None:
        self.ema.update(self.unet, step)

    @torch.no_grad()
    def publish(self, step: int, final: bool) -> dict:
        if self.recipe.panel_lora_rank is not None:
            bm.save_panel_lora(self.ema.module, self.recipe.panel_lora_rank, self.paths.assets,
                               status=_status(step, final))
        else:
            bm.save_asset("unet", self.ema.module, self.recipe.unet, self.paths.assets,
                          status=_status(step, final))
        picture = self.sample_grid()
        save_png(picture, self.paths.state / f"{self.recipe.run}_samples.png")  # unet_shapes: its own
        return {}

    @torch.no_grad()
    def sample_grid(self, seeds: tuple[int, ...] = (0, 1)):
        pipe = bm.assemble_pipeline(self.vae, self.text_encoder, self.tokenizer, self.ema.module)
        height, width = self.sizes[0]  # the first shape trained on (a panel LoRA's: not the square)
        rows = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            images = pipe(self.recipe.sample_prompts, num_inference_steps=self.recipe.sample_steps,
                          guidance_scale=self.recipe.guidance_scale, generator=generator, output_type="np",
                          height=height, width=width).images
            rows.append((images * 255).round().astype(np.uint8))
        return image_grid(rows)


TASKS = {"vae": VaeTask, "clip": ClipTask, "unet": UNetTask}


def _status(step: int, final: bool) -> dict:
    return {"step": int(step), "final": bool(final)}


def asset_status(assets: Path, name: str) -> dict:
    return bm.read_status(assets, name)


def require_final(assets: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not asset_status(assets, name)["final"]:
            raise ModelError(f"{Path(assets) / name} is not final yet: the UNet trains on the "
                             f"finished VAE and text encoder (finish recipes/base_vae.yaml and base_clip.yaml)")


# ---------------------------------------------------------------------------------------------
# checkpoints


class RunPaths:
    def __init__(self, recipe, base_dir: Path):
        self.assets = (base_dir / recipe.assets_dir).resolve()
        self.state = (base_dir / recipe.state_dir).resolve()
        self.cache = (base_dir / recipe.cache_dir).resolve()
        self.checkpoints = self.state / f"{recipe.run}.state"  # step-N/ (the newest only) and `latest`
        self.single_file_state = self.state / f"{recipe.run}.state.safetensors"  # read when there is no folder
        self.log_file = self.state / f"{recipe.run}.log.jsonl"

    def has_state(self) -> bool:
        return (self.checkpoints / "latest").is_file() or self.single_file_state.is_file()


WEIGHTS_FILE = "weights.safetensors"  # every module of the task in fp32, `{module}/{parameter}`


def run_checkpoints(paths: RunPaths, modules: dict, optimizer, schedule, recipe) -> Checkpoints:
    """The run's checkpoints (anystory_cli/train/checkpoint.py): the task's modules, the AdamW
    state (moments in the recipe's moment_dtype), the learning-rate schedule (`schedule`, None: not
    saved or loaded), RNG states, and step and elapsed time."""
    hint = f"delete {paths.checkpoints} to start the run over"

    def save(path: Path) -> None:
        save_file({f"{name}/{key}": value.detach().float().cpu().contiguous().clone()
                   for name, module in modules.items() for key, value in module.state_dict().items()}, str(path))

    def load(path: Path) -> None:
        _load_modules(load_file(str(path)), modules, path, hint)

    return Checkpoints(paths.checkpoints, keep=1, optimizers=[StoredMoments(optimizer, recipe.moment_dtype)],
                       schedulers=[schedule] if schedule is not None else [],
                       weights={WEIGHTS_FILE: WeightsFile(save, load)}, restart_hint=hint)


class StoredMoments:
    """An optimizer as a checkpoint stores it: AdamW's moments in `dtype` (bfloat16 halves the
    state; resume is then close, not exact), back in the parameters' dtype when loaded."""

    def __init__(self, optimizer, dtype: str):
        self.optimizer, self.dtype = optimizer, getattr(torch, dtype)

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        return {"param_groups": state["param_groups"],
                "state": {index: {key: value if key == "step" else value.to(self.dtype) for key, value in entry.items()}
                          for index, entry in state["state"].items()}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict({
            "param_groups": state["param_groups"],
            "state": {index: {key: value if key == "step" else value.float() for key, value in entry.items()}
                      for index, entry in state["state"].items()}})


def _load_modules(tensors: dict, modules: dict, path: Path, hint: str) -> None:
    for name, module in modules.items():
        prefix = f"{name}/"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path}: does not match this recipe's model ({str(exc).splitlines()[0]}); {hint}") from None


def resume(checkpoints: Checkpoints, paths: RunPaths, modules: dict, optimizer, schedule,
           recipe) -> tuple[int, float]:
    """Restore weights, optimizer, learning-rate schedule and RNG in place from the run's newest
    checkpoint (or its single state file); (step, elapsed seconds), (0, 0) when it has neither.
    A state without the schedule's file has the fresh schedule stepped to its step."""
    found = checkpoints.latest()
    if found is not None:
        saved_schedule = (found / SCHEDULE_FILE).is_file()
        loader = checkpoints if saved_schedule else run_checkpoints(paths, modules, optimizer, None, recipe)
        info = loader.load(found)
        if info.get("model") != recipe.model:
            raise ModelError(f"{found}: a checkpoint of the {info.get('model')} model, and the recipe trains the "
                             f"{recipe.model}; {checkpoints.restart_hint}")
        step, elapsed = info["step"], float(info["elapsed"])
    elif paths.single_file_state.is_file():
        step, elapsed = _load_single_file_state(paths.single_file_state, modules, optimizer)
        saved_schedule = False
    else:
        return 0, 0.0
    if not saved_schedule:
        advance_schedule(schedule, step)
    return step, elapsed


def _load_single_file_state(path: Path, modules: dict, optimizer) -> tuple[int, float]:
    """A state in one safetensors file: `{module}/{parameter}` weights, `optim/{index}/{key}` AdamW
    state, `rng/torch`, with step, elapsed time and the param_groups in the metadata."""
    hint = f"delete {path} to start the run over"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SINGLE_FILE_FORMAT:
        raise ModelError(f"{path}: not a base-model training state; {hint}")
    tensors = load_file(str(path))
    _load_modules(tensors, modules, path, hint)
    optim_state: dict = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value.float() if name != "step" else value
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(tensors["rng/torch"])
    return int(metadata["step"]), float(metadata["elapsed"])


# ---------------------------------------------------------------------------------------------
# the loop


@contextlib.contextmanager
def run_lock(path: Path):
    """One process per recipe: two writers would overwrite each other's checkpoints. A second
    process on the same lock file fails at once, naming the holder's pid. The lock is filelock's
    (an OS lock on the file, released when its process ends, even by a crash); the file stays."""
    from filelock import FileLock, Timeout

    lock = FileLock(path, blocking=False, on_acquired=_write_pid)
    try:
        lock.acquire()
    except Timeout:
        try:
            pid = path.read_text(errors="replace").strip()
        except OSError:  # gone, or not readable while locked (Windows)
            pid = ""
        holder = f"process {pid}" if pid.isdigit() else "another process"
        raise InputError(f"{path}: {holder} is already training this recipe") from None
    try:
        yield
    finally:
        lock.release()


def _write_pid(fd: int) -> None:
    """The lock file's content while held: the holder's pid, for the refusal above."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, str(os.getpid()).encode())


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.raised = False

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, lambda *_: setattr(self, "raised", True))
            except ValueError:  # not in the main thread (e.g. under some test runners)
                pass


def train(recipe, base_dir: str | Path = ".", max_steps: int | None = None, max_minutes: float | None = None,
          log: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) one recipe until its last step, the time cap, `max_steps` more steps in
    this call, or `max_minutes` in this call. Returns the last log record."""
    torch.set_num_threads(recipe.threads)
    paths = RunPaths(recipe, Path(base_dir))
    paths.state.mkdir(parents=True, exist_ok=True)
    with run_lock(paths.state / f"{recipe.run}.lock"):
        return _train(recipe, paths, max_steps, max_minutes, log)


def _train(recipe, paths: "RunPaths", max_steps, max_minutes, log) -> dict:
    task = TASKS[recipe.model](recipe, paths)
    # Frozen weights are not optimised: EMA copies, and a panel LoRA's UNet under it.
    parameters = [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    schedule = lr_schedule(optimizer, recipe)
    checkpoints = run_checkpoints(paths, task.modules, optimizer, schedule, recipe)
    step, elapsed = resume(checkpoints, paths, task.modules, optimizer, schedule, recipe)
    log = log or (lambda record: print(json.dumps(record), flush=True))
    record = {"model": recipe.model, "step": step, "event": "resume" if step else "start"}
    log(record)
    stop = _StopFlag()
    stop.install()
    started = last_checkpoint = time.monotonic()
    steps_here = 0
    sums: dict[str, float] = {}

    def checkpoint(final: bool) -> dict:
        nonlocal last_checkpoint
        total = elapsed + time.monotonic() - started
        checkpoints.save(step, {"model": recipe.model, "elapsed": total, "recipe": recipe.model_dump(mode="json")})
        info = task.publish(step, final)
        last_checkpoint = time.monotonic()
        entry = {"model": recipe.model, "step": step, "event": "checkpoint", "final": final,
                 "hours": round(total / 3600, 3), **info}
        _append_log(paths.log_file, entry)
        log(entry)
        return entry

    def out_of_time() -> bool:
        now = time.monotonic()
        return (elapsed + now - started > recipe.max_hours * 3600
                or (max_minutes is not None and now - started > max_minutes * 60))

    while step < recipe.steps and not stop.raised and not out_of_time():
        if max_steps is not None and steps_here >= max_steps:
            break
        lr = optimizer.param_groups[0]["lr"]  # the schedule's value at `step`
        tick = time.perf_counter()
        loss, parts = task.loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        optimizer.step()
        schedule.step()
        if hasattr(task, "after_step"):
            task.after_step(step)
        step += 1
        steps_here += 1
        for key, value in {"steps": 1, "loss": loss.item(), "seconds": time.perf_counter() - tick, **parts}.items():
            sums[key] = sums.get(key, 0.0) + value
        if step % recipe.log_every == 0:
            count = sums.pop("steps")  # fewer than log_every right after a resume
            record = {"model": recipe.model, "step": step, "lr": round(lr, 7),
                      **{k: round(v / count, 5) for k, v in sums.items()}}
            sums = {}
            _append_log(paths.log_file, record)
            log(record)
        if time.monotonic() - last_checkpoint > recipe.checkpoint_minutes * 60:
            checkpoint(final=False)
    if steps_here or step >= recipe.steps:
        record = checkpoint(final=step >= recipe.steps)
    return record


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
