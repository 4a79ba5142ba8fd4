"""After a render: each panel's identity scores in `panels/scores.json` and the summary, and
`review.html`, a static page to choose takes from.

review.html (beside `pages/`, offline: no script, no CDN, images by relative path) shows every
panel with characters: each take with its routing overlay, each character's identity score and
flags, the prompt, and the exact `seed:` line that keeps a take (`takes.py`: a pinned seed finds
its take already drawn). Every value is escaped by Jinja2's autoescape. Both files are written
only when their bytes change, so an unchanged story writes nothing.
"""

from __future__ import annotations

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
    page = render_review(story, jobs, takes_of, rows, out)
    review = out / "review.html"
    _write_if_changed(review, page.encode(), out, summary)
    summary.review = str(review)


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


def render_review(story: Story, jobs: Sequence[PanelJob], takes_of: dict[int, list[Take]],
                  rows: Sequence[dict[str, Any]], out: Path) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("anystory_cli.render", "templates"),
                                     autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
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
    return environment.get_template(REVIEW_TEMPLATE).render(
        title=story.title, panels=panels, lowest=describe_lowest(rows),
        colours=_character_colours(),
    )


def _character_colours() -> list[str]:
    from ..overlay import ROUTING_COLOURS

    return ["#%02x%02x%02x" % colour for colour in ROUTING_COLOURS]
