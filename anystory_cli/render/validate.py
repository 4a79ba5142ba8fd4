"""Checks that need no model (`anystory validate` and the start of every render), and the
`--pages` / `--panels` selection."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .. import fonts
from ..errors import AnyStoryError, InputError, StoryError
from ..layout import PageSpec, panel_rects
from ..plan import PanelPlan, build_plan, group_pages
from ..story import Story, load_story, story_error


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
        from ..hub import is_hub_id, model_part_dir
        from ..model_loading import check_model_dir, model_defaults

        try:
            folder = None
            if isinstance(story.model, str) and is_hub_id(story.model):
                # None: not cached yet, and the hub may provide it (`render` downloads it)
                folder = model_part_dir(story.model, download=False)
            elif isinstance(story.model, str):
                folder = Path(story.model)
            if folder is not None:
                check_model_dir(folder)
                model_defaults(str(folder))  # its sampling defaults file, when it has one, must read
            if not isinstance(story.model, str):
                from ..flux.folders import check_flux_model

                check_flux_model(story.model.base, story.model.redux, story.model.adapter, download=False)
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
