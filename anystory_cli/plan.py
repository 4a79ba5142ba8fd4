"""Story -> panel plans: what each panel shows, with which seed, where it goes on which page.

Pure functions over plain values (frozen dataclasses), except `character_fingerprints()`,
which reads the reference images to hash them. No torch.

Pagination:
- a panel with `page_break: true` or a `page_layout` starts a new page;
- `page_layout` (else `page.layout`) shapes that page; pages that overflow from it use
  `page.layout`;
- `auto`: at most 6 panels and 3 rows a page, rows of 2 preferred (3 when space is short),
  a wide panel takes a row alone;
- a template (e.g. `grid-6` = rows of 2, 2, 2) or a list of panels per row: panels fill each
  row in turn; a wide panel takes the next row alone; a page shows only the rows it uses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anystory_cli.layout import CHARACTER_TOP, LAYOUT_TEMPLATES, PLACEMENT_BOXES
from anystory_cli.story import Box as BoxSpec
from anystory_cli.story import CharacterRef, Panel, Story

BoxTuple = tuple[float, float, float, float]

AUTO_MAX_PANELS = 6
AUTO_MAX_ROWS = 3
# Bump when the meaning of a content key changes, so old renders are not reused by mistake.
CONTENT_KEY_VERSION = 1


@dataclass(frozen=True)
class PlacedCharacter:
    name: str
    box: BoxTuple  # where in the panel image, 0..1, (x0, y0, x1, y1)
    figure: BoxTuple  # where its reference is pasted, inside `box` (figures.py)
    mirrored: bool = False  # drawn from its reference flipped left to right


@dataclass(frozen=True)
class SpokenLine:
    who: str
    text: str


@dataclass(frozen=True)
class PanelPlan:
    index: int  # position in the story's panel list
    page: int
    slot: int  # position on its page in reading order
    row: int  # row on its page, top to bottom
    wide: bool
    prompt: str  # style prefix and suffix applied
    negative_prompt: str
    characters: tuple[PlacedCharacter, ...]  # routing-map order
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_interval: tuple[float, float]  # noise levels t/T that are guided (guidance.py)
    subject_strength: float
    reference_strength: float
    reference_guidance: bool
    paste_references_at: float  # noise level t/T of the figure paste; 0: none (figures.py)
    caption: str | None
    dialogue: tuple[SpokenLine, ...]
    content_key: str  # sha256 of everything that changes the panel's pixels
    resolution: int | None = None  # long side in pixels; None: the model's own size
    # Takes: seeds tried (take 0 is `seed`), and the score that stops early (render/takes.py).
    # Not in the content key: take 0 is the panel that one take draws.
    takes: int = 1
    min_identity: float | None = None
    takes_key: str = ""  # the content key without the seed: each take adds its own


@dataclass(frozen=True)
class PagePlan:
    index: int
    rows: tuple[int, ...]  # panels per row, top to bottom
    panels: tuple[int, ...]  # story panel indices in reading order


def derive_seed(story_seed: int, panel_index: int) -> int:
    """A panel's default seed: stable across runs, machines and Python versions (sha256,
    not hash(), which is salted per process for strings)."""
    digest = hashlib.sha256(f"anystory/panel-seed/{story_seed}/{panel_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def build_plan(
    story: Story,
    *,
    seed: int | None = None,
    steps: int | None = None,
    model_id: str = "",
    character_keys: Mapping[str, str] | None = None,
    lora_keys: Sequence[str] | None = None,
    runtime: Mapping[str, str] | None = None,
    model_defaults: Mapping[str, Any] | None = None,
    takes: int | None = None,
) -> list[PanelPlan]:
    """One plan per panel, in story order.

    `seed` replaces the story seed and `steps` the style's steps (CLI overrides); explicit
    panel seeds still win. `model_id` (e.g. a hash of the weights) and `character_keys`
    (from `character_fingerprints`) go into the content keys, so that a new model or an edited
    reference image invalidates earlier renders. Without them, a character's key covers its
    paths and description only. `lora_keys`, one per `style.loras` entry (e.g. a hash of the
    file), key the style LoRAs with their scales (a LoRA at scale 0 is not drawn with, and not
    keyed); `runtime` ({"device": ..., "dtype": ...}) keys where and at what precision the panels
    are drawn, which changes their pixels (a CPU in float32, the default, is left out of the key).
    `takes` replaces `style.takes`; a panel with its own `seed:` (a pinned take) or without
    characters (nothing to score) is drawn once.
    """
    story_seed = story.seed if seed is None else seed
    # The model's recommended sampling settings (`model_loading.model_defaults`) where the story's
    # style leaves them out; without them, the paper's sampling (no figure paste).
    defaults = dict(model_defaults or {})
    paste_at = story.style.paste_references_at
    paste_at = float(defaults.get("paste_references_at", 0.0)) if paste_at is None else paste_at
    num_steps = story.style.steps if steps is None else steps
    keys = dict(character_keys) if character_keys is not None else _spec_keys(story)
    positions = _positions(story)
    plans = []
    for index, panel in enumerate(story.panels):
        page, row, slot = positions[index]
        regions = placement_boxes(panel.characters)
        characters = tuple(
            PlacedCharacter(ref.name, box, figure, ref.mirrored)
            for ref, box, figure in zip(panel.characters, regions, figure_boxes(regions))
        )
        values = dict(
            prompt=_join_prompt(story.style.prompt_prefix, panel.prompt, story.style.prompt_suffix),
            negative_prompt=story.style.negative_prompt,
            seed=panel.seed if panel.seed is not None else derive_seed(story_seed, index),
            num_inference_steps=num_steps,
            guidance_scale=story.style.guidance,
            guidance_interval=tuple(story.style.guidance_interval),
            subject_strength=story.style.subject_strength,
            reference_strength=story.style.reference_strength,
            reference_guidance=story.style.reference_guidance,
            paste_references_at=paste_at,
        )
        # The resolution only when set: panels drawn at the model's own size keep their keys.
        sized = {} if story.style.resolution is None else {"resolution": story.style.resolution}
        sized.update(_runtime_and_loras(story, lora_keys, runtime))
        keyed = dict(
            model=f"{story.model}|{model_id}",
            wide=panel.span == "wide",
            characters=[_character_key(c, keys.get(c.name, "")) for c in characters],
            **_pixel_settings(values, has_characters=bool(characters)),
            **sized,
        )
        key = content_key(**keyed)
        # The same without the seed: a take's key adds its own seed, so that pinning a take's
        # seed on the panel (`seed:`) finds the take already drawn.
        takes_key = content_key(**{k: v for k, v in keyed.items() if k != "seed"}, takes=True)
        plans.append(
            PanelPlan(
                index=index, page=page, slot=slot, row=row, wide=panel.span == "wide",
                characters=characters, caption=panel.caption,
                dialogue=tuple(SpokenLine(d.who, d.text) for d in panel.dialogue),
                content_key=key, takes_key=takes_key, resolution=story.style.resolution,
                takes=1 if panel.seed is not None or not characters else (takes or story.style.takes),
                min_identity=story.style.min_identity, **values,
            )
        )
    return plans


# Settings that act only where a character is routed (its reference features, their guidance,
# its pasted figure): a panel without characters is drawn the same whatever they are, so they stay
# out of its content key and changing them does not redraw it. (subject_strength is not one: the
# background's null subject is weighted by it too.)
CHARACTER_ONLY_SETTINGS = ("reference_strength", "reference_guidance", "paste_references_at")


def _runtime_and_loras(story: Story, lora_keys: Sequence[str] | None,
                       runtime: Mapping[str, str] | None) -> dict[str, Any]:
    """The content-key entries for style LoRAs and the device, each only where it is not the
    default (no LoRA; a CPU in float32), so that panels drawn without them keep their keys."""
    extra: dict[str, Any] = {}
    loras = story.style.loras
    if lora_keys is None:
        lora_keys = [lora.path for lora in loras]
    if len(lora_keys) != len(loras):
        raise ValueError(f"{len(lora_keys)} LoRA keys for {len(loras)} style LoRAs")
    used = [[key, lora.scale] for key, lora in zip(lora_keys, loras) if lora.scale != 0]
    if used:
        extra["loras"] = used
    if runtime is not None and dict(runtime) != {"device": "cpu", "dtype": "float32"}:
        extra["runtime"] = dict(runtime)
    return extra


def _character_key(character: PlacedCharacter, encoding_key: str) -> tuple:
    # "mirrored" only when it is: panels drawn before the option existed keep their keys.
    return (character.name, character.box, encoding_key) + (("mirrored",) if character.mirrored else ())


def _pixel_settings(values: Mapping[str, Any], has_characters: bool) -> dict[str, Any]:
    """The plan values that change a panel's pixels."""
    if has_characters:
        return dict(values)
    return {k: v for k, v in values.items() if k not in CHARACTER_ONLY_SETTINGS}


def group_pages(plans: Sequence[PanelPlan]) -> list[PagePlan]:
    """Pages with their row structure, from the plans' page/row/slot."""
    pages: dict[int, list[PanelPlan]] = {}
    for plan in plans:
        pages.setdefault(plan.page, []).append(plan)
    result = []
    for page_index in sorted(pages):
        members = sorted(pages[page_index], key=lambda p: p.slot)
        row_count = max(p.row for p in members) + 1
        rows = tuple(sum(1 for p in members if p.row == r) for r in range(row_count))
        result.append(PagePlan(page_index, rows, tuple(p.index for p in members)))
    return result


def content_key(**values: Any) -> str:
    """sha256 of canonical JSON: equal inputs give equal keys on every machine."""
    payload = json.dumps(
        {"version": CONTENT_KEY_VERSION, **values}, sort_keys=True, separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def character_fingerprints(story: Story) -> dict[str, str]:
    """sha256 per character of its reference image and mask bytes and its description.
    Reads files (the only function here that does)."""
    keys = {}
    for name, character in story.characters.items():
        digest = hashlib.sha256()
        for path in (character.image, character.mask):
            digest.update(b"\x00file\x00")
            if path is not None:
                digest.update(path.read_bytes())
        digest.update(b"\x00description\x00" + (character.description or "").encode())
        keys[name] = digest.hexdigest()
    return keys


def _spec_keys(story: Story) -> dict[str, str]:
    return {
        name: content_key(image=str(c.image), mask=str(c.mask), description=c.description)
        for name, c in story.characters.items()
    }


def _join_prompt(prefix: str, prompt: str, suffix: str) -> str:
    return ", ".join(part.strip() for part in (prefix, prompt, suffix) if part.strip())


def placement_boxes(refs: Sequence[CharacterRef]) -> list[BoxTuple]:
    """Each character's region, below the top fifth of the frame.

    A lone character: its `at` word's half-width box (no word: the centre one). Several: the
    panel is cut into one equal column per character, and a word pins its character to a column
    (left the first, right the last, center the middle one, or a column's width at the middle
    when there is no middle column); the other characters take the columns no word pinned, left
    to right in the order listed, and one with a box stands in its box. Columns rather than the
    words' half-width boxes because overlapping regions draw worse: three characters at left,
    center and right got boxes that shared half their width, and the one in the middle was drawn
    as a neighbour (docs/method.md, "Hard regions")."""
    if len(refs) == 1 and not isinstance(refs[0].at, BoxSpec):
        return [PLACEMENT_BOXES[refs[0].at or "center"]]
    n = len(refs)
    column = [(i / n, CHARACTER_TOP, (i + 1) / n, 1.0) for i in range(n)]
    pinned = {"left": 0, "right": n - 1, "center": n // 2 if n % 2 else None}
    taken = {pinned[ref.at] for ref in refs if isinstance(ref.at, str)}
    free = iter(i for i in range(n) if i not in taken)
    boxes = []
    for ref in refs:
        if isinstance(ref.at, BoxSpec):
            next(free)  # takes its turn, so that the characters listed after it keep their columns
            boxes.append(tuple(float(v) for v in ref.at.box))
        elif ref.at is None:
            boxes.append(column[next(free)])
        elif pinned[ref.at] is not None:
            boxes.append(column[pinned[ref.at]])
        else:  # center with an even number of characters
            boxes.append((0.5 - 0.5 / n, CHARACTER_TOP, 0.5 + 0.5 / n, 1.0))
    return boxes  # type: ignore[return-value]


# Where a character's reference figure is pasted (`figures.py`): its feet on this line (a share
# of the panel's height) or its region's bottom if higher, and this tall for 1 / 2 / 3 / 4
# characters in the panel: the mean height of the default world's characters in its scenes
# (0.52 / 0.47 / 0.43 / 0.40 over 1000 held-out ones), about what its base draws unaided. Figures
# a tenth smaller (0.47 / 0.42 / 0.38 / 0.355) sat inside a larger blob the base had already
# drawn, and identified fewer characters (docs/method.md, "Figure paste").
FIGURE_GROUND = 0.85
FIGURE_HEIGHT = {1: 0.52, 2: 0.47, 3: 0.42, 4: 0.40}


def figure_boxes(regions: Sequence[BoxTuple]) -> list[BoxTuple]:
    """The box each character's figure stands in, inside its region: the region's width, the
    panel's figure height, feet on the ground line (never above the region's top)."""
    height = FIGURE_HEIGHT[min(max(len(regions), 1), max(FIGURE_HEIGHT))]
    boxes = []
    for x0, y0, x1, y1 in regions:
        bottom = min(FIGURE_GROUND, y1) if y1 - y0 > height else y1
        boxes.append((x0, max(y0, bottom - height), x1, bottom))
    return boxes


# --------------------------------------------------------------------------------------------
# Pagination
# --------------------------------------------------------------------------------------------

Rows = list[list[int]]  # panel indices per row


def paginate(panels: Sequence[Panel], default_layout: Any) -> list[Rows]:
    """Pages, each a list of rows of story panel indices (reading order)."""
    pages: list[Rows] = []
    for start, stop in _chapters(panels):
        items = [(i, panels[i].span == "wide") for i in range(start, stop)]
        first_layout = panels[start].page_layout or default_layout
        chapter = _pages_for(items, first_layout)
        if len(chapter) > 1 and first_layout != default_layout:
            # The panel's page_layout shapes its own page; the overflow uses the default.
            used = sum(len(row) for row in chapter[0])
            chapter = chapter[:1] + _pages_for(items[used:], default_layout)
        pages.extend(chapter)
    return pages


def _chapters(panels: Sequence[Panel]) -> list[tuple[int, int]]:
    """Runs of panels between page breaks, as (start, stop) index pairs."""
    starts = [i for i, p in enumerate(panels) if i == 0 or p.page_break or p.page_layout]
    return list(zip(starts, starts[1:] + [len(panels)]))


def _pages_for(items: list[tuple[int, bool]], layout: Any) -> list[Rows]:
    if not items:
        return []
    if layout == "auto":
        return _auto_pages(items)
    rows = LAYOUT_TEMPLATES[layout] if isinstance(layout, str) else tuple(layout)
    return _template_pages(items, rows)


def _auto_pages(items: list[tuple[int, bool]]) -> list[Rows]:
    pages: list[Rows] = []
    current: list[tuple[int, bool]] = []
    for item in items:
        if current and not _fits_auto_page(current + [item]):
            pages.append(_auto_rows(current))
            current = []
        current.append(item)
    pages.append(_auto_rows(current))
    return pages


def _runs(items: list[tuple[int, bool]]) -> list[list[int]]:
    """Split into runs of normal panels and single wide panels, in order (wide: [-1 - i])."""
    runs: list[list[int]] = []
    for index, wide in items:
        if wide:
            runs.append([-1 - index])  # negative marks a wide panel
        elif runs and runs[-1][0] >= 0:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _fits_auto_page(items: list[tuple[int, bool]]) -> bool:
    if len(items) > AUTO_MAX_PANELS:
        return False
    fewest_rows = sum(1 if run[0] < 0 else math.ceil(len(run) / 3) for run in _runs(items))
    return fewest_rows <= AUTO_MAX_ROWS


def _auto_rows(items: list[tuple[int, bool]]) -> Rows:
    runs = _runs(items)
    needed = [1 if run[0] < 0 else math.ceil(len(run) / 3) for run in runs]
    spare = AUTO_MAX_ROWS - sum(needed)
    rows: Rows = []
    for run, count in zip(runs, needed):
        if run[0] < 0:
            rows.append([-1 - run[0]])
            continue
        # Rows of 2 read better than rows of 3 on a portrait page: use spare rows for that.
        extra = min(math.ceil(len(run) / 2) - count, spare)
        spare -= extra
        rows.extend(_even_rows(run, count + extra))
    return rows


def _even_rows(indices: list[int], row_count: int) -> Rows:
    """Split into `row_count` rows whose sizes differ by at most one, fuller rows first."""
    base, extra = divmod(len(indices), row_count)
    rows, start = [], 0
    for r in range(row_count):
        size = base + (1 if r < extra else 0)
        rows.append(indices[start : start + size])
        start += size
    return rows


def _template_pages(items: list[tuple[int, bool]], template: tuple[int, ...]) -> list[Rows]:
    pages: list[Rows] = []
    rows: Rows = []
    row: list[int] = []
    for index, wide in items:
        if wide and row:
            rows.append(row)
            row = []
        if not row and len(rows) == len(template):
            pages.append(rows)
            rows = []
        if wide:
            rows.append([index])
            continue
        row.append(index)
        if len(row) == template[len(rows)]:
            rows.append(row)
            row = []
    if row:
        rows.append(row)
    if rows:
        pages.append(rows)
    return pages


def _positions(story: Story) -> dict[int, tuple[int, int, int]]:
    """panel index -> (page, row, slot)."""
    positions = {}
    for page_index, rows in enumerate(paginate(story.panels, story.page.layout)):
        slot = 0
        for row_index, row in enumerate(rows):
            for panel_index in row:
                positions[panel_index] = (page_index, row_index, slot)
                slot += 1
    return positions
