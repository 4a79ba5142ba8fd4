"""Story -> panel plans: seeds, prompts, placements, content keys, pagination."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anystory_cli.sd.figures import DEFAULT_PASTE_AT
from anystory_cli.layout import CHARACTER_TOP, PLACEMENT_BOXES
from anystory_cli.plan import (
    figure_boxes,
    PanelPlan,
    build_plan,
    character_fingerprints,
    derive_seed,
    group_pages,
    paginate,
)
from anystory_cli.story import load_story, validate_story

STORIES = Path(__file__).resolve().parent.parent / "stories"


def make_story(panels, characters=None, **top):
    data = {"title": "T", "characters": characters or {}, "panels": panels, **top}
    return validate_story(data, check_images=False)


def plain(n, **extra):
    return [{"prompt": f"sky {i}", **extra} for i in range(n)]


CHARACTERS = {
    "mira": {"description": "a girl"},
    "bolt": {"description": "a robot"},
    "pip": {"description": "a bird"},
}


# --------------------------------------------------------------------------------------------
# Seeds and prompts
# --------------------------------------------------------------------------------------------


def test_derived_seeds_are_pinned_values():
    # sha256-based: the same numbers on every machine and Python version.
    assert derive_seed(0, 0) == 2213490620
    assert derive_seed(0, 1) == 3669644018
    assert derive_seed(1234, 5) == 2672465517
    expected = int.from_bytes(hashlib.sha256(b"anystory/panel-seed/7/3").digest()[:4], "big")
    assert derive_seed(7, 3) == expected


def test_seed_is_explicit_else_derived_from_story_seed_and_index():
    story = make_story([{"prompt": "sky", "seed": 7}, {"prompt": "hill"}], seed=42)
    plans = build_plan(story)
    assert plans[0].seed == 7
    assert plans[1].seed == derive_seed(42, 1)
    # A seed override (the CLI's --seed) replaces the story seed; explicit panel seeds win.
    overridden = build_plan(story, seed=5)
    assert overridden[0].seed == 7 and overridden[1].seed == derive_seed(5, 1)


def test_style_is_applied_to_every_panel():
    story = make_story(
        plain(2),
        style={"prompt_prefix": "pixel art", "prompt_suffix": "bright", "negative_prompt": "blur",
               "steps": 9, "guidance": 3.0, "subject_strength": 0.5, "reference_strength": 1.0},
    )
    plan = build_plan(story)[1]
    assert plan.prompt == "pixel art, sky 1, bright"
    assert plan.negative_prompt == "blur"
    assert (plan.num_inference_steps, plan.guidance_scale) == (9, 3.0)
    assert plan.guidance_interval == (0.0, 0.7)  # guidance.DEFAULT_INTERVAL: the noisiest steps unguided
    assert (plan.subject_strength, plan.reference_strength) == (0.5, 1.0)
    assert plan.reference_guidance is True  # the default: guidance amplifies the references too
    assert build_plan(story, steps=2)[1].num_inference_steps == 2
    assert build_plan(make_story(plain(1)))[0].prompt == "sky 0"  # no dangling commas


def test_reference_guidance_reaches_the_plan_and_its_content_key():
    panels = [{"prompt": "p", "characters": ["mira"]}]
    on, off = (build_plan(make_story(panels, CHARACTERS, style={"reference_guidance": flag}))[0]
               for flag in (True, False))
    assert (on.reference_guidance, off.reference_guidance) == (True, False)
    assert on.content_key != off.content_key  # a cached panel is redrawn when the setting changes


@pytest.mark.parametrize("setting", [{"reference_strength": 2.0}, {"reference_guidance": False},
                                     {"paste_references_at": 0.7}])
def test_settings_of_the_characters_alone_leave_character_less_panels_keys(setting):
    """A panel without characters is drawn the same whatever its characters' settings are, so
    changing them redraws only the panels with characters."""
    panels = [{"prompt": "p", "characters": ["mira"]}, {"prompt": "an empty hill"}]
    default = build_plan(make_story(panels, CHARACTERS))
    changed = build_plan(make_story(panels, CHARACTERS, style=setting))
    assert changed[0].content_key != default[0].content_key
    assert changed[1].content_key == default[1].content_key
    name, value = next(iter(setting.items()))
    assert getattr(changed[1], name) == value  # the plan still says what the style says


def test_a_mirrored_character_reaches_the_plan():
    panels = [{"prompt": "p", "characters": [{"name": "mira", "mirrored": True}, "bolt"]}]
    mira, bolt = build_plan(make_story(panels, CHARACTERS))[0].characters
    assert (mira.mirrored, bolt.mirrored) == (True, False)


def test_subject_strength_is_in_every_panels_key():
    """The background's null subject is weighted by the subject strength too."""
    default, stronger = (build_plan(make_story(plain(1), style=style))[0]
                         for style in ({}, {"subject_strength": 1.5}))
    assert default.content_key != stronger.content_key


def test_figure_paste_reaches_the_plan_and_its_content_key():
    panels = [{"prompt": "p", "characters": ["mira", {"name": "bolt", "at": "left"}]}]
    embedded = {"paste_references_at": DEFAULT_PASTE_AT}  # the embedded model's anystory_defaults.json
    default = build_plan(make_story(panels, CHARACTERS), model_defaults=embedded)[0]
    assert default.paste_references_at == DEFAULT_PASTE_AT > 0  # the model's default
    # each figure stands in its character's region (bolt pinned left, mira in the other column)
    assert [c.figure for c in default.characters] == figure_boxes([c.box for c in default.characters])
    off = build_plan(make_story(panels, CHARACTERS, style={"paste_references_at": 0}), model_defaults=embedded)[0]
    assert off.paste_references_at == 0 and off.content_key != default.content_key  # the story overrides it
    paper = build_plan(make_story(panels, CHARACTERS))[0]  # a model without defaults: no paste
    assert paper.paste_references_at == 0 and paper.content_key == off.content_key
    later = build_plan(make_story(panels, CHARACTERS), model_defaults={"paste_references_at": 0.55})[0]
    assert later.paste_references_at == 0.55 and later.content_key != default.content_key  # redrawn


def test_plans_are_frozen_plain_values():
    plan = build_plan(make_story(plain(1)))[0]
    assert isinstance(plan, PanelPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 1  # type: ignore[misc]


def test_caption_and_dialogue_are_carried():
    story = make_story(
        [{"prompt": "sky", "characters": ["mira"], "caption": "Dawn.",
          "dialogue": [{"who": "mira", "text": "Hi!"}]}],
        CHARACTERS,
    )
    plan = build_plan(story)[0]
    assert plan.caption == "Dawn."
    assert [(d.who, d.text) for d in plan.dialogue] == [("mira", "Hi!")]


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def test_placements_map_to_boxes():
    story = make_story(
        [
            {"prompt": "a", "characters": [{"name": "mira", "at": "left"}, {"name": "bolt", "at": "right"},
                                           {"name": "pip", "at": {"box": [0.1, 0.2, 0.3, 0.4]}}]},
            {"prompt": "b", "characters": ["mira"]},
            {"prompt": "c", "characters": ["mira", "bolt", {"name": "pip", "at": "center"}]},
        ],
        CHARACTERS,
    )
    first, second, third = build_plan(story)
    top = CHARACTER_TOP
    # Several characters: one column each; the words pin columns, a box is used as given.
    assert [(c.name, c.box) for c in first.characters] == [
        ("mira", (0.0, top, 1 / 3, 1.0)),
        ("bolt", (2 / 3, top, 1.0, 1.0)),
        ("pip", (0.1, 0.2, 0.3, 0.4)),
    ]
    assert second.characters[0].box == PLACEMENT_BOXES["center"]
    # pip is pinned to the middle column; the others take the free ones in the order listed.
    assert [c.box for c in third.characters] == [
        (0.0, top, 1 / 3, 1.0), (2 / 3, top, 1.0, 1.0), (1 / 3, top, 2 / 3, 1.0),
    ]


@pytest.mark.parametrize("refs, expected", [
    # a lone character: the word's half-width box, the centre one without a word
    ([{"name": "mira", "at": "left"}], [PLACEMENT_BOXES["left"]]),
    (["mira"], [PLACEMENT_BOXES["center"]]),
    # two characters, one pinned right: the other takes the free left column, not the same one
    ([{"name": "mira", "at": "right"}, "bolt"], [(0.5, CHARACTER_TOP, 1.0, 1.0), (0.0, CHARACTER_TOP, 0.5, 1.0)]),
    # left / center / right among three: disjoint thirds (the words' own boxes would overlap)
    ([{"name": "mira", "at": "left"}, {"name": "bolt", "at": "center"}, {"name": "pip", "at": "right"}],
     [(0.0, CHARACTER_TOP, 1 / 3, 1.0), (1 / 3, CHARACTER_TOP, 2 / 3, 1.0), (2 / 3, CHARACTER_TOP, 1.0, 1.0)]),
    # a box takes its turn: the character listed after it keeps the second column
    ([{"name": "mira", "at": {"box": [0.1, 0.2, 0.3, 0.4]}}, "bolt"],
     [(0.1, 0.2, 0.3, 0.4), (0.5, CHARACTER_TOP, 1.0, 1.0)]),
    # no middle column among four: a column's width at the middle
    ([{"name": "mira", "at": "center"}, "bolt", "pip", "moss"],
     [(0.375, CHARACTER_TOP, 0.625, 1.0), (0.0, CHARACTER_TOP, 0.25, 1.0), (0.25, CHARACTER_TOP, 0.5, 1.0),
      (0.5, CHARACTER_TOP, 0.75, 1.0)]),
])
def test_placement_words_pin_columns(refs, expected):
    from anystory_cli.plan import placement_boxes
    from anystory_cli.story import CharacterRef

    parsed = [CharacterRef(name=r) if isinstance(r, str) else CharacterRef(**r) for r in refs]
    boxes = placement_boxes(parsed)
    assert len(boxes) == len(expected)
    for box, want in zip(boxes, expected):
        assert box == pytest.approx(want)


# --------------------------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------------------------


def test_content_key_is_stable_and_ignores_lettering():
    panels = [{"prompt": "sky", "characters": ["mira"], "caption": "one"}, {"prompt": "hill"}]
    keys = [p.content_key for p in build_plan(make_story(panels, CHARACTERS))]
    again = [p.content_key for p in build_plan(make_story(panels, CHARACTERS))]
    assert keys == again and len(set(keys)) == 2
    assert all(len(k) == 64 for k in keys)
    # Captions and dialogue are drawn on the page, not in the panel: same pixels, same key.
    lettered = [dict(panels[0], caption="two", dialogue=[{"who": "mira", "text": "hey"}]), panels[1]]
    assert [p.content_key for p in build_plan(make_story(lettered, CHARACTERS))] == keys
    # Moving a panel to another page does not change its pixels either.
    moved = [panels[0], dict(panels[1], page_break=True)]
    assert [p.content_key for p in build_plan(make_story(moved, CHARACTERS))] == keys


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p[0].update(prompt="forest"),
        lambda p: p[0].update(seed=99),
        lambda p: p[0].update(characters=[{"name": "mira", "at": "left"}]),
        lambda p: p[0].update(span="wide"),
        lambda p: p[0].update(characters=[{"name": "mira", "mirrored": True}]),
    ],
    ids=["prompt", "seed", "placement", "span", "mirrored"],
)
def test_content_key_changes_only_for_the_changed_panel(change):
    panels = [{"prompt": "sky", "characters": ["mira"]}, {"prompt": "hill"}]
    before = [p.content_key for p in build_plan(make_story(panels, CHARACTERS))]
    change(panels)
    after = [p.content_key for p in build_plan(make_story(panels, CHARACTERS))]
    assert after[0] != before[0] and after[1] == before[1]


def test_content_key_follows_model_steps_and_style():
    story = make_story(plain(2))
    base = [p.content_key for p in build_plan(story)]
    for other in (
        build_plan(story, model_id="weights-v2"),
        build_plan(story, steps=3),
        build_plan(make_story(plain(2), style={"prompt_prefix": "oil"})),
        build_plan(make_story(plain(2), model="models/sdxl")),
    ):
        assert all(a != b for a, b in zip(base, (p.content_key for p in other)))


def test_character_fingerprints_follow_the_image_bytes(tmp_path):
    shutil.copy(STORIES / "demo.yaml", tmp_path / "demo.yaml")
    for index, name in enumerate(("mira", "bolt", "pip")):
        (tmp_path / "characters").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(tmp_path / "characters" / f"{name}.png")
    story = load_story(tmp_path / "demo.yaml")
    keys = character_fingerprints(story)
    plans = build_plan(story, character_keys=keys)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "characters" / "pip.png")
    replans = build_plan(story, character_keys=character_fingerprints(story))
    for old, new in zip(plans, replans):
        has_pip = any(c.name == "pip" for c in old.characters)
        assert (old.content_key != new.content_key) == has_pip


# --------------------------------------------------------------------------------------------
# Pagination
# --------------------------------------------------------------------------------------------


def rows_of(panels, layout="auto"):
    story = make_story(panels, page={"layout": layout})
    return paginate(story.panels, story.page.layout)


W = {"span": "wide"}
BREAK = {"page_break": True}


def panels_from(spec: str):
    """'n' = normal, 'W' = wide, '|' = page break before the next panel."""
    panels, pending_break = [], False
    for char in spec:
        if char == "|":
            pending_break = True
            continue
        panel = {"prompt": "sky", **(W if char == "W" else {})}
        if pending_break:
            panel.update(BREAK)
            pending_break = False
        panels.append(panel)
    return panels


PAGINATION = [
    # spec, layout, pages (rows of panel indices)
    ("n", "auto", [[[0]]]),
    ("nn", "auto", [[[0, 1]]]),
    ("nnn", "auto", [[[0, 1], [2]]]),
    ("nnnn", "auto", [[[0, 1], [2, 3]]]),
    ("nnnnn", "auto", [[[0, 1], [2, 3], [4]]]),
    ("nnnnnn", "auto", [[[0, 1], [2, 3], [4, 5]]]),
    ("nnnnnnn", "auto", [[[0, 1], [2, 3], [4, 5]], [[6]]]),
    ("nnWnn", "auto", [[[0, 1], [2], [3, 4]]]),
    ("Wnnnnn", "auto", [[[0], [1, 2, 3], [4, 5]]]),
    ("WWWW", "auto", [[[0], [1], [2]], [[3]]]),
    ("nn|nn", "auto", [[[0, 1]], [[2, 3]]]),
    ("n|n|n", "auto", [[[0]], [[1]], [[2]]]),
    ("nnnnn", "grid-4", [[[0, 1], [2, 3]], [[4]]]),
    ("nWnn", "grid-4", [[[0], [1]], [[2, 3]]]),
    ("nnnn", [1, 3], [[[0], [1, 2, 3]]]),
    ("nnnnnn", "splash", [[[0]], [[1]], [[2]], [[3]], [[4]], [[5]]]),
    ("nn|n", "grid-9", [[[0, 1]], [[2]]]),
]


@pytest.mark.parametrize("spec, layout, expected", PAGINATION, ids=[f"{s}-{l}" for s, l, _ in PAGINATION])
def test_pagination(spec, layout, expected):
    assert rows_of(panels_from(spec), layout) == expected


def test_page_layout_shapes_its_page_and_the_overflow_uses_the_default():
    panels = plain(5)
    panels[1]["page_layout"] = "splash"
    assert rows_of(panels) == [[[0]], [[1]], [[2, 3], [4]]]


def test_group_pages_and_slots_in_reading_order():
    story = make_story(panels_from("nnWnn|nnn"))
    plans = build_plan(story)
    pages = group_pages(plans)
    assert [(p.index, p.rows, p.panels) for p in pages] == [
        (0, (2, 1, 2), (0, 1, 2, 3, 4)),
        (1, (2, 1), (5, 6, 7)),
    ]
    assert [(p.page, p.row, p.slot, p.wide) for p in plans[:3]] == [
        (0, 0, 0, False), (0, 0, 1, False), (0, 1, 2, True),
    ]


def test_demo_story_has_at_least_two_pages():
    story = load_story(STORIES / "demo.yaml", check_images=False)
    assert len(group_pages(build_plan(story))) >= 2


@settings(max_examples=60, deadline=None)
@given(
    spec=st.text(alphabet="nnnW|", max_size=20).filter(lambda s: s.strip("|")),
    layout=st.sampled_from(["auto", "grid-4", "grid-6", "splash", "top-wide", [3, 1]]),
)
def test_pagination_invariants(spec, layout):
    panels = panels_from(spec)
    pages = rows_of(panels, layout)
    flat = [i for page in pages for row in page for i in row]
    assert flat == list(range(len(panels)))  # every panel once, in story order
    for page in pages:
        assert all(row for row in page)
        if layout == "auto":
            assert sum(map(len, page)) <= 6 and len(page) <= 3
        for row in page:
            if any(panels[i].get("span") == "wide" for i in row):
                assert len(row) == 1
    firsts = {page[0][0] for page in pages}
    assert all(i in firsts for i, p in enumerate(panels) if p.get("page_break"))


def test_the_guidance_interval_is_part_of_the_panel_content():
    """A different interval draws different pixels: the panel must be redrawn, not reused."""
    default = build_plan(make_story(plain(1)))[0]
    everywhere = build_plan(make_story(plain(1), style={"guidance_interval": [0.0, 1.0]}))[0]
    assert everywhere.guidance_interval == (0.0, 1.0)
    assert everywhere.content_key != default.content_key
