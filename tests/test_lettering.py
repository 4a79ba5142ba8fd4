"""Lettering read back from the pages render_story composes: a balloon per line of dialogue
(white, outlined, holding its text's ink) whose tail points at its speaker's routed region, none
where a panel has no dialogue, and captions in the reading-start corner."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import pagescan
import storykit
from anystory_cli.render import render_story

# 640 x 220 px at 254 dpi (10 px a millimetre): 10 px margins and gutters, 8 px borders, three
# 200 x 200 frames in a row; a 32 x 32 panel image fills its frame without a crop.
PAGE = {"size": {"width": 640, "height": 220}, "dpi": 254, "margin": 1, "gutter": 1, "border": 0.8,
        "layout": [3]}
FRAMES = [(10, 10, 210, 210), (220, 10, 420, 210), (430, 10, 630, 210)]
BORDER = 8
INSET = BORDER + 4  # lettering keeps this far from the frame's edge
TWO = [{"name": "mira", "at": "left"}, {"name": "bolt", "at": "right"}]
PANELS = [
    {"prompt": "mira and bolt", "characters": TWO, "caption": "Later.",
     "dialogue": [{"who": "bolt", "text": "Over here!"}]},
    {"prompt": "mira and bolt again", "characters": TWO,
     "dialogue": [{"who": "mira", "text": "Hi!"}, {"who": "bolt", "text": "Hello there."}]},
    {"prompt": "pip alone", "characters": ["pip"]},
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


def render(tmp_path, pipeline, panels=PANELS, **page):
    story = storykit.write_story(tmp_path / "s", panels, page={**PAGE, **page})
    out = tmp_path / "out"
    render_story(story, out, pipeline_factory=storykit.TinyFactory(pipeline),
                 model_fingerprint=storykit.tiny_fingerprint, cache_dir=tmp_path / "cache", save_routing=True)
    return out


def inside(page: np.ndarray, frame) -> np.ndarray:
    """A frame's pixels inside its border."""
    x0, y0, x1, y1 = frame
    return page[y0 + BORDER:y1 - BORDER, x0 + BORDER:x1 - BORDER]


def speaker_target(out, panel_number: int, entry: int) -> tuple[float, float]:
    """Centre of mass of a character's routing map, in the coordinates of `inside(frame)`."""
    maps = np.load(out / "panels" / f"panel-{panel_number:03d}-routing.npy")
    weights = maps[entry]
    height, width = weights.shape
    cx = ((np.arange(width) + 0.5) / width * weights.sum(axis=0)).sum() / weights.sum()
    cy = ((np.arange(height) + 0.5) / height * weights.sum(axis=1)).sum() / weights.sum()
    size = FRAMES[0][2] - FRAMES[0][0]
    return cx * size - BORDER, cy * size - BORDER


def points_at(balloon: pagescan.Balloon, target) -> bool:
    """The tail leaves the balloon towards `target` and ends nearer to it than the balloon is."""
    assert balloon.tip is not None
    to_tip = (balloon.tip[0] - balloon.centre[0], balloon.tip[1] - balloon.centre[1])
    to_target = (target[0] - balloon.centre[0], target[1] - balloon.centre[1])
    cosine = (to_tip[0] * to_target[0] + to_tip[1] * to_target[1]) / (math.hypot(*to_tip) * math.hypot(*to_target))
    return cosine > 0.9 and math.dist(balloon.tip, target) < math.dist(balloon.centre, target)


def check_balloons(frame_pixels, lines, targets):
    """One balloon per line, each outlined, holding ink, its tail pointing at its own speaker."""
    balloons = pagescan.find_balloons(frame_pixels)
    assert len(balloons) == len(lines), [b.bbox for b in balloons]
    for balloon in balloons:
        assert balloon.ink >= 40, "a balloon without its text"
        assert balloon.outline_dark > 0.4, "a balloon without its outline"
        assert balloon.tip is not None, "a balloon without a tail"
    speakers = [who for who, _ in lines]
    matched = sorted(who for balloon in balloons for who in set(speakers) if points_at(balloon, targets[who]))
    assert matched == sorted(speakers), (matched, [(b.centre, b.tip) for b in balloons], targets)
    return balloons


def test_each_line_is_an_outlined_balloon_with_its_text_and_a_tail_toward_its_speaker(tmp_path, tiny_story_pipeline):
    out = render(tmp_path, tiny_story_pipeline)
    page = np.asarray(Image.open(out / "pages" / "page-001.png").convert("RGB"))
    targets = {n: {"mira": speaker_target(out, n, 0), "bolt": speaker_target(out, n, 1)} for n in (1, 2)}
    # The two speakers stand apart (left and right columns): a tail can only point at one of them.
    assert targets[1]["mira"][0] < 90 < targets[1]["bolt"][0]
    check_balloons(inside(page, FRAMES[0]), [("bolt", "Over here!")], targets[1])
    two = check_balloons(inside(page, FRAMES[1]), [("mira", "Hi!"), ("bolt", "Hello there.")], targets[2])
    assert not (two[0].shape & two[1].shape).any()
    # The longer line holds more ink.
    by_speaker = {who: b for b in two for who in ("mira", "bolt") if points_at(b, targets[2][who])}
    assert by_speaker["bolt"].ink > by_speaker["mira"].ink
    # No dialogue, no caption: nothing lettered.
    assert pagescan.find_balloons(inside(page, FRAMES[2])) == []
    assert pagescan.find_captions(inside(page, FRAMES[2])) == []


def test_the_third_panel_is_the_panel_image_alone(tmp_path, tiny_story_pipeline):
    """Without text a frame shows exactly its panel image, enlarged crisply (NEAREST)."""
    out = render(tmp_path, tiny_story_pipeline)
    page = np.asarray(Image.open(out / "pages" / "page-001.png").convert("RGB"))
    panel = Image.open(out / "panels" / "panel-003.png").convert("RGB")
    x0, y0, x1, y1 = FRAMES[2]
    expected = np.asarray(panel.resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(inside(page, FRAMES[2]), expected[BORDER:-BORDER, BORDER:-BORDER])


@pytest.mark.parametrize("order", ["ltr", "rtl"])
def test_captions_sit_in_the_reading_start_corner_with_their_text(tmp_path, tiny_story_pipeline, order):
    out = render(tmp_path, tiny_story_pipeline, reading_order=order)
    page = np.asarray(Image.open(out / "pages" / "page-001.png").convert("RGB"))
    first = FRAMES[0] if order == "ltr" else FRAMES[2]  # rtl: the first panel is on the right
    pixels = inside(page, first)
    (caption,) = pagescan.find_captions(pixels)
    _, (x0, y0, x1, y1), ink = caption
    assert ink >= 30
    corner = INSET - BORDER  # in `inside` coordinates
    assert corner <= y0 <= corner + 3
    if order == "ltr":
        assert corner <= x0 <= corner + 3
    else:
        assert pixels.shape[1] - corner - 3 <= x1 <= pixels.shape[1] - corner
    for frame in FRAMES:
        if frame != first:
            assert pagescan.find_captions(inside(page, frame)) == []
