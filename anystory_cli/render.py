"""From a story file to comic pages: the orchestration around the real AnyStoryPipeline.

    load + validate story -> plan panels -> (load model once) -> encode characters once (cache)
    -> draw the panels that are not up to date -> compose pages -> PNG pages, PDF, CBZ

What is kept in the output folder::

    panels/panel-001.png        each panel image; its content key in the PNG text "anystory:key"
    panels/panel-001-routing.png/.npy   with save_routing: overlay and soft maps (N+1, H, W)
    pages/page-001.png          each page; its page key in the PNG text
    characters/<name>.png       the generated sheet of a text-only character (alpha = its mask)
    <story>.pdf, <story>.cbz    written once every page is complete
    .anystory/routing/<key>.png routing maps of each panel, for balloon placement on re-runs
    .anystory/exports.json      keys and sha256 of the PDF and CBZ

A panel whose stored key equals its content key (prompt, characters and their reference bytes,
seed, steps, strengths, model, frame shape) is not drawn again, and a page or export whose key is
unchanged is not written again: re-running an unchanged story writes nothing, and a run that
failed or was interrupted continues from the complete files. Every file is written to a
temporary name and renamed, so a failure never leaves a half-written file or destroys an earlier
one.

`--pages` / `--panels` choose which panels are drawn. Every page whose panels are all up to date
is composed; the PDF and CBZ are written once every page is.

Scale and faults:

- Several stories in one process share the loaded model (`memoize_factory`) and the character
  cache, so a character with the same image is encoded once.
- Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) the processes join one gloo process
  group; rank 0's list of panels to draw is shared, rank r draws panels r, r + W, r + 2W, ...
  of it, and rank 0 composes the pages and exports once every rank has finished. Each panel is
  drawn from its own seed, and pages are composed from the stored panels and routing maps (the
  maps as stored, also in one process), so the result is the same bytes as in one process.
- Inside `stop_on_signals()` (the CLI uses it), SIGINT or SIGTERM stop the render at the next
  denoising step, character, panel or page with `Interrupted` (exit code 128 + signal), which
  says what was finished; nothing is half-written and a re-run continues.
- Every output is written inside the output folder: a sub-folder that is a symbolic link leading
  out of it is refused (`atomic.check_within`), and nothing outside it is pruned.

A text-only character (a description, no image) gets a character sheet: the pipeline draws the
description alone (no characters) on a plain background, the sheet is segmented by its
background colours (`characters.segment_sheet`: the largest part far from each row's border
colours is the character, so the default model's sheets, scenes of sky and ground, segment too;
without a clear background, the central box, with a warning, and no figure to paste), and the
sheet is encoded like a reference image. Sheet and encoding are cached.

torch is reached only through the pipeline object (and a torch.Generator for the seed).
Progress goes to a callback as plain `ProgressEvent`s; nothing here prints.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .atomic import TEMP_SUFFIX, check_within
from .cache import EncodingCache, description_key, reference_key
from .characters import segment_sheet
from .errors import AnyStoryError, InputError, ModelError, OutputError, StoryError
from . import fonts
from .export import atomic_write, ensure_dir, write_cbz, write_pdf, write_png
from .layout import PageSpec, PanelText, compose_page, panel_rects
from .masks import load_image
from .plan import PagePlan, PanelPlan, build_plan, character_fingerprints, group_pages
from .story import Story, load_story, story_error

KEY_TEXT = "anystory:key"  # PNG text chunk holding a panel's or page's key
STATE_DIR = ".anystory"
# Bump when drawing or composing changes, so that earlier outputs are not reused.
RENDER_KEY_VERSION = 1
PAGE_KEY_VERSION = 1
# Part of the PDF/CBZ key: raise it when the same pages give other file bytes (a new writer).
EXPORT_FORMAT = 2
SHEET_VERSION = 3  # 2: a sheet cut out by its central box carries no figure; 3: row-wise backgrounds
# Image shapes: the model's native square, widened or heightened to the frame's shape in
# quarter steps (a 2.1:1 wide panel is drawn at 2:1, not cropped out of a square).
ASPECT_STEP = 0.25
MAX_ASPECT = 2.0
SHEET_PROMPT = "{description}, standing, plain background"


# --------------------------------------------------------------------------------------------
# Plain values: events and the summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """kind: story | model | character | panel | step | panel_done | page | export | note |
    warning | done. `current`/`total` count: panels to draw (story, panel: before it starts,
    panel_done: after), denoising steps (step), characters (character), pages (page)."""

    kind: str
    message: str = ""
    current: int = 0
    total: int = 0


@dataclass
class RenderSummary:
    story: str
    out_dir: str
    title: str = ""
    files_written: list[str] = field(default_factory=list)
    panels_rendered: list[int] = field(default_factory=list)  # 1-based panel numbers
    panels_skipped: list[int] = field(default_factory=list)  # up to date
    pages_written: list[int] = field(default_factory=list)
    pages_skipped: list[int] = field(default_factory=list)  # up to date
    pages_incomplete: list[int] = field(default_factory=list)  # a panel is not drawn yet
    exports_written: list[str] = field(default_factory=list)
    characters_encoded: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_rebuilt: int = 0
    model_loaded: bool = False
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype, offload
    loras: list[dict[str, Any]] = field(default_factory=list)  # path, scale, sha256 of each used
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        """Nothing was drawn or written: the output already matched the story."""
        return not self.panels_rendered and not self.files_written

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["up_to_date"] = self.up_to_date
        data["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return data


class _Clock:
    """Accumulates seconds per stage: `with clock("render"): ...`."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Checks that need no model: `anystory validate` and the start of every render
# --------------------------------------------------------------------------------------------


def lettering_problems(story: Story, source: str) -> list[str]:
    """Captions and dialogue no lettering font can draw, one line each (`fonts`)."""
    return fonts.lettering_problems(story, source)


def layout_problems(story: Story, source: str) -> list[str]:
    """Pages whose panels do not fit (too many panels for the page size)."""
    plans = build_plan(story)
    problems = []
    for page in group_pages(plans):
        try:
            panel_rects(PageSpec.from_settings(story.page, page.rows))
        except InputError as exc:
            problems.append(f"{source}: page: page {page.index + 1}: {exc}")
    return problems


def story_problems(path: str | os.PathLike[str]) -> list[str]:
    """Every problem of a story file that can be found without a model, one line each.

    A `model:` path is checked for the documented folder layout; `model: default` is not (it
    depends on the build, not on the story; `render` says so if it is missing)."""
    source = str(path)
    try:
        story = load_story(path)
    except StoryError as exc:
        return list(getattr(exc, "problems", [str(exc)]))
    problems = lettering_problems(story, source) + layout_problems(story, source)
    if story.model != "default":
        from .model_loading import check_model_dir

        try:
            if isinstance(story.model, str):
                check_model_dir(Path(story.model))
            else:
                from .flux.folders import check_flux_model

                check_flux_model(story.model.base, story.model.redux, story.model.adapter)
        except AnyStoryError as exc:
            problems.append(f"{source}: model: {exc}")
    return problems


def check_story(path: str | os.PathLike[str]) -> Story:
    """The validated story; StoryError listing every problem otherwise."""
    story = load_story(path)
    problems = lettering_problems(story, str(path)) + layout_problems(story, str(path))
    if problems:
        raise story_error(problems)
    return story


# --------------------------------------------------------------------------------------------
# Selection: --pages 1-2, --panels 1,3-4
# --------------------------------------------------------------------------------------------


def parse_ranges(text: str) -> list[int]:
    """'1,3-4' -> [1, 3, 4] (1-based, sorted, unique); InputError if malformed."""
    numbers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise InputError(f"{text!r}: expected numbers and ranges such as 1,3-4")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if low < 1 or high < low:
            raise InputError(f"{text!r}: ranges count from 1 and go upwards, got {part!r}")
        numbers.update(range(low, high + 1))
    return sorted(numbers)


def select_panels(
    plans: Sequence[PanelPlan], pages: Iterable[int] | None, panels: Iterable[int] | None
) -> set[int]:
    """Story panel indices (0-based) chosen by 1-based page and panel numbers (their union)."""
    if pages is None and panels is None:
        return {plan.index for plan in plans}
    page_count = max(plan.page for plan in plans) + 1
    chosen: set[int] = set()
    for number in pages or ():
        if not 1 <= number <= page_count:
            raise InputError(f"--pages {number}: the story has {page_count} page(s)")
        chosen.update(plan.index for plan in plans if plan.page == number - 1)
    for number in panels or ():
        if not 1 <= number <= len(plans):
            raise InputError(f"--panels {number}: the story has {len(plans)} panel(s)")
        chosen.add(number - 1)
    return chosen


# --------------------------------------------------------------------------------------------
# The model, loaded once and only when something must be drawn
# --------------------------------------------------------------------------------------------


def memoize_factory(factory: Callable[[str, Path], Any]) -> Callable[[str, Path], Any]:
    """A factory that loads each model value once (many stories, one process)."""
    loaded: dict[str, Any] = {}

    def memoized(model: str, story_dir: Path):
        # Story values are absolute paths or "default" (story.py resolves them): one key each.
        if model not in loaded:
            loaded[model] = factory(model, story_dir)
        return loaded[model]

    return memoized


def _default_factory(model: str, story_dir: Path, runtime=None):
    from .model_loading import load_pipeline

    return load_pipeline(model, story_dir, runtime=runtime)


def _story_loras(story: Story, story_dir: Path, source: str) -> tuple[list[tuple[Path, float, str]], list[str]]:
    """The style LoRAs a story draws with, (file, scale, sha256) each (a LoRA at scale 0 is left
    out), and one key per `style.loras` entry for the panels' content keys."""
    from .loras import lora_fingerprint, resolve_lora

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
def _style_loras_on(pipeline, loras: Sequence[tuple[Path, float, str]], source: str, warn):
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


class _Model:
    """The story's model: its key for content keys, and the pipeline on first use.

    With the default loader the key is a fingerprint of the model files, so an unchanged story
    is checked without loading any weights. A custom factory without a fingerprint function is
    loaded at once and keyed by its pipeline's `model_id`.
    """

    def __init__(self, value: str, story_dir: Path, factory, fingerprint, source: str, emit, cache_dir=None,
                 runtime=None):
        self.value, self.story_dir, self.source, self.emit = value, story_dir, source, emit
        self.factory = factory or functools.partial(_default_factory, runtime=runtime)
        if fingerprint is None and factory is None:
            from .model_loading import model_fingerprint

            def fingerprint(model, folder):  # large files' hashes are kept in the cache folder
                return model_fingerprint(model, folder, cache_dir=cache_dir)
        self._pipeline = None
        self.load_seconds = 0.0
        if fingerprint is not None:
            self.key = self._guard(lambda: fingerprint(value, story_dir))
        else:
            self.key = self.pipeline.model_id

    def _guard(self, call):
        try:
            return call()
        except AnyStoryError as exc:
            raise type(exc)(f"{self.source}: model: {exc}") from None

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def pipeline(self):
        if self._pipeline is None:
            self.emit(ProgressEvent("model", f"loading model {self.value}"))
            start = time.perf_counter()
            self._pipeline = self._guard(lambda: self.factory(self.value, self.story_dir))
            self.load_seconds = time.perf_counter() - start
        return self._pipeline


# --------------------------------------------------------------------------------------------
# Keys, frames, stored files
# --------------------------------------------------------------------------------------------


def _sha256(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def frame_sizes(story: Story, pages: Sequence[PagePlan]) -> dict[int, tuple[int, int]]:
    """Panel index -> its frame (width, height) in page pixels."""
    sizes = {}
    for page in pages:
        rects = panel_rects(PageSpec.from_settings(story.page, page.rows))
        for index, rect in zip(page.panels, rects):
            sizes[index] = (rect[2] - rect[0], rect[3] - rect[1])
    return sizes


def aspect_multipliers(frame: tuple[int, int]) -> tuple[float, float]:
    """(width, height) multiples of the model's native square for a frame of this shape."""
    ratio = frame[0] / frame[1]
    stretch = min(MAX_ASPECT, max(1.0, round(max(ratio, 1 / ratio) / ASPECT_STEP) * ASPECT_STEP))
    return (stretch, 1.0) if ratio >= 1 else (1.0, stretch)


def _image_size(pipeline, multipliers: tuple[float, float], resolution: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels: native size times the multipliers, on the UNet's grid; with
    `resolution`, the long side is that many pixels. A pipeline may size its images itself."""
    if hasattr(pipeline, "image_size"):
        return pipeline.image_size(multipliers, resolution)
    base = pipeline.base
    scale = base.vae_scale_factor
    native = base.unet.config.sample_size * scale
    if resolution is not None:
        native = resolution / max(multipliers)
    # A UNet halves the latent once per down block but the last: sizes must divide by that.
    step = scale * 2 ** (len(base.unet.config.block_out_channels) - 1)
    return tuple(max(step, int(round(native * m / step)) * step) for m in multipliers)  # type: ignore[return-value]


def _stored_key(path: Path) -> str | None:
    """The key in a PNG's text chunk, or None when the file is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: a truncated file is not up to date
            return image.text.get(KEY_TEXT)  # type: ignore[attr-defined]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _write_png(image: Image.Image, path: Path, key: str, dpi: int | None = None,
               within: Path | None = None) -> Path:
    return write_png(image, path, dpi, {KEY_TEXT: key}, within)


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _panel_path(out: Path, index: int, suffix: str = "") -> Path:
    return out / "panels" / f"panel-{index + 1:03d}{suffix}.png"


# Routing maps are kept as a grey PNG, entries stacked vertically, 0..255: safe to read
# (no pickle), compressed, and exact enough for balloon placement and overlays.


def _routing_path(out: Path, key: str) -> Path:
    return out / STATE_DIR / "routing" / f"{key}.png"


def _routing_bytes(maps: np.ndarray) -> np.ndarray:
    return np.clip(maps * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _as_stored(maps: np.ndarray) -> np.ndarray:
    """The maps exactly as `_read_routing` gives them back: what every page is composed from,
    whether its panels were drawn in this process, in another, or in an earlier run."""
    return _routing_bytes(maps).astype(np.float32) / 255.0


def _write_routing(maps: np.ndarray, path: Path, key: str, out: Path) -> None:
    entries, height, width = maps.shape
    stacked = _routing_bytes(maps).reshape(entries * height, width)
    _write_png(Image.fromarray(stacked, "L"), path, key, within=out)


def _read_routing(path: Path, key: str, entries: int) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            if image.text.get(KEY_TEXT) != key or image.mode != "L":  # type: ignore[attr-defined]
                return None
            stacked = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError):
        return None
    if stacked.shape[0] % entries:
        return None
    return stacked.reshape(entries, stacked.shape[0] // entries, stacked.shape[1])


ROUTING_COLOURS = [(230, 60, 60), (60, 110, 230), (60, 190, 80), (240, 200, 40), (190, 80, 220),
                   (40, 200, 210)]


def routing_overlay(image: Image.Image, maps: np.ndarray) -> Image.Image:
    """The panel with each pixel tinted by the character it is routed to (background untinted)."""
    size = (maps.shape[2], maps.shape[1])
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    winner = maps.argmax(axis=0)
    tint = base.copy()
    for entry in range(maps.shape[0] - 1):
        colour = np.array(ROUTING_COLOURS[entry % len(ROUTING_COLOURS)], np.float32)
        tint[winner == entry] = 0.45 * base[winner == entry] + 0.55 * colour
    return Image.fromarray(np.clip(tint + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Characters
# --------------------------------------------------------------------------------------------


def sheet_settings(story: Story, name: str, sheet_seed: int, steps: int | None) -> dict[str, Any]:
    """How a text-only character's sheet is drawn and cut out: its cache key's values."""
    style = story.style
    description = story.characters[name].description or ""
    prompt = ", ".join(p.strip() for p in (style.prompt_prefix, SHEET_PROMPT.format(
        description=description.strip())) if p.strip())
    seed = int.from_bytes(hashlib.sha256(f"anystory/sheet/{sheet_seed}/{name}".encode()).digest()[:4], "big")
    return {"version": SHEET_VERSION, "prompt": prompt, "negative_prompt": style.negative_prompt,
            "seed": seed, "steps": steps or style.steps, "guidance": style.guidance,
            "guidance_interval": list(style.guidance_interval)}


def character_keys(story: Story, sheet_seed: int, steps: int | None) -> dict[str, str]:
    """What each character's encoding depends on, for the panels' content keys: its files and
    description, and for a text-only character also how its sheet is drawn and cut out (a new
    segmentation or story seed gives it another encoding, so its panels are redrawn)."""
    keys = character_fingerprints(story)
    for name, character in story.characters.items():
        if character.image is None:
            settings = json.dumps(sheet_settings(story, name, sheet_seed, steps), sort_keys=True)
            keys[name] = hashlib.sha256(f"{keys[name]}|{settings}".encode()).hexdigest()
    return keys


def _character_label(name: str, mirrored: bool) -> str:
    """How progress and the summary name an encoding: 'mira', or 'mira (mirrored)'."""
    return f"{name} (mirrored)" if mirrored else name


class _Characters:
    """Each character encoded at most once per render, through the disk cache."""

    def __init__(self, story: Story, source: str, model: _Model, cache_dir, sheet_seed: int,
                 steps: int | None, summary: RenderSummary, out: Path, emit):
        self.story, self.source, self.model = story, source, model
        self.sheet_seed, self.steps, self.summary, self.out, self.emit = sheet_seed, steps, summary, out, emit
        self.cache = EncodingCache(cache_dir, on_warning=self._warn)
        self.encodings: dict[tuple[str, bool], Any] = {}  # by (name, mirrored)
        self.stop: Callable[[], None] = lambda: None

    def encode_all(self, needed: Sequence[tuple[str, bool]], stop: Callable[[], None] = lambda: None) -> None:
        """Encode each (name, mirrored) once, from the cache when it can."""
        self.stop = stop
        for number, (name, mirrored) in enumerate(needed, start=1):
            stop()
            if (name, mirrored) not in self.encodings:
                self.encodings[name, mirrored], how = self._encode(name, mirrored)
                self.emit(ProgressEvent("character", f"{_character_label(name, mirrored)}: {how}", number,
                                        len(needed)))

    def _encode(self, name: str, mirrored: bool):
        character = self.story.characters[name]
        pipeline = self.model.pipeline
        if character.image is not None:
            key = reference_key(character.image.read_bytes(), character.mask.read_bytes() if character.mask else None,
                                pipeline.model_id, mirrored)
            result = self.cache.get_or_encode(key, pipeline.model_id, lambda: self._from_image(name, mirrored))
        else:
            settings = sheet_settings(self.story, name, self.sheet_seed, self.steps)
            description = character.description or ""
            # The sheet is the same either way (it is published unmirrored, under its own key).
            sheet_key = description_key(description, settings, pipeline.model_id)
            key = description_key(description, settings, pipeline.model_id, mirrored)
            result = self.cache.get_or_encode(
                key, pipeline.model_id, lambda: self._from_description(name, sheet_key, settings, mirrored))
            self._publish_sheet(name, sheet_key)
        self.summary.cache_hits += result.hit
        self.summary.cache_misses += not result.hit
        self.summary.cache_rebuilt += result.rebuilt
        if not result.hit:
            self.summary.characters_encoded.append(_character_label(name, mirrored))
        return result.encoding, "cached" if result.hit else "encoded"

    def _field_error(self, name: str, field_name: str, exc: AnyStoryError) -> AnyStoryError:
        message = re.sub(rf"^character {re.escape(name)}: ", "", str(exc))
        return type(exc)(f"{self.source}: characters.{name}.{field_name}: {message}")

    def _from_image(self, name: str, mirrored: bool):
        character = self.story.characters[name]
        try:
            image = _mirror(load_image(character.image, "reference image"), mirrored)
            mask = _mirror(load_image(character.mask, "mask"), mirrored) if character.mask else None
            return self.model.pipeline.encode_character(image, mask=mask, name=name)
        except AnyStoryError as exc:
            raise self._field_error(name, "image", exc) from None

    def _from_description(self, name: str, sheet_key: str, settings: dict[str, Any], mirrored: bool):
        pipeline = self.model.pipeline
        try:
            cached = self._cached_sheet(sheet_key)
            sheet = cached or self._draw_sheet(name, settings)
            mask, fallback = segment_sheet(sheet)
            mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
            encoding = pipeline.encode_character(_mirror(sheet, mirrored), mask=_mirror(mask_image, mirrored),
                                                 name=name)
            if fallback:
                self._warn(f"{self.source}: characters.{name}: the generated sheet has no clear "
                           "background; the centre of the sheet is used as the character, and it is "
                           "not pasted into the panels")
                # A box of background pasted into every panel would draw a block, not the character.
                encoding.figure = None
        except AnyStoryError as exc:
            raise self._field_error(name, "description", exc) from None
        if cached is None:  # a sheet read back is already stored, byte for byte
            rgba = sheet.copy()
            rgba.putalpha(mask_image)
            _write_png(rgba, self.cache.sidecar_path(sheet_key, ".sheet.png"), sheet_key)
        return encoding

    def _cached_sheet(self, sheet_key: str) -> Image.Image | None:
        """The sheet an earlier encoding of this character drew (plain or mirrored: the sheet is
        the same), so that a character used both ways is drawn once. Its colours are stored as
        drawn (the alpha beside them), so cutting it out again gives the same mask."""
        cached = self.cache.sidecar_path(sheet_key, ".sheet.png")
        if _stored_key(cached) != sheet_key:
            return None
        try:
            with Image.open(cached) as image:
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None  # unreadable: draw it again

    def _draw_sheet(self, name: str, settings: dict[str, Any]) -> Image.Image:
        self.emit(ProgressEvent("character", f"{name}: drawing a character sheet from its description"))

        def on_step(_pipe, _step, _timestep, tensors):
            self.stop()
            return tensors

        output = self.model.pipeline(
            settings["prompt"], characters=[], num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"], guidance_interval=tuple(settings["guidance_interval"]),
            negative_prompt=settings["negative_prompt"] or None,
            generator=_generator(settings["seed"]), callback_on_step_end=on_step,
        )
        return output.images[0].convert("RGB")

    def _publish_sheet(self, name: str, key: str) -> None:
        """Copy the cached sheet to characters/<name>.png when it is not there yet."""
        cached = self.cache.sidecar_path(key, ".sheet.png")
        target = self.out / "characters" / f"{name}.png"
        if _stored_key(cached) != key or _stored_key(target) == key:
            return  # no whole sheet in the cache, or already published
        data = cached.read_bytes()
        atomic_write(target, lambda handle: handle.write(data), within=self.out)
        self.summary.files_written.append(str(target))

    def _warn(self, message: str) -> None:
        if message in self.summary.warnings:
            return  # e.g. a fallback sheet, said once for a character used both plain and mirrored
        self.summary.warnings.append(message)
        self.emit(ProgressEvent("warning", message))


def _generator(seed: int):
    import torch

    # A CPU generator: the same seed gives the same noise on every device.
    return torch.Generator("cpu").manual_seed(int(seed))


# --------------------------------------------------------------------------------------------
# Stopping cleanly on SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """A render stopped at a safe point after SIGINT or SIGTERM. The message says what was
    finished; `exit_code` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int, summary: RenderSummary | None = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.summary = summary


_stop_requests: list[int] = []  # signals received inside stop_on_signals(), oldest first
_deferring = [0]  # > 0 while drawing and writing: a signal is acted on at the next safe point


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """While active, SIGINT and SIGTERM stop renders with `Interrupted`: while a render draws
    and writes, at its next safe point (between two denoising steps, characters, panels or
    pages); elsewhere (checking the story, loading the model) and on a second signal, at once.
    Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        first = not _stop_requests
        if first:
            _stop_requests.append(signum)
        if not first or not _deferring[0]:
            raise Interrupted(f"stopped by {signal.Signals(signum).name}; finished files are kept, "
                              "run the same command again to finish the rest", signum)

    _stop_requests.clear()
    previous = {number: signal.signal(number, handler) for number in signals}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)
        _stop_requests.clear()


@contextlib.contextmanager
def _at_safe_points():
    """Inside, a signal is acted on at the next `_check_stop`."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1


def _numbers(values: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _check_stop(source: str, summary: RenderSummary, to_draw: int) -> None:
    """Interrupted, saying what is finished, when a stop was asked for."""
    if not _stop_requests:
        return
    signum = _stop_requests[0]
    drawn = summary.panels_rendered
    done = (f"panel(s) {_numbers(drawn)} finished ({len(drawn)} of {to_draw} to draw)" if drawn
            else f"no panel finished (0 of {to_draw} to draw)")
    if summary.pages_written:
        done += f", page(s) {_numbers(summary.pages_written)} written"
    raise Interrupted(f"{source}: stopped by {signal.Signals(signum).name}: {done}; nothing is "
                      "half-written, run the same command again to finish the rest", signum, summary)


# --------------------------------------------------------------------------------------------
# Several processes: torchrun / accelerate launch
# --------------------------------------------------------------------------------------------


def _process_group():
    """torch.distributed, joined (gloo) if nobody has joined it yet."""
    import torch
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if not dist.is_available():
        raise AnyStoryError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed; "
                            "run one process")
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if torch.cuda.is_available() and not os.environ.get("ANYSTORY_DEVICE"):
            torch.cuda.set_device(local_rank % torch.cuda.device_count())  # one GPU per process
        try:
            dist.init_process_group("gloo")
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AnyStoryError(f"WORLD_SIZE={world}: cannot join the other processes ({reason}); "
                                "start them with torchrun --nproc-per-node N, or unset WORLD_SIZE") from None
        atexit.register(_leave_process_group)
    return dist


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _Ranks:
    """This process's place among the processes of one render. Rank r of W draws the panels
    r, r + W, r + 2W, ... of rank 0's list of panels to draw; rank 0 composes the pages once
    every rank has finished. One process: rank 0 of 1, and nothing to coordinate."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def current(cls) -> "_Ranks":
        try:
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        except ValueError:
            world = 1
        if world <= 1:
            return cls()
        dist = _process_group()
        return cls(dist.get_rank(), dist.get_world_size())

    def _flags(self, values: Iterable[int], count: int):
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flags = torch.zeros(count, dtype=torch.int64, device=device)
        for value in values:
            flags[value] = 1
        return flags

    def share(self, indices: Sequence[int], count: int) -> list[int]:
        """Rank 0's `indices` (0 <= i < count), on every rank."""
        if self.world == 1:
            return list(indices)
        import torch.distributed as dist

        flags = self._flags(indices if self.rank == 0 else (), count)
        dist.broadcast(flags, src=0)
        return [i for i in range(count) if flags[i]]

    def mine(self, todo: Sequence[Any]) -> list[Any]:
        return list(todo[self.rank::self.world])

    def gather(self, failed: bool, indices: Sequence[int], count: int) -> tuple[bool, list[int]]:
        """(did any rank fail, the union of every rank's `indices`); waits for every rank."""
        if self.world == 1:
            return failed, list(indices)
        import torch.distributed as dist

        flags = self._flags([0] * failed + [1 + i for i in indices], count + 1)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), [i for i in range(count) if flags[1 + i]]


# --------------------------------------------------------------------------------------------
# The render
# --------------------------------------------------------------------------------------------


@dataclass
class _PanelJob:
    plan: PanelPlan
    multipliers: tuple[float, float]
    key: str  # content key + frame shape
    image: Image.Image | None = None  # the up-to-date panel, once known
    maps: np.ndarray | None = None

    @property
    def entries(self) -> int:
        return len(self.plan.characters) + 1


def check_output_dir(out: Path) -> Path:
    """Create `out` if needed and prove it writable, before any work; OutputError if not."""
    folder = ensure_dir(out)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".anystory-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None
    return folder


def render_story(
    story_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    pages: Iterable[int] | None = None,
    panels: Iterable[int] | None = None,
    seed: int | None = None,
    steps: int | None = None,
    save_routing: bool = False,
    pipeline_factory: Callable[[str, Path], Any] | None = None,
    model_fingerprint: Callable[[str, Path], str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    runtime=None,
) -> RenderSummary:
    """Render one story into `out_dir`; see the module docstring.

    `pipeline_factory(model_value, story_dir)` returns an AnyStoryPipeline (default: the real
    loader, `model_loading.load_pipeline`); `model_fingerprint(model_value, story_dir)` keys the
    panels without loading the model (default with the real loader: a hash of the model files).
    `runtime` (devices.Runtime: device, precision, offload; default: from the environment and the
    machine) is what the default loader loads on; its device and precision key the panels.
    """
    emit = progress or (lambda event: None)
    source = str(story_path)
    summary = RenderSummary(story=source, out_dir=str(out_dir))
    clock = _Clock(summary.timings)
    start = time.perf_counter()

    # 1. Everything that can be wrong with the input, before any slow or destructive work.
    with clock("check"):
        story = check_story(story_path)
        summary.title = story.title
        if runtime is None:
            from .devices import resolve_runtime

            runtime = resolve_runtime()
        summary.runtime = runtime.to_dict()
        story_dir = Path(story_path).resolve().parent
        model = _Model(story.model, story_dir, pipeline_factory, model_fingerprint, source, emit, cache_dir,
                       runtime=runtime)
        loras, lora_keys = _story_loras(story, story_dir, source)
        summary.loras = [{"path": str(file), "scale": scale, "sha256": digest} for file, scale, digest in loras]
        sheet_seed = story.seed if seed is None else seed
        plans = build_plan(story, seed=seed, steps=steps, model_id=model.key,
                           character_keys=character_keys(story, sheet_seed, steps),
                           lora_keys=lora_keys, runtime=runtime.key())
        # After the model's key: a model that is missing leaves no empty output folder behind.
        out = check_output_dir(Path(out_dir))
        page_plans = group_pages(plans)
        try:
            chosen = select_panels(plans, pages, panels)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None
        frames = frame_sizes(story, page_plans)
        jobs = {plan.index: _job(plan, frames[plan.index]) for plan in plans}
        ranks = _Ranks.current()
        # Panels already drawn with the same key are kept (rank 0 looks; every rank uses its list).
        fresh = ([i for i in sorted(chosen) if not _load_if_current(jobs[i], out)]
                 if ranks.rank == 0 else [])
        todo = [jobs[i] for i in ranks.share(fresh, len(plans))]
    drawing = {job.plan.index for job in todo}
    summary.panels_skipped = sorted(i + 1 for i in chosen if i not in drawing)
    emit(ProgressEvent("story", f"{source}: {story.title}", 0, len(todo)))
    if not todo:
        emit(ProgressEvent("note", f"all {len(chosen)} selected panels are up to date; nothing to draw"))

    # 2. Characters once, then the panels (this process's share of them).
    mine = ranks.mine(todo)
    if ranks.world > 1:
        emit(ProgressEvent("note", f"process {ranks.rank + 1} of {ranks.world}: drawing {len(mine)} "
                                   f"of the {len(todo)} panel(s) to draw"))

    def stop() -> None:
        _check_stop(source, summary, len(todo))

    failure: BaseException | None = None
    try:
        stop()
        if mine:
            _check_model_fits(model.pipeline, plans, source)  # loads the model (stops at once)
            _warn_unknown_words(story, model.pipeline, [job.plan for job in mine], source, emit)
            characters = _Characters(story, source, model, cache_dir, sheet_seed, steps, summary, out, emit)
            needed = list(dict.fromkeys((c.name, c.mirrored) for job in mine for c in job.plan.characters))
            with clock("encode"), _at_safe_points():
                characters.encode_all(needed, stop)
            with clock("render"), _at_safe_points(), _style_loras_on(model.pipeline, loras, source,
                                                                     characters._warn):
                for number, job in enumerate(mine, start=1):
                    stop()
                    emit(ProgressEvent("panel", f"panel {job.plan.index + 1}: {job.plan.prompt}",
                                       number - 1, len(mine)))
                    _draw_panel(model.pipeline, job, characters.encodings, out, source, emit, stop)
                    summary.panels_rendered.append(job.plan.index + 1)
                    summary.files_written.append(str(_panel_path(out, job.plan.index)))
                    emit(ProgressEvent("panel_done", f"panel {job.plan.index + 1}", number, len(mine)))
    except BaseException as exc:  # noqa: BLE001 - every rank must reach the gather below
        failure = exc
        if isinstance(exc, KeyboardInterrupt) and _stop_requests:
            try:
                stop()  # the same stop, said with what was finished
            except Interrupted as said:
                failure = said
    summary.model_loaded = model.loaded
    summary.timings["load_model"] = model.load_seconds
    if ranks.world > 1:
        with clock("wait"):  # for the other processes to finish their panels
            others_failed, drawn = ranks.gather(failure is not None,
                                                [n - 1 for n in summary.panels_rendered], len(plans))
        if failure is None and others_failed:
            failure = AnyStoryError(f"{source}: another process of this render failed (see its "
                                    "message); finished panels are kept, run again to finish the rest")
        if failure is None:
            own = set(summary.panels_rendered)
            summary.panels_rendered = [i + 1 for i in drawn]
            summary.files_written += [str(_panel_path(out, i)) for i in drawn if i + 1 not in own]
    if failure is not None:
        raise failure
    if ranks.rank != 0:
        summary.timings["total"] = time.perf_counter() - start
        emit(ProgressEvent("done", f"{source}: process {ranks.rank + 1} of {ranks.world} drew its "
                                   "panels; the first process composes the pages"))
        return summary

    # 3. Routing outputs, pages, exports: from the stored panels of every process.
    if save_routing:
        for index in sorted(chosen):
            if jobs[index].image is None:
                _load_if_current(jobs[index], out)
        with _at_safe_points():
            _write_routing_outputs([jobs[i] for i in sorted(chosen)], out, summary)
    with clock("compose"), _at_safe_points():
        composed = _compose_pages(story, page_plans, jobs, out, summary, emit, stop)
    with clock("export"), _at_safe_points():
        if len(composed) == len(page_plans):
            stop()
            _export(story, Path(story_path).stem, composed, out, summary, emit)
            if pages is None and panels is None:
                _prune(out, len(plans), len(page_plans), jobs.values())
        else:
            waiting = ", ".join(map(str, summary.pages_incomplete))
            emit(ProgressEvent("note", f"PDF and CBZ not written: page(s) {waiting} still have "
                                       "panels to draw"))
    summary.timings["total"] = time.perf_counter() - start
    emit(ProgressEvent("done", _done_message(summary)))
    return summary


def _job(plan: PanelPlan, frame: tuple[int, int]) -> _PanelJob:
    multipliers = aspect_multipliers(frame)
    key = _sha256("panel", RENDER_KEY_VERSION, plan.content_key, multipliers)
    return _PanelJob(plan, multipliers, key)


def _load_if_current(job: _PanelJob, out: Path) -> bool:
    """Load the stored panel (and its routing maps) when its key matches; True if so."""
    path = _panel_path(out, job.plan.index)
    if _stored_key(path) != job.key:
        return False
    with Image.open(path) as image:
        job.image = image.convert("RGB")
    job.maps = _read_routing(_routing_path(out, job.key), job.key, job.entries)
    return True


def _check_model_fits(pipeline, plans: Sequence[PanelPlan], source: str) -> None:
    limit = pipeline.max_characters
    for plan in plans:
        if len(plan.characters) > limit:
            raise StoryError(f"{source}: panels[{plan.index}].characters: {len(plan.characters)} "
                             f"characters, but the model supports at most {limit} per panel")


def _warn_unknown_words(story: Story, pipeline, plans: Sequence[PanelPlan], source: str, emit) -> None:
    """The embedded default model knows only its world's words (one token each); any other word
    reaches it as meaningless pieces. Say which, once per panel, instead of dropping them
    silently. Real CLIP tokenizers split any text into known pieces, so other models are not
    checked."""
    from .model_loading import DEFAULT_MODEL

    if story.model != DEFAULT_MODEL:
        return
    from .world.base_models import unknown_words

    for plan in plans:
        unknown = unknown_words(pipeline.base.tokenizer, plan.prompt)
        if unknown:
            emit(ProgressEvent("warning", f"{source}: panels[{plan.index}].prompt: the default model does not "
                               f"know {', '.join(repr(w) for w in unknown)}; it draws the rest "
                               "(`python -c 'import anystory_cli.world as w; print(w.vocabulary())'` lists its words)"))


def _mirror(image: Image.Image, mirrored: bool) -> Image.Image:
    return ImageOps.mirror(image) if mirrored else image


def _draw_panel(pipeline, job: _PanelJob, encodings: dict[tuple[str, bool], Any], out: Path, source: str, emit,
                stop: Callable[[], None] = lambda: None) -> None:
    plan = job.plan
    width, height = _image_size(pipeline, job.multipliers, plan.resolution)

    def on_step(_pipe, step, _timestep, tensors):
        emit(ProgressEvent("step", f"panel {plan.index + 1}", step + 1, plan.num_inference_steps))
        stop()  # between two denoising steps: a signal stops the render here
        return tensors

    try:
        output = pipeline(
            plan.prompt,
            characters=[encodings[c.name, c.mirrored] for c in plan.characters],
            regions=[c.box for c in plan.characters],
            subject_scale=plan.subject_strength,
            reference_scale=plan.reference_strength,
            reference_guidance=plan.reference_guidance,
            # No figure: a sheet whose character could not be cut out (`_from_description`).
            figure_boxes=[c.figure if encodings[c.name, c.mirrored].figure is not None else None
                          for c in plan.characters],
            paste_at=plan.paste_references_at or None,
            return_routing=True,
            num_inference_steps=plan.num_inference_steps,
            guidance_scale=plan.guidance_scale,
            guidance_interval=plan.guidance_interval,
            negative_prompt=plan.negative_prompt or None,
            generator=_generator(plan.seed),
            height=height,
            width=width,
            callback_on_step_end=on_step,
        )
    except AnyStoryError as exc:
        raise type(exc)(f"{source}: panels[{plan.index}]: {exc}") from None
    job.image = output.images[0].convert("RGB")
    job.maps = _as_stored(output.routing_maps[0].float().cpu().numpy())
    # Maps first: a panel PNG with this key promises that its maps exist.
    _write_routing(job.maps, _routing_path(out, job.key), job.key, out)
    _write_png(job.image, _panel_path(out, plan.index), job.key, within=out)


def _write_routing_outputs(jobs: Sequence[_PanelJob], out: Path, summary: RenderSummary) -> None:
    """panel-NNN-routing.png (overlay) and .npy (soft maps) for drawn panels, when outdated."""
    for job in jobs:
        if job.image is None or job.maps is None:
            continue
        overlay_path = _panel_path(out, job.plan.index, "-routing")
        if _stored_key(overlay_path) == job.key:
            continue
        maps = job.maps.astype(np.float32)
        npy_path = overlay_path.with_suffix(".npy")
        atomic_write(npy_path, lambda handle: np.save(handle, maps, allow_pickle=False), within=out)
        _write_png(routing_overlay(job.image, maps), overlay_path, job.key, within=out)
        summary.files_written += [str(npy_path), str(overlay_path)]


def _page_key(spec: PageSpec, dpi: int, jobs: Sequence[_PanelJob], texts: Sequence[PanelText]) -> str:
    # The dpi too: it is written into the page's PNG, even where the page's pixels stay the same.
    # And the font files the lettering may use: a font installed or removed since letters anew.
    faces = [(face.path, face.index) for face in fonts.font_chain(spec.font).faces]
    return _sha256("page", PAGE_KEY_VERSION, asdict(spec), dpi, faces, [j.key for j in jobs],
                   [asdict(t) for t in texts])


def _compose_pages(story: Story, page_plans: Sequence[PagePlan], jobs: dict[int, _PanelJob],
                   out: Path, summary: RenderSummary, emit,
                   stop: Callable[[], None] = lambda: None) -> list[tuple[str, Image.Image]]:
    """Compose and write every complete page whose key changed; (key, image) of complete pages."""
    composed = []
    for page in page_plans:
        stop()
        members = [jobs[i] for i in page.panels]
        number = page.index + 1
        if any(job.image is None and not _load_if_current(job, out) for job in members):
            summary.pages_incomplete.append(number)
            continue
        spec = PageSpec.from_settings(story.page, page.rows)
        texts = [PanelText.from_plan(job.plan) for job in members]
        key = _page_key(spec, story.page.dpi, members, texts)
        path = out / "pages" / f"page-{number:03d}.png"
        if _stored_key(path) == key:
            summary.pages_skipped.append(number)
            with Image.open(path) as stored:
                composed.append((key, stored.convert("RGB")))
            continue
        maps = [job.maps if job.maps is not None and job.maps.shape[0] == job.entries else None
                for job in members]
        image = compose_page(spec, [job.image for job in members], texts, maps)
        _write_png(image, path, key, dpi=story.page.dpi, within=out)
        summary.pages_written.append(number)
        summary.files_written.append(str(path))
        emit(ProgressEvent("page", f"page {number}", len(summary.pages_written), len(page_plans)))
        composed.append((key, image))
    return composed


def _export(story: Story, stem: str, composed: Sequence[tuple[str, Image.Image]], out: Path,
            summary: RenderSummary, emit) -> None:
    """<stem>.pdf and <stem>.cbz, unless the recorded key and file hash say they are current."""
    manifest_path = out / STATE_DIR / "exports.json"
    manifest = _read_json(manifest_path)
    pages = [image for _, image in composed]
    key = _sha256("export", EXPORT_FORMAT, story.title, story.page.reading_order, story.page.dpi,
                  sorted(story.characters), [page_key for page_key, _ in composed])
    writers = {
        f"{stem}.pdf": lambda path: write_pdf(pages, path, story.title, story.page.dpi, within=out),
        f"{stem}.cbz": lambda path: write_cbz(pages, path, story.title, story.page.reading_order,
                                              sorted(story.characters), within=out),
    }
    changed = False
    for name, write in writers.items():
        path = out / name
        entry = manifest.get(name, {})
        if entry.get("key") == key and entry.get("sha256") == _file_sha256(path):
            continue
        write(path)
        manifest[name] = {"key": key, "sha256": _file_sha256(path)}
        summary.exports_written.append(name)
        summary.files_written.append(str(path))
        emit(ProgressEvent("export", str(path)))
        changed = True
    if changed:
        text = json.dumps(manifest, indent=2, sort_keys=True).encode()
        atomic_write(manifest_path, lambda handle: handle.write(text), within=out)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


STALE_TEMP_SECONDS = 600  # a temporary file this old was left by a killed run, not a live one


def _inside(folder: Path, out: Path) -> bool:
    try:
        check_within(folder / "-", out)
    except OutputError:
        return False
    return True


def _prune(out: Path, panel_count: int, page_count: int, jobs: Iterable[_PanelJob]) -> None:
    """After a complete render: remove pages and panels the story no longer has, routing maps
    of keys no panel uses, and temporary files a killed run left behind. Only files with our
    own names, in folders inside the output folder, are touched."""
    folders = {name: out / name for name in ("pages", "panels", "characters", STATE_DIR,
                                             f"{STATE_DIR}/routing")}
    folders = {name: folder for name, folder in folders.items() if _inside(folder, out)}
    doomed = [p for p in folders["pages"].glob("page-*.png")
              if re.fullmatch(r"page-(\d{3,})\.png", p.name) and int(p.name[5:-4]) > page_count
              ] if "pages" in folders else []
    for path in folders["panels"].glob("panel-*") if "panels" in folders else ():
        match = re.fullmatch(r"panel-(\d{3,})(-routing)?\.(png|npy)", path.name)
        if match and int(match.group(1)) > panel_count:
            doomed.append(path)
    keys = {job.key for job in jobs}
    if f"{STATE_DIR}/routing" in folders:
        doomed += [p for p in folders[f"{STATE_DIR}/routing"].glob("*.png") if p.stem not in keys]
    cutoff = time.time() - STALE_TEMP_SECONDS
    for folder in [out, *folders.values()]:
        for path in folder.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if not path.is_symlink() and path.is_file() and path.stat().st_mtime < cutoff:
                    doomed.append(path)
    for path in doomed:
        try:
            path.unlink()
        except OSError:
            pass  # a stale extra file is harmless


def _done_message(summary: RenderSummary) -> str:
    if summary.up_to_date:
        return f"{summary.story}: up to date, nothing to do ({len(summary.panels_skipped)} panels unchanged)"
    parts = [f"{len(summary.panels_rendered)} panel(s) drawn", f"{len(summary.panels_skipped)} unchanged",
             f"{len(summary.pages_written)} page(s) written"]
    if summary.exports_written:
        parts.append(", ".join(summary.exports_written))
    return f"{summary.story}: " + ", ".join(parts)
