"""A story's characters, each encoded at most once per render through the disk cache.

A text-only character (a description, no image) gets a character sheet: the pipeline draws the
description alone (no characters) on a plain background, the sheet is segmented by its
background colours (`sheets.segment_sheet`: the largest part far from each row's border colours
is the character, so the default model's sheets, scenes of sky and ground, segment too; without
a clear background, the central box, with a warning, and no figure to paste), and the sheet is
encoded like a reference image. Sheet and encoding are cached.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..cache import EncodingCache, description_key, encoder_id, reference_key
from ..errors import AnyStoryError
from ..export import atomic_write
from ..masks import load_image
from ..plan import character_fingerprints
from ..story import Story
from .events import ProgressEvent, RenderSummary
from .model import Model, generator
from .sheets import segment_sheet
from .store import stored_key, write_png


SHEET_VERSION = 3  # 2: a sheet cut out by its central box carries no figure; 3: row-wise backgrounds


SHEET_PROMPT = "{description}, standing, plain background"


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


class Characters:
    """Each character encoded at most once per render, through the disk cache."""

    def __init__(self, story: Story, source: str, model: Model, cache_dir, sheet_seed: int,
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
                                encoder_id(pipeline), mirrored)
            result = self.cache.get_or_encode(key, pipeline.model_id, lambda: self._from_image(name, mirrored))
        else:
            settings = sheet_settings(self.story, name, self.sheet_seed, self.steps)
            description = character.description or ""
            # The sheet is the same either way (it is published unmirrored, under its own key).
            sheet_key = description_key(description, settings, encoder_id(pipeline))
            key = description_key(description, settings, encoder_id(pipeline), mirrored)
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
            write_png(rgba, self.cache.sidecar_path(sheet_key, ".sheet.png"), sheet_key)
        return encoding

    def _cached_sheet(self, sheet_key: str) -> Image.Image | None:
        """The sheet an earlier encoding of this character drew (plain or mirrored: the sheet is
        the same), so that a character used both ways is drawn once. Its colours are stored as
        drawn (the alpha beside them), so cutting it out again gives the same mask."""
        cached = self.cache.sidecar_path(sheet_key, ".sheet.png")
        if stored_key(cached) != sheet_key:
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
            generator=generator(settings["seed"]), callback_on_step_end=on_step,
        )
        return output.images[0].convert("RGB")

    def _publish_sheet(self, name: str, key: str) -> None:
        """Copy the cached sheet to characters/<name>.png when it is not there yet."""
        cached = self.cache.sidecar_path(key, ".sheet.png")
        target = self.out / "characters" / f"{name}.png"
        if stored_key(cached) != key or stored_key(target) == key:
            return  # no whole sheet in the cache, or already published
        data = cached.read_bytes()
        atomic_write(target, lambda handle: handle.write(data), within=self.out)
        self.summary.files_written.append(str(target))

    def _warn(self, message: str) -> None:
        if message in self.summary.warnings:
            return  # e.g. a fallback sheet, said once for a character used both plain and mirrored
        self.summary.warnings.append(message)
        self.emit(ProgressEvent("warning", message))


def _mirror(image: Image.Image, mirrored: bool) -> Image.Image:
    return ImageOps.mirror(image) if mirrored else image
