"""The story's model, loaded once and only when something must be drawn, and what a render
asks of it before drawing (fits the panels, knows the words, the panel size, the noise seed).

torch is reached only through the pipeline object (and a torch.Generator for the seed)."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AnyStoryError, ModelError, StoryError
from ..plan import PanelPlan
from ..story import Story
from .events import ProgressEvent


def memoize_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    """A factory that loads each model value once per memory plan (many stories, one process).
    The plan (flux.memory.Plan) reaches `factory` as plan=, only when there is one."""
    loaded: dict[tuple, Any] = {}

    def memoized(model: str, story_dir: Path, plan=None):
        # Story values are absolute paths or "default" (story.py resolves them): one key each.
        key = (model, plan)
        if key not in loaded:
            loaded[key] = factory(model, story_dir) if plan is None else factory(model, story_dir, plan=plan)
        return loaded[key]

    return memoized


def _default_factory(model: str, story_dir: Path, runtime=None, plan=None):
    from ..model_loading import load_pipeline

    return load_pipeline(model, story_dir, runtime=runtime, plan=plan)


def story_loras(story: Story, story_dir: Path, source: str) -> tuple[list[tuple[Path, float, str]], list[str]]:
    """The style LoRAs a story draws with, (file, scale, sha256) each (a LoRA at scale 0 is left
    out), and one key per `style.loras` entry for the panels' content keys."""
    from ..loras import lora_fingerprint, resolve_lora

    used, keys = [], []
    for index, lora in enumerate(story.style.loras):
        if lora.scale == 0:
            keys.append("")
            continue
        try:
            file = resolve_lora(lora.path, story_dir)
        except AnyStoryError as exc:
            raise type(exc)(f"{source}: style.loras[{index}]: {exc}") from None
        digest = lora_fingerprint(file)
        used.append((file, lora.scale, digest))
        keys.append(digest)
    return used, keys


@contextlib.contextmanager
def style_loras_on(pipeline, loras: Sequence[tuple[Path, float, str]], source: str, warn):
    """The story's style LoRAs on the pipeline while the panels are drawn; removed after, also
    on an error or an interrupt (the model's own adapters stay)."""
    if not loras:
        yield
        return
    styles = getattr(pipeline, "style_loras", None)
    if styles is None:
        raise ModelError(f"{source}: style.loras: this model ({type(pipeline).__name__}) does not take style "
                         f"LoRAs; remove style.loras")
    said = styles.warn
    styles.warn = lambda message: warn(f"{source}: {message}")
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(styles.applied([(file, scale) for file, scale, _ in loras]))
            except AnyStoryError as exc:
                raise type(exc)(f"{source}: style.loras: {exc}") from None
            yield
    finally:
        styles.warn = said


def prompts_encoded(pipeline, prompts: Sequence[str]):
    """Every panel's prompt encoded before the first panel is drawn, where the pipeline does that
    (FLUX: its text encoders can then leave the device, as the memory plan says)."""
    encode = getattr(pipeline, "prompts_encoded", None)
    return encode(prompts) if encode is not None else contextlib.nullcontext()


class Model:
    """The story's model: its key for content keys, and the pipeline on first use.

    With the default loader the key is a fingerprint of the model files, so an unchanged story
    is checked without loading any weights. A custom factory without a fingerprint function is
    loaded at once and keyed by its pipeline's `model_id`. `plan` (a FLUX memory plan,
    flux.memory.Plan): what the factory loads with (given as plan=); quantized weights are in the
    key, as they are in the loaded pipeline's `model_id` (flux.memory.weights_id).
    """

    def __init__(self, value: str, story_dir: Path, factory, fingerprint, source: str, emit, cache_dir=None,
                 runtime=None, named_by: str = "model", plan=None):
        self.value, self.story_dir, self.source, self.emit = value, story_dir, source, emit
        self.named_by = named_by  # what errors say named it: the story's `model`, or `--model`
        self.factory = factory or functools.partial(_default_factory, runtime=runtime)
        self.plan = plan
        if fingerprint is None and factory is None:
            from ..model_loading import model_fingerprint

            def fingerprint(model, folder):  # large files' hashes are kept in the cache folder
                return model_fingerprint(model, folder, cache_dir=cache_dir)
        self._pipeline = None
        self.load_seconds = 0.0
        if fingerprint is not None:
            from ..flux.memory import weights_id

            self.key = weights_id(self._guard(lambda: fingerprint(value, story_dir)), plan)
        else:
            self.key = self.pipeline.model_id
        from ..model_loading import model_defaults

        # the model's recommended sampling settings, read without loading it (build_plan)
        self.defaults = self._guard(lambda: model_defaults(value, story_dir))

    def _guard(self, call):
        try:
            return call()
        except AnyStoryError as exc:
            raise type(exc)(f"{self.source}: {self.named_by}: {exc}") from None

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def pipeline(self):
        if self._pipeline is None:
            self.emit(ProgressEvent("model", f"loading model {self.value}"))
            start = time.perf_counter()
            plan = {} if self.plan is None else {"plan": self.plan}
            self._pipeline = self._guard(lambda: self.factory(self.value, self.story_dir, **plan))
            self.load_seconds = time.perf_counter() - start
        return self._pipeline


def image_size(pipeline, multipliers: tuple[float, float], resolution: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels: native size times the multipliers, on the UNet's grid; with
    `resolution`, the long side is that many pixels. A pipeline may size its images itself."""
    if hasattr(pipeline, "image_size"):
        return pipeline.image_size(multipliers, resolution)
    scale = pipeline.vae_scale_factor
    native = pipeline.unet.config.sample_size * scale
    if resolution is not None:
        native = resolution / max(multipliers)
    # A UNet halves the latent once per down block but the last: sizes must divide by that, and
    # by 8, the base pipeline's own check.
    step = math.lcm(8, scale * 2 ** (len(pipeline.unet.config.block_out_channels) - 1))
    return tuple(max(step, int(round(native * m / step)) * step) for m in multipliers)  # type: ignore[return-value]


def generator(seed: int):
    import torch

    # A CPU generator: the same seed gives the same noise on every device.
    return torch.Generator("cpu").manual_seed(int(seed))


def check_model_fits(pipeline, plans: Sequence[PanelPlan], source: str) -> None:
    limit = pipeline.max_characters
    for plan in plans:
        if len(plan.characters) > limit:
            raise StoryError(f"{source}: panels[{plan.index}].characters: {len(plan.characters)} "
                             f"characters, but the model supports at most {limit} per panel")


def warn_unknown_words(story: Story, pipeline, plans: Sequence[PanelPlan], source: str, emit) -> None:
    """The embedded default model knows only its world's words (one token each); any other word
    reaches it as meaningless pieces. Say which, once per panel, instead of dropping them
    silently. Real CLIP tokenizers split any text into known pieces, so other models are not
    checked."""
    from ..model_loading import DEFAULT_MODEL, unknown_words

    if story.model != DEFAULT_MODEL:
        return

    for plan in plans:
        unknown = unknown_words(pipeline.tokenizer, plan.prompt)
        if unknown:
            emit(ProgressEvent("warning", f"{source}: panels[{plan.index}].prompt: the default model does not "
                               f"know {', '.join(repr(w) for w in unknown)}; it draws the rest "
                               "(`python -c 'import anystory_cli.lab.world as w; print(w.vocabulary())'` lists its words)"))
