"""After a render: each panel's identity scores in `panels/scores.json` and the summary, and
`review.html`, a static page to choose takes from.

review.html (beside `pages/`, offline: no script, no CDN, images by relative path) shows every
panel with characters: each take with its routing overlay, each character's identity score and
flags, the prompt, and the exact `seed:` line that keeps a take (`takes.py`: a pinned seed finds
its take already drawn). Every value is escaped by Jinja2's autoescape. Both files are written
only when their bytes change, so an unchanged story writes nothing. review.html ends with a key
of what it shows (the template's values and the template itself): when the key is unchanged the
page is not rendered again, and Jinja2 is not even imported (a re-render is waited for).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..export import atomic_write
from ..story import Story
from .events import RenderSummary
from .store import PanelJob, panel_path
from .takes import Take, describe_lowest, kept, overlay_path, panel_scores, read_takes

REVIEW_TEMPLATE = "review.html.j2"  # in anystory_cli/render/templates/
TEMPLATES = Path(__file__).resolve().parent / "templates"
KEY_LINE = "<!-- review key {} -->\n"  # the last line of review.html


def write_review(story: Story, jobs: Sequence[PanelJob], out: Path, summary: RenderSummary) -> None:
    """scores.json and review.html for the panels with characters; nothing for a story without."""
    takes_of = {job.plan.index: read_takes(job, out) for job in jobs if job.plan.characters}
    rows = panel_scores(jobs, takes_of)
    summary.scores = rows
    summary.lowest = describe_lowest(rows)
    if not rows:
        return
    scores = json.dumps({"panels": rows}, indent=2, sort_keys=True) + "\n"
    _write_if_changed(out / "panels" / "scores.json", scores.encode(), out, summary)
    review = out / "review.html"
    values = review_values(story, jobs, takes_of, rows, out)
    key_line = KEY_LINE.format(_values_key(values))
    if not _ends_with(review, key_line.encode()):
        _write_if_changed(review, (render_template(values) + key_line).encode(), out, summary)
    summary.review = str(review)


def _values_key(values: dict[str, Any]) -> str:
    digest = hashlib.sha256((TEMPLATES / REVIEW_TEMPLATE).read_bytes())
    digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _ends_with(path: Path, tail: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - len(tail)))
            return handle.read() == tail
    except OSError:
        return False


def _write_if_changed(path: Path, data: bytes, out: Path, summary: RenderSummary) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path, lambda handle: handle.write(data), within=out)
    summary.files_written.append(str(path))


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def render_template(values: dict[str, Any]) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                     autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return environment.get_template(REVIEW_TEMPLATE).render(**values)


def review_values(story: Story, jobs: Sequence[PanelJob], takes_of: dict[int, list[Take]],
                  rows: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    """What review.html shows, as plain values for its template."""
    by_panel = {row["panel"]: row for row in rows}
    panels = []
    for job in jobs:
        plan = job.plan
        if not plan.characters:
            continue
        takes = takes_of.get(plan.index, [])
        chosen = kept(takes) if takes else None
        panels.append({
            "number": plan.index + 1, "field": f"panels[{plan.index}]", "prompt": plan.prompt,
            "characters": [c.name for c in plan.characters], "takes_asked": plan.takes,
            "pinned": plan.takes == 1 and story.panels[plan.index].seed is not None,
            "image": _relative(panel_path(out, plan.index), out),
            "weakest": by_panel[plan.index + 1].get("weakest"),
            "takes": [{"number": take.index + 1, "seed": take.seed, "kept": k == chosen,
                       "image": _relative(Path(out, ".anystory", "takes", f"{take.key}.png"), out),
                       "overlay": _relative(overlay_path(out, take), out),
                       "scores": [s.to_dict() for s in take.scores] if take.scores is not None else None}
                      for k, take in enumerate(takes)],
        })
    return {"title": story.title, "panels": panels, "lowest": describe_lowest(rows),
            "colours": _character_colours()}


def _character_colours() -> list[str]:
    from ..overlay import ROUTING_COLOURS

    return ["#%02x%02x%02x" % colour for colour in ROUTING_COLOURS]
