"""The output folder's stored files: panel PNGs with their content keys, routing maps, paths.

A panel's key (its plan's content key and its frame shape) sits in the PNG text chunk
`anystory:key`; a panel whose stored key equals its key is up to date and is not drawn again.
Every file is written atomically (temporary name, then rename) inside the output folder.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import export
from ..errors import OutputError
from ..export import ensure_dir
from ..layout import PageSpec, panel_rects
from ..plan import PagePlan, PanelPlan
from ..story import Story


KEY_TEXT = "anystory:key"  # PNG text chunk holding a panel's or page's key


STATE_DIR = ".anystory"


# Bump when drawing or composing changes, so that earlier outputs are not reused.
RENDER_KEY_VERSION = 1


# Image shapes: the model's native square, widened or heightened to the frame's shape in
# quarter steps (a 2.1:1 wide panel is drawn at 2:1, not cropped out of a square).
ASPECT_STEP = 0.25


MAX_ASPECT = 2.0


def content_hash(*parts: Any) -> str:
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


def stored_key(path: Path) -> str | None:
    """The key in a PNG's text chunk, or None when the file is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: a truncated file is not up to date
            return image.text.get(KEY_TEXT)  # type: ignore[attr-defined]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def write_png(image: Image.Image, path: Path, key: str, dpi: int | None = None,
               within: Path | None = None) -> Path:
    return export.write_png(image, path, dpi, {KEY_TEXT: key}, within)


def file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:  # in blocks: a long comic's PDF is not read into memory
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def panel_path(out: Path, index: int, suffix: str = "") -> Path:
    return out / "panels" / f"panel-{index + 1:03d}{suffix}.png"


# Routing maps are kept as a grey PNG, entries stacked vertically, 0..255: safe to read
# (no pickle), compressed, and exact enough for balloon placement and overlays.


def routing_path(out: Path, key: str) -> Path:
    return out / STATE_DIR / "routing" / f"{key}.png"


def _routing_bytes(maps: np.ndarray) -> np.ndarray:
    return np.clip(maps * 255.0 + 0.5, 0, 255).astype(np.uint8)


def as_stored(maps: np.ndarray) -> np.ndarray:
    """The maps exactly as `read_routing` gives them back: what every page is composed from,
    whether its panels were drawn in this process, in another, or in an earlier run."""
    return _routing_bytes(maps).astype(np.float32) / 255.0


def write_routing(maps: np.ndarray, path: Path, key: str, out: Path) -> None:
    entries, height, width = maps.shape
    stacked = _routing_bytes(maps).reshape(entries * height, width)
    write_png(Image.fromarray(stacked, "L"), path, key, within=out)


def read_routing(path: Path, key: str, entries: int) -> np.ndarray | None:
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


@dataclass
class PanelJob:
    plan: PanelPlan
    multipliers: tuple[float, float]
    key: str  # content key + frame shape
    stored: bool = False  # its PNG (and maps) with this key are in the output folder
    # Loaded only while a page or an overlay needs them (memory stays flat with the panel count).
    image: Image.Image | None = None
    maps: np.ndarray | None = None

    @property
    def entries(self) -> int:
        return len(self.plan.characters) + 1


def panel_job(plan: PanelPlan, frame: tuple[int, int]) -> PanelJob:
    multipliers = aspect_multipliers(frame)
    key = content_hash("panel", RENDER_KEY_VERSION, plan.content_key, multipliers)
    return PanelJob(plan, multipliers, key)


def is_current(job: PanelJob, out: Path) -> bool:
    """Whether the stored panel is whole and has this key (remembered on the job)."""
    job.stored = job.stored or stored_key(panel_path(out, job.plan.index)) == job.key
    return job.stored


def load_panel(job: PanelJob, out: Path) -> bool:
    """Load the stored panel (and its routing maps) when its key matches; True if so."""
    if job.image is not None:
        return True
    if not is_current(job, out):
        return False
    path = panel_path(out, job.plan.index)
    with Image.open(path) as image:
        job.image = image.convert("RGB")
    job.maps = read_routing(routing_path(out, job.key), job.key, job.entries)
    return True


def release(job: PanelJob) -> None:
    """Forget the loaded image and maps (they stay on disk)."""
    job.image = job.maps = None


RUNTIME_FILE = "runtime.json"  # in STATE_DIR: the device kind and precision the panels were drawn with


def recorded_device(out: Path) -> str | None:
    """The kind of device (cpu, cuda, mps) the last render that drew into `out` ran on; None when
    none is recorded or the record is unreadable."""
    try:
        record = json.loads((out / STATE_DIR / RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    device = record.get("device") if isinstance(record, dict) else None
    return device if isinstance(device, str) else None


def record_runtime(out: Path, runtime_key: dict[str, str]) -> None:
    """Keep the kind of device and the precision that drew the panels beside them (a later
    render with --device auto keys its panels with it before asking torch)."""
    text = json.dumps(runtime_key, sort_keys=True).encode()
    export.atomic_write(out / STATE_DIR / RUNTIME_FILE, lambda handle: handle.write(text), within=out)


def check_output_dir(out: Path) -> Path:
    """Create `out` if needed and prove it writable, before any work; OutputError if not."""
    folder = ensure_dir(out)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".anystory-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable ({exc.strerror or exc})") from None
    return folder
