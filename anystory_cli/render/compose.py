"""From stored panels to the outputs: routing overlays, pages, the PDF and CBZ, and pruning
what the story no longer has. A page or export whose key is unchanged is not written again."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import fonts
from ..atomic import TEMP_SUFFIX, check_within
from ..errors import OutputError
from ..export import PDF_PARTS_PREFIX, atomic_write, write_cbz, write_pdf
from ..layout import PageSpec, PanelText, compose_page
from ..overlay import routing_overlay
from ..plan import PagePlan
from ..story import Story
from .events import ProgressEvent, RenderSummary
from .store import (STATE_DIR, PanelJob, content_hash, file_sha256, is_current, load_panel, panel_path, release,
                    stored_key, write_png)


PAGE_KEY_VERSION = 1


# Part of the PDF/CBZ key: raise it when the same pages give other file bytes (a new writer).
EXPORT_FORMAT = 3  # 3: pages streamed from their files (the CBZ holds the page files as written)


def write_routing_outputs(jobs: Sequence[PanelJob], out: Path, summary: RenderSummary) -> None:
    """panel-NNN-routing.png (overlay) and .npy (soft maps) for stored panels, when outdated;
    one panel in memory at a time."""
    for job in jobs:
        overlay_path = panel_path(out, job.plan.index, "-routing")
        if stored_key(overlay_path) == job.key or not load_panel(job, out) or job.maps is None:
            release(job)
            continue
        maps = job.maps.astype(np.float32)
        npy_path = overlay_path.with_suffix(".npy")
        atomic_write(npy_path, lambda handle: np.save(handle, maps, allow_pickle=False), within=out)
        write_png(routing_overlay(job.image, maps), overlay_path, job.key, within=out)
        summary.files_written += [str(npy_path), str(overlay_path)]
        release(job)


def _page_key(spec: PageSpec, dpi: int, jobs: Sequence[PanelJob], texts: Sequence[PanelText]) -> str:
    # The dpi too: it is written into the page's PNG, even where the page's pixels stay the same.
    # And the font files the lettering may use: a font installed or removed since letters anew.
    faces = [(face.path, face.index) for face in fonts.font_chain(spec.font).faces]
    return content_hash("page", PAGE_KEY_VERSION, asdict(spec), dpi, faces, [j.key for j in jobs],
                   [asdict(t) for t in texts])


def compose_pages(story: Story, page_plans: Sequence[PagePlan], jobs: dict[int, PanelJob],
                   out: Path, summary: RenderSummary, emit,
                   stop: Callable[[], None] = lambda: None) -> list[tuple[str, Path]]:
    """Compose and write every complete page whose key changed, one page in memory at a time;
    (key, file) of the complete pages."""
    composed = []
    for page in page_plans:
        stop()
        members = [jobs[i] for i in page.panels]
        number = page.index + 1
        if not all(is_current(job, out) for job in members):
            summary.pages_incomplete.append(number)
            continue
        spec = PageSpec.from_settings(story.page, page.rows)
        texts = [PanelText.from_plan(job.plan) for job in members]
        key = _page_key(spec, story.page.dpi, members, texts)
        path = out / "pages" / f"page-{number:03d}.png"
        if stored_key(path) == key:
            summary.pages_skipped.append(number)
            composed.append((key, path))
            continue
        for job in members:
            load_panel(job, out)
        maps = [job.maps if job.maps is not None and job.maps.shape[0] == job.entries else None
                for job in members]
        image = compose_page(spec, [job.image for job in members], texts, maps)
        for job in members:
            release(job)
        write_png(image, path, key, dpi=story.page.dpi, within=out)
        del image
        summary.pages_written.append(number)
        summary.files_written.append(str(path))
        emit(ProgressEvent("page", f"page {number}", len(summary.pages_written), len(page_plans)))
        composed.append((key, path))
    return composed


# A file name holds at most 255 bytes on common file systems; the export's temporary file adds
# '.', '.pdf' and '.<8 random>.tmp' to the stem.
MAX_STEM_BYTES = 200


def export_stem(story_path: str | os.PathLike[str]) -> str:
    """The exports' name: the story file's, cut to MAX_STEM_BYTES (on a character boundary) so
    that a story with a long name still gets its PDF and CBZ."""
    stem = Path(story_path).stem
    while len(os.fsencode(stem)) > MAX_STEM_BYTES:
        stem = stem[:-1]
    return stem


def write_exports(story: Story, stem: str, composed: Sequence[tuple[str, Path]], out: Path,
            summary: RenderSummary, emit) -> None:
    """<stem>.pdf and <stem>.cbz from the page files, unless the recorded key and file hash say
    they are current."""
    manifest_path = out / STATE_DIR / "exports.json"
    manifest = _read_json(manifest_path)
    pages = [page for _, page in composed]
    key = content_hash("export", EXPORT_FORMAT, story.title, story.page.reading_order, story.page.dpi,
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
        if entry.get("key") == key and entry.get("sha256") == file_sha256(path):
            continue
        write(path)
        manifest[name] = {"key": key, "sha256": file_sha256(path)}
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


def prune(out: Path, panel_count: int, page_count: int, jobs: Iterable[PanelJob]) -> None:
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
    for folder in out.glob(f"{PDF_PARTS_PREFIX}*"):  # a killed PDF write's one-page parts
        with contextlib.suppress(OSError):
            if not folder.is_symlink() and folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
    for path in doomed:
        try:
            path.unlink()
        except OSError:
            pass  # a stale extra file is harmless


def done_message(summary: RenderSummary) -> str:
    if summary.up_to_date:
        return f"{summary.story}: up to date, nothing to do ({len(summary.panels_skipped)} panels unchanged)"
    parts = [f"{len(summary.panels_rendered)} panel(s) drawn", f"{len(summary.panels_skipped)} unchanged",
             f"{len(summary.pages_written)} page(s) written"]
    if summary.exports_written:
        parts.append(", ".join(summary.exports_written))
    return f"{summary.story}: " + ", ".join(parts)
