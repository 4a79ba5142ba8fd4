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


def story_problems(path: str | os.PathLike[str], model=None) -> list[str]:
    """Every problem of a story file that can be found without a model, one line each.

    The model is checked as far as it can be without loading or downloading anything
    (`model_loading.check_model`); `model` (a value from `story.model_value`, e.g. `--model`,
    relative to the current folder) replaces the story's own."""
    source = str(path)
    try:
        story = load_story(path)
    except StoryError as exc:
        return list(getattr(exc, "problems", [str(exc)]))
    problems = lettering_problems(story, source) + layout_problems(story, source)
    from ..model_loading import check_model

    named_by, base_dir = ("model", Path(path).resolve().parent) if model is None else ("--model", Path.cwd())
    try:
        check_model(story.model if model is None else model, base_dir)
    except AnyStoryError as exc:
        problems.append(f"{source}: {named_by}: {exc}")
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
