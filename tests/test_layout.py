"""Page geometry (exact rectangles), panel fitting, lettering and balloon placement."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pagescan

from anystory_cli.errors import InputError
from anystory_cli.layout import (
    LAYOUT_TEMPLATES,
    PAGE_SIZES_MM,
    PageSpec,
    PanelText,
    compose_page,
    cover_window,
    default_font_path,
    fit_cover,
    fit_text,
    load_font,
    mass_from_boxes,
    mass_from_maps,
    mm_to_px,
    page_size_px,
    panel_rects,
    place_balloon,
    plan_lettering,
    split_span,
    undrawable_characters,
    wrap_text,
)
from anystory_cli.plan import build_plan
from anystory_cli.story import PageSettings, validate_story

WHITE, BLACK = (255, 255, 255), (0, 0, 0)

# --------------------------------------------------------------------------------------------
# Geometry tables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, dpi, landscape, expected",
    [
        ("A4", 150, False, (1240, 1754)),
        ("A4", 300, False, (2480, 3508)),
        ("A5", 150, False, (874, 1240)),
        ("Letter", 100, False, (850, 1100)),
        ("B5", 100, False, (693, 984)),
        ("square", 100, False, (827, 827)),
        ("A4", 150, True, (1754, 1240)),
    ],
)
def test_page_sizes(size, dpi, landscape, expected):
    assert page_size_px(size, dpi, landscape) == expected


def test_story_page_sizes_match_the_layout_table():
    literal = PageSettings.model_json_schema()["$defs"]
    assert set(PAGE_SIZES_MM) == {"A4", "A5", "Letter", "B5", "square"}
    assert PageSettings(size="A5", dpi=150).size_px() == (874, 1240)
    assert PageSettings(size={"width": 640, "height": 480}).size_px() == (640, 480)
    assert PageSettings(size="A4", orientation="landscape", dpi=150).size_px() == (1754, 1240)
    assert "PixelSize" in literal


@pytest.mark.parametrize(
    "start, length, parts, gutter, expected",
    [
        (0, 100, 1, 0, [(0, 100)]),
        (10, 100, 3, 5, [(10, 40), (45, 75), (80, 110)]),
        (0, 100, 3, 4, [(0, 31), (35, 66), (70, 100)]),  # 92 px: the first two get the extra
        (5, 50, 2, 0, [(5, 30), (30, 55)]),
    ],
)
def test_split_span(start, length, parts, gutter, expected):
    assert split_span(start, length, parts, gutter) == expected


def test_split_span_refuses_cells_that_do_not_fit():
    with pytest.raises(InputError, match="no room for 3 panels"):
        split_span(0, 60, 3, 10)


RECT_CASES = [
    # width, height, rows, margin, gutter, order, rects in reading order
    (200, 300, (1,), 0, 0, "ltr", [(0, 0, 200, 300)]),
    (200, 300, (2, 1), 10, 6, "ltr", [(10, 10, 97, 147), (103, 10, 190, 147), (10, 153, 190, 290)]),
    (200, 300, (2, 1), 10, 6, "rtl", [(103, 10, 190, 147), (10, 10, 97, 147), (10, 153, 190, 290)]),
    (100, 100, (3,), 0, 5, "ltr", [(0, 0, 30, 100), (35, 0, 65, 100), (70, 0, 100, 100)]),
    (101, 100, (3,), 0, 4, "rtl", [(70, 0, 101, 100), (35, 0, 66, 100), (0, 0, 31, 100)]),
    (120, 120, (1, 2), 0, 0, "ltr", [(0, 0, 120, 60), (0, 60, 60, 120), (60, 60, 120, 120)]),
]


@pytest.mark.parametrize("width, height, rows, margin, gutter, order, expected", RECT_CASES)
def test_panel_rects(width, height, rows, margin, gutter, order, expected):
    spec = PageSpec(width, height, rows, margin=margin, gutter=gutter, reading_order=order)
    assert panel_rects(spec) == expected


@pytest.mark.parametrize("rows", list(LAYOUT_TEMPLATES.values()) + [(2, 3, 1), (4, 4, 4, 4)])
def test_rtl_mirrors_ltr_exactly(rows):
    ltr = PageSpec(1241, 1754, rows, margin=59, gutter=23)
    rtl = PageSpec(1241, 1754, rows, margin=59, gutter=23, reading_order="rtl")
    start = 0
    for count in rows:
        left_to_right = panel_rects(ltr)[start : start + count]
        right_to_left = panel_rects(rtl)[start : start + count]
        for (a0, ay0, a1, ay1), (b0, by0, b1, by1) in zip(left_to_right, right_to_left):
            assert (b0, b1, by0, by1) == (1241 - a1, 1241 - a0, ay0, ay1)
        start += count


def test_page_spec_from_story_settings():
    settings = PageSettings(size="A4", dpi=150, margin=10, gutter=4, border=0.8, reading_order="rtl")
    spec = PageSpec.from_settings(settings, (2, 1))
    assert (spec.width, spec.height, spec.margin, spec.gutter, spec.border) == (1240, 1754, 59, 24, 5)
    assert spec.rows == (2, 1) and spec.reading_order == "rtl"
    assert mm_to_px(25.4, 300) == 300


# --------------------------------------------------------------------------------------------
# Fitting panel images
# --------------------------------------------------------------------------------------------


def test_cover_window_crops_the_overflow_equally():
    assert cover_window((10, 10), (40, 20)) == (0.0, 2.5, 10.0, 7.5)
    assert cover_window((200, 100), (100, 100)) == (50.0, 0.0, 150.0, 100.0)


def test_small_panels_are_upscaled_crisply():
    checker = Image.new("RGB", (2, 2))
    checker.putdata([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)])
    fitted = fit_cover(checker, (64, 64))
    assert fitted.size == (64, 64)
    assert set(fitted.getdata()) == set(checker.getdata())  # no blended colours
    assert fitted.getpixel((10, 10)) == (255, 0, 0) and fitted.getpixel((50, 50)) == (255, 255, 0)


def test_large_panels_are_downscaled_to_the_frame():
    fitted = fit_cover(Image.new("RGB", (300, 100), (10, 20, 30)), (50, 40))
    assert fitted.size == (50, 40) and fitted.getpixel((25, 20)) == (10, 20, 30)


# --------------------------------------------------------------------------------------------
# Composed pages
# --------------------------------------------------------------------------------------------

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def solid_page(order="ltr", border=3):
    spec = PageSpec(200, 300, (2, 1), margin=10, gutter=6, border=border, reading_order=order)
    panels = [Image.new("RGB", (16, 16), colour) for colour in COLOURS]
    return spec, compose_page(spec, panels, [None, None, None])


def test_page_of_solid_panels_has_white_gutters_black_borders_and_the_panel_colours():
    spec, page = solid_page()
    assert page.size == (200, 300)
    # Gutter between the two top panels (x 97..102) and between the rows (y 147..152).
    for x in range(97, 103):
        for y in (20, 80, 140):
            assert page.getpixel((x, y)) == WHITE
    for y in range(147, 153):
        for x in (20, 100, 180):
            assert page.getpixel((x, y)) == WHITE
    # Margins.
    for x, y in [(0, 0), (5, 150), (195, 150), (100, 295)]:
        assert page.getpixel((x, y)) == WHITE
    # Borders: the frames' outermost pixels and `border` px inwards.
    rects = panel_rects(spec)
    for x0, y0, x1, y1 in rects:
        for x, y in [(x0, y0), (x1 - 1, y1 - 1), (x0 + 2, (y0 + y1) // 2), ((x0 + x1) // 2, y1 - 3)]:
            assert page.getpixel((x, y)) == BLACK
    # Panel insides.
    for (x0, y0, x1, y1), colour in zip(rects, COLOURS):
        assert page.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == colour
        assert page.getpixel((x0 + 3, y0 + 3)) == colour


def test_rtl_page_puts_the_first_panel_on_the_right():
    _, page = solid_page("rtl")
    assert page.getpixel((150, 80)) == COLOURS[0]
    assert page.getpixel((50, 80)) == COLOURS[1]
    assert page.getpixel((100, 220)) == COLOURS[2]


def test_compose_page_checks_the_panel_count():
    spec = PageSpec(200, 300, (2, 1))
    with pytest.raises(ValueError, match="3 panels"):
        compose_page(spec, [Image.new("RGB", (4, 4))], [])


def test_missing_panel_image_is_drawn_blank():
    spec = PageSpec(100, 100, (1,))
    page = compose_page(spec, [None], [None])
    assert page.getpixel((50, 50)) == (235, 235, 235)


def test_lettered_page_from_a_story_plan():
    story = validate_story(
        {"characters": {"mira": {"description": "a girl"}, "bolt": {"description": "a robot"}},
         "page": {"size": {"width": 600, "height": 400}, "margin": 5, "gutter": 2},
         "panels": [{"prompt": "sky", "characters": ["mira", "bolt"], "caption": "At dawn.",
                     "dialogue": [{"who": "bolt", "text": "Beep!"}]}]},
        check_images=False,
    )
    plan = build_plan(story)[0]
    spec = PageSpec.from_settings(story.page, (1,))
    text = PanelText.from_plan(plan)
    assert text.characters == ("mira", "bolt") and text.dialogue == (("bolt", "Beep!"),)
    panel = Image.new("RGB", (32, 32), (40, 90, 160))
    page = np.asarray(compose_page(spec, [panel], [text]))
    (x0, y0, x1, y1), border = panel_rects(spec)[0], spec.border
    inside = page[y0 + border:y1 - border, x0 + border:x1 - border]
    planned = plan_lettering((x1 - x0, y1 - y0), text, None, panel.size, inset=border + 4)
    # The balloon: white, outlined, holding its text's ink, where the plan put it, its tail
    # reaching towards bolt (the right-hand box), not mira.
    (balloon,) = pagescan.find_balloons(inside)
    assert balloon.ink >= 40 and balloon.outline_dark > 0.4
    bx0, by0, bx1, by1 = (v - border for v in planned.balloons[0].rect)
    # (within a few pixels: the tail's root widens the box where it leaves it)
    assert all(abs(found - wanted) <= 8 for found, wanted in zip(balloon.bbox, (bx0, by0, bx1, by1)))
    tip = planned.balloons[0].tail[1]
    assert math.dist(balloon.tip, (tip[0] - border, tip[1] - border)) <= 4
    assert balloon.tip[0] > inside.shape[1] / 2
    # The caption: in the top-left corner, with its text.
    (caption,) = pagescan.find_captions(inside)
    _, (cx0, cy0, _, _), ink = caption
    assert 4 <= cx0 <= 7 and 4 <= cy0 <= 7 and ink >= 20
    # Elsewhere the panel's own colour.
    lettered = balloon.shape | caption[0]
    grown = np.lib.stride_tricks.sliding_window_view(np.pad(lettered, 3), (7, 7)).any(axis=(-1, -2))
    assert (inside[~grown] == (40, 90, 160)).all()


# --------------------------------------------------------------------------------------------
# Balloons
# --------------------------------------------------------------------------------------------


def synthetic_maps(size=32):
    """Character 0 fills the left half; character 1 (the speaker) the bottom-right corner."""
    maps = np.zeros((3, size, size))
    maps[0, :, : size // 2] = 1.0
    maps[1, int(size * 0.6) :, size // 2 :] = 1.0
    maps[2] = 1.0 - maps[0] - maps[1]
    return maps


def test_balloon_avoids_character_mass_and_points_at_the_speaker():
    panel = (400, 300)
    text = PanelText(dialogue=(("bolt", "Over here!"),), characters=("mira", "bolt"))
    # The image has the frame's shape (no crop); its maps are at a lower resolution.
    lettering = plan_lettering(panel, text, routing_maps=synthetic_maps(), image_size=(80, 60))
    (balloon,) = lettering.balloons
    x0, y0, x1, y1 = balloon.rect
    # Only the top-right region (x >= 200, y < 180) is free of characters.
    assert x0 >= 200 and y1 <= 180, balloon.rect
    # The speaker's centre of mass: rows 19..31 of 32 -> y = 25.5 / 32 of the panel.
    assert balloon.target == pytest.approx((300.0, 25.5 / 32 * 300))
    base_a, tip, base_b = balloon.tail
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    to_target = (balloon.target[0] - centre[0], balloon.target[1] - centre[1])
    to_tip = (tip[0] - centre[0], tip[1] - centre[1])
    cosine = (to_target[0] * to_tip[0] + to_target[1] * to_tip[1]) / (
        math.hypot(*to_target) * math.hypot(*to_tip)
    )
    assert cosine > 0.999
    assert math.dist(tip, balloon.target) < math.dist(centre, balloon.target)
    assert not (x0 <= tip[0] <= x1 and y0 <= tip[1] <= y1)  # the tip sticks out


def test_balloon_placement_follows_the_maps_when_characters_move():
    maps = synthetic_maps()
    mirrored = maps[:, :, ::-1].copy()  # mira on the right, bolt bottom-left
    text = PanelText(dialogue=(("bolt", "Hi"),), characters=("mira", "bolt"))
    (balloon,) = plan_lettering((400, 300), text, routing_maps=mirrored, image_size=(80, 60)).balloons
    assert balloon.rect[2] <= 200 and balloon.rect[3] <= 180


def test_two_balloons_do_not_overlap_each_other_or_the_caption():
    text = PanelText(
        caption="Later.", dialogue=(("mira", "One"), ("bolt", "Two")), characters=("mira", "bolt"),
        boxes=((0.0, 0.2, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)),
    )
    lettering = plan_lettering((500, 400), text)
    rects = [lettering.caption.rect] + [b.rect for b in lettering.balloons]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), rects


def test_without_maps_the_placement_boxes_are_avoided():
    text = PanelText(dialogue=(("mira", "Hello"),), characters=("mira",), boxes=((0.0, 0.0, 0.6, 1.0),))
    (balloon,) = plan_lettering((400, 300), text).balloons
    assert balloon.rect[0] >= 0.6 * 400 - 1
    assert balloon.target == pytest.approx((120.0, 150.0))


def test_routing_maps_must_have_one_map_per_character_plus_background():
    text = PanelText(dialogue=(("bolt", "Hi"),), characters=("mira", "bolt"))
    with pytest.raises(ValueError, match=r"\(3, H, W\) for 2 characters"):
        plan_lettering((100, 100), text, routing_maps=np.zeros((2, 8, 8)))


def test_place_balloon_picks_the_emptiest_candidate():
    grid = np.ones((64, 64))
    grid[40:, 40:] = 0.0  # only the bottom-right is empty
    from anystory_cli.layout import MassField

    rect = place_balloon((640, 640), (150, 150), MassField(grid, (640, 640)))
    assert rect[0] >= 400 and rect[1] >= 400


def test_maps_and_boxes_account_for_the_cover_crop():
    # A wide image in a square frame: the outer quarters are cropped away.
    maps = np.zeros((2, 10, 40))
    maps[0, :, :10] = 1.0  # the character stands in the left quarter, which is cropped
    maps[1] = 1.0 - maps[0]
    field = mass_from_maps(maps, (100, 100), (0.25, 0.0, 0.75, 1.0))
    assert field.total == 0.0
    boxes = mass_from_boxes([(0.25, 0.0, 0.5, 1.0)], (100, 100), (0.25, 0.0, 0.75, 1.0), cells=10)
    assert boxes.grid[:, :5].all() and not boxes.grid[:, 5:].any()


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def test_the_lettering_font_comes_from_the_font_package():
    path = default_font_path()
    assert path.suffix == ".ttf" and "fontpkg_luckiest_guy" in str(path)


def test_wrap_text_respects_the_width():
    font = load_font(None, 20)
    lines = wrap_text("the quick brown fox jumps over the lazy dog", font, 120)
    assert len(lines) > 1 and all(font.getlength(line) <= 120 for line in lines)
    assert " ".join(lines) == "the quick brown fox jumps over the lazy dog"
    assert wrap_text("a\nb", font, 500) == ["a", "b"]
    assert all(font.getlength(p) <= 40 for p in wrap_text("Supercalifragilistic", font, 40))


def test_fit_text_shrinks_then_truncates():
    short = fit_text("Hi!", None, 200, 100, max_size=30)
    assert short.font_size == 30
    long = fit_text("word " * 40, None, 200, 100, max_size=30)
    assert long.font_size < 30 and long.width <= 200 and long.height <= 100
    hopeless = fit_text("word " * 400, None, 100, 40, max_size=20, min_size=10)
    assert hopeless.font_size == 10 and hopeless.lines[-1].endswith("...")
    assert hopeless.height <= 40


def test_characters_the_font_lacks_are_detected():
    assert undrawable_characters("Hello, café! 42") == []
    # The comic font alone (no installed fallbacks) has no Han or Cyrillic letters.
    assert undrawable_characters("Hi 中文 中 Ж", fallbacks=False) == ["中", "文", "Ж"]
    assert undrawable_characters("Hi \U0010fffd") == ["\U0010fffd"]  # no font has it


def test_text_no_font_can_draw_is_a_clear_error_not_boxes():
    spec = PageSpec(300, 300, (1,))
    text = PanelText(dialogue=(("mira", "hi \U0010fffd\U0010fffe"),), characters=("mira",),
                     boxes=((0, 0, 1, 1),))
    with pytest.raises(InputError, match=r"no lettering font draws '\\U0010fffd' \(U\+10FFFD\), "
                                         r"'\\U0010fffe' \(U\+10FFFE\)"):
        compose_page(spec, [Image.new("RGB", (8, 8))], [text])


def _dejavu():
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def test_page_font_letters_the_page(tmp_path):
    """`page.font` reaches the page: its balloons are lettered with that font."""
    story = {"page": {"size": {"width": 300, "height": 200}, "font": str(_dejavu())},
             "characters": {"mira": {"description": "a girl"}},
             "panels": [{"prompt": "a hill", "characters": ["mira"], "dialogue": [{"who": "mira", "text": "Hello!"}]}]}
    settings = validate_story(story, base_dir=tmp_path, check_images=False).page
    spec = PageSpec.from_settings(settings, (1,))
    assert spec.font == (str(_dejavu()),)
    text = PanelText(dialogue=(("mira", "Hello!"),), characters=("mira",), boxes=((0.0, 0.2, 0.5, 1.0),))
    panel = Image.new("RGB", (32, 32), (40, 90, 160))
    default = np.asarray(compose_page(PageSpec(300, 200, (1,)), [panel], [text]))
    lettered = np.asarray(compose_page(spec, [panel], [text]))
    assert (default != lettered).any(axis=-1).sum() > 50
