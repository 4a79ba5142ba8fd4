"""render_story on a tiny real AnyStoryPipeline: outputs, skipping, selection, characters."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import storykit
import tiny
from anystory_cli.render.sheets import character_card, segment_sheet
from anystory_cli.errors import InputError, ModelError, OutputError, StoryError
from anystory_cli.plan import build_plan
from anystory_cli.render import (
    KEY_TEXT,
    aspect_multipliers,
    parse_ranges,
    render_story,
    select_panels,
)
from anystory_cli.story import validate_story


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture
def factory(tiny_story_pipeline):
    return storykit.TinyFactory(tiny_story_pipeline)


render = storykit.render


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, numbers", [
    ("1", [1]), ("1-3", [1, 2, 3]), ("1,3-4", [1, 3, 4]), (" 2 , 1 ", [1, 2]), ("2-2,2", [2]),
])
def test_parse_ranges(text, numbers):
    assert parse_ranges(text) == numbers


@pytest.mark.parametrize("text", ["", "0", "3-1", "a", "1-", "1,,2", "-1"])
def test_parse_ranges_refuses(text):
    with pytest.raises(InputError):
        parse_ranges(text)


def test_select_panels_by_page_and_panel_number():
    story = validate_story({"panels": [{"prompt": "a"}, {"prompt": "b"},
                                       {"prompt": "c", "page_break": True}]}, check_images=False)
    plans = build_plan(story)
    assert select_panels(plans, None, None) == {0, 1, 2}
    assert select_panels(plans, [2], None) == {2}
    assert select_panels(plans, [1], [3]) == {0, 1, 2}
    with pytest.raises(InputError, match="2 page"):
        select_panels(plans, [3], None)
    with pytest.raises(InputError, match="3 panel"):
        select_panels(plans, None, [4])


@pytest.mark.parametrize("frame, multipliers", [
    ((100, 100), (1.0, 1.0)), ((104, 100), (1.0, 1.0)), ((210, 100), (2.0, 1.0)),
    ((500, 100), (2.0, 1.0)), ((150, 100), (1.5, 1.0)), ((100, 150), (1.0, 1.5)),
])
def test_image_shape_follows_the_frame(frame, multipliers):
    assert aspect_multipliers(frame) == multipliers


def test_segment_sheet_finds_a_figure_on_a_plain_background():
    image = np.full((64, 64, 3), 240, np.uint8)
    image[20:50, 24:40] = (200, 30, 30)
    mask, fallback = segment_sheet(Image.fromarray(image))
    assert not fallback
    assert mask[20:50, 24:40].all() and mask.sum() == 30 * 16


def test_segment_sheet_finds_the_character_in_a_scene_of_bands_and_props():
    """The default model draws a sheet as a scene: sky over ground, a sun, the character standing
    across the horizon near the left edge, one eye the sky's colour. The character alone is found,
    eye included; the sun, a smaller part, is left out."""
    sky, ground = (120, 170, 230), (90, 160, 60)
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32], image[32:] = sky, ground
    image[4:10, 50:56] = (250, 220, 60)  # the sun
    image[24:52, 3:17] = (200, 30, 150)  # the character
    image[28:31, 6:9] = sky  # an eye
    mask, fallback = segment_sheet(Image.fromarray(image))
    expected = np.zeros((64, 64), bool)
    expected[24:52, 3:17] = True
    assert not fallback
    np.testing.assert_array_equal(mask, expected)


def test_segment_sheet_of_a_large_sheet_has_its_size():
    image = np.full((512, 384, 3), 235, np.uint8)
    image[160:400, 128:256] = (40, 60, 200)
    mask, fallback = segment_sheet(Image.fromarray(image))
    assert not fallback and mask.shape == (512, 384)
    expected = np.zeros((512, 384), bool)
    expected[160:400, 128:256] = True
    assert (mask != expected).mean() < 0.002  # segmented at 256 px and scaled back


def test_segment_sheet_falls_back_to_the_centre_without_a_background():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask, fallback = segment_sheet(Image.fromarray(noise))
    assert fallback and mask[32, 32] and not mask[0, 0]


def _parts_by_hand(mask: np.ndarray) -> list[set]:
    """4-connected parts of `mask` as pixel sets, in the raster order of their first pixel."""
    height, width = mask.shape
    seen, parts = set(), []
    for start in zip(*np.nonzero(mask)):
        if start in seen:
            continue
        part, todo = set(), [start]
        seen.add(start)
        while todo:
            y, x = todo.pop()
            part.add((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    todo.append((ny, nx))
        parts.append(part)
    return parts


def _largest_part_by_hand(mask: np.ndarray) -> np.ndarray | None:
    parts = _parts_by_hand(mask)
    if not parts:
        return None
    largest = max(parts, key=len)  # max keeps the first of equal sizes
    out = np.zeros(mask.shape, bool)
    out[tuple(np.array(sorted(largest)).T)] = True
    height, width = mask.shape
    for gap in _parts_by_hand(~out):
        if not any(y in (0, height - 1) or x in (0, width - 1) for y, x in gap):
            out[tuple(np.array(sorted(gap)).T)] = True
    return out


def test_largest_part_matches_a_flood_fill_by_hand_on_random_masks():
    """4-connected parts, the first of equal sizes, holes = background no 4-connected path joins
    to the border."""
    from anystory_cli.render.sheets import _largest_part

    rng = np.random.default_rng(0)
    for _ in range(400):
        mask = rng.random(tuple(rng.integers(1, 20, 2))) < rng.uniform(0.1, 0.9)
        expected = _largest_part_by_hand(mask)
        got = _largest_part(mask)
        if expected is None:
            assert got is None
        else:
            assert got.dtype == bool
            np.testing.assert_array_equal(got, expected)


def test_largest_part_connectivity_ties_and_holes():
    from anystory_cli.render.sheets import _largest_part

    assert _largest_part(np.zeros((4, 4), bool)) is None
    diagonal = np.eye(3, dtype=bool)  # three 1-pixel parts: the first in raster order wins
    np.testing.assert_array_equal(_largest_part(diagonal), np.pad([[True]], ((0, 2), (0, 2))))
    tie = np.zeros((3, 7), bool)
    tie[0, 4:6] = tie[2, 1:3] = True  # equal sizes: the one whose first pixel comes first
    np.testing.assert_array_equal(_largest_part(tie), np.pad([[True, True]], ((0, 2), (4, 1))))
    ring = np.ones((5, 5), bool)
    ring[1:4, 1:4] = False
    ring[0, 0] = False  # the inside reaches the border only through a corner: still a hole
    expected = np.ones((5, 5), bool)
    expected[0, 0] = False
    np.testing.assert_array_equal(_largest_part(ring), expected)
    opened = np.ones((5, 5), bool)
    opened[1:4, 1:4] = opened[2, 4] = False  # a 4-connected way out: not a hole
    np.testing.assert_array_equal(_largest_part(opened), opened)


def test_pooled_rows_is_the_running_median_of_five_rows():
    from anystory_cli.render.sheets import _pooled_rows

    colours = np.random.default_rng(0).random((9, 3)).astype(np.float32)
    padded = np.concatenate([colours[:1], colours[:1], colours, colours[-1:], colours[-1:]])
    expected = np.stack([np.sort(padded[y:y + 5], axis=0)[2] for y in range(9)])
    np.testing.assert_array_equal(_pooled_rows(colours), expected)


def test_character_card_shows_reference_and_mask():
    card = character_card(tiny.sprite())
    assert card.size == (2 * 256 + 3 * 8, 256 + 2 * 8)
    mask_tile = np.asarray(card)[8:264, 272:528]
    assert set(np.unique(mask_tile)) <= {0, 255} and mask_tile.max() == 255


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def test_render_writes_panels_pages_pdf_and_cbz(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [1, 2, 3] and summary.pages_written == [1, 2]
    assert summary.cache_misses == 3 and summary.characters_encoded == ["mira", "bolt", "pip"]
    for name in ["panels/panel-001.png", "panels/panel-002.png", "panels/panel-003.png",
                 "pages/page-001.png", "pages/page-002.png", "story.pdf", "story.cbz"]:
        assert (out / name).is_file(), name
    page = Image.open(out / "pages" / "page-001.png")
    assert page.size == (320, 240)
    with zipfile.ZipFile(out / "story.cbz") as archive:
        assert sorted(archive.namelist()) == ["001.png", "002.png", "ComicInfo.xml"]
        assert b"<PageCount>2</PageCount>" in archive.read("ComicInfo.xml")
    assert len(re.findall(rb"/Type\s*/Page\b", (out / "story.pdf").read_bytes())) == 2
    # Each panel carries its content key; the summary lists every file it wrote.
    assert Image.open(out / "panels" / "panel-001.png").text[KEY_TEXT]
    assert {Path(f).relative_to(out).as_posix() for f in summary.files_written} >= {
        "panels/panel-001.png", "pages/page-002.png", "story.pdf", "story.cbz"}


def test_unchanged_story_draws_nothing_loads_no_model_and_writes_nothing(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    before = storykit.snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    factory.calls = 0
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.up_to_date and summary.panels_rendered == [] and summary.panels_skipped == [1, 2, 3]
    assert summary.pages_skipped == [1, 2] and not summary.model_loaded and factory.calls == 0
    assert storykit.snapshot(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def test_one_changed_prompt_redraws_only_that_panel_and_its_page(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    before = storykit.snapshot(out)
    panels = storykit.panels()
    panels[2]["prompt"] = "everyone at night"
    storykit.write_story(tmp_path / "s", panels)
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [3] and summary.panels_skipped == [1, 2]
    assert summary.pages_written == [2] and summary.pages_skipped == [1]
    assert summary.cache_hits == 3 and summary.cache_misses == 0
    after = storykit.snapshot(out)
    assert after["panels/panel-001.png"] == before["panels/panel-001.png"]
    assert after["pages/page-001.png"] == before["pages/page-001.png"]
    assert after["panels/panel-003.png"] != before["panels/panel-003.png"]
    assert after["story.cbz"] != before["story.cbz"]


def test_a_new_caption_recomposes_without_drawing(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    panels = storykit.panels()
    panels[0]["caption"] = "A calm morning."
    storykit.write_story(tmp_path / "s", panels)
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [] and summary.pages_written == [1]
    assert not summary.model_loaded


def test_same_story_same_pixels(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    render(story, tmp_path / "a", factory, tmp_path / "cache")
    render(story, tmp_path / "b", factory, tmp_path / "cache2")
    a, b = storykit.snapshot(tmp_path / "a"), storykit.snapshot(tmp_path / "b")
    for name in ["panels/panel-001.png", "panels/panel-003.png", "pages/page-001.png", "story.cbz"]:
        assert a[name] == b[name], name


def test_the_figure_paste_changes_character_panels_only(tmp_path, factory):
    """style.paste_references_at reaches the pipeline: 0 draws without a paste, the default pastes
    each character's figure; a panel without characters has nothing to paste."""
    story_panels = [storykit.panels()[1], {"prompt": "an empty hill"}]
    drawn = {}
    for at in (0.0, 0.4):
        style = {**storykit.STYLE, "steps": 4, "paste_references_at": at}
        story = storykit.write_story(tmp_path / f"story{at}", story_panels, style=style)
        render(story, tmp_path / f"out{at}", factory, tmp_path / f"cache{at}")
        drawn[at] = [np.asarray(Image.open(tmp_path / f"out{at}" / "panels" / f"panel-00{i}.png")) for i in (1, 2)]
    assert np.abs(drawn[0.0][0].astype(int) - drawn[0.4][0].astype(int)).max() > 0
    np.testing.assert_array_equal(drawn[0.0][1], drawn[0.4][1])


def test_settings_of_the_characters_alone_redraw_only_their_panels(tmp_path, factory):
    """Changing the reference strength, reference guidance and paste redraws the panels with
    characters; a panel without characters keeps its file, the very pixels a fresh render draws."""
    story_panels = [storykit.panels()[1], {"prompt": "an empty hill"}]
    style = {**storykit.STYLE, "steps": 4}
    out = tmp_path / "out"
    render(storykit.write_story(tmp_path / "s", story_panels, style=style), out, factory, tmp_path / "cache")
    changed = {**style, "reference_strength": 2.0, "reference_guidance": False, "paste_references_at": 0.0}
    story = storykit.write_story(tmp_path / "s", story_panels, style=changed)
    assert render(story, out, factory, tmp_path / "cache").panels_rendered == [1]
    render(story, tmp_path / "fresh", factory, tmp_path / "cache")
    kept, fresh = (np.asarray(Image.open(folder / "panels" / "panel-002.png")) for folder in (out, tmp_path / "fresh"))
    np.testing.assert_array_equal(kept, fresh)


def test_pages_selection_draws_those_panels_and_holds_back_pdf(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    summary = render(story, out, factory, tmp_path / "cache", pages=[2])
    assert summary.panels_rendered == [3] and summary.pages_written == [2]
    assert summary.pages_incomplete == [1] and not (out / "story.pdf").exists()
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [1, 2] and summary.exports_written == ["story.pdf", "story.cbz"]


def test_save_routing_writes_maps_and_overlay(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache", save_routing=True, panels=[2])
    maps = np.load(out / "panels" / "panel-002-routing.npy", allow_pickle=False)
    panel = Image.open(out / "panels" / "panel-002.png")
    assert maps.shape == (3, panel.height, panel.width)  # mira, bolt, background
    assert np.allclose(maps.sum(axis=0), 1.0, atol=0.02)
    assert Image.open(out / "panels" / "panel-002-routing.png").size == panel.size


def test_text_only_character_gets_a_cached_sheet(tmp_path, factory):
    characters = {"pip": {"description": "a small green creature"}}
    panels = [{"prompt": "pip on a hill", "characters": ["pip"]}, {"prompt": "pip at night", "characters": ["pip"]}]
    story = storykit.write_story(tmp_path / "s", panels, characters)
    summary = render(story, tmp_path / "a", factory, tmp_path / "cache")
    assert summary.characters_encoded == ["pip"] and summary.panels_rendered == [1, 2]
    sheet = Image.open(tmp_path / "a" / "characters" / "pip.png")
    assert sheet.mode == "RGBA" and np.asarray(sheet)[..., 3].max() == 255
    again = render(story, tmp_path / "b", factory, tmp_path / "cache")
    assert again.cache_hits == 1 and again.characters_encoded == []
    assert (tmp_path / "b" / "characters" / "pip.png").read_bytes() == \
        (tmp_path / "a" / "characters" / "pip.png").read_bytes()


def test_a_mirrored_character_is_drawn_as_its_mirrored_reference(tmp_path, factory):
    """`mirrored: true` draws exactly the panel that a reference flipped left to right draws."""
    sprite = tiny.sprite(storykit.COLOURS["mira"])
    sprite.paste((250, 220, 40, 255), (8, 10, 22, 30))  # a yellow patch on its left: not symmetric
    drawn = {}
    for name, image, ref in (("mirrored", sprite, {"name": "mira", "mirrored": True}),
                             ("flipped", sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "mira")):
        (tmp_path / name / "characters").mkdir(parents=True)
        image.save(tmp_path / name / "characters" / "mira.png")
        story = storykit.write_story(tmp_path / name, [{"prompt": "mira", "characters": [ref]}],
                                     {"mira": {"image": "characters/mira.png"}})
        summary = render(story, tmp_path / f"out-{name}", factory, tmp_path / f"cache-{name}")
        assert summary.characters_encoded == (["mira (mirrored)"] if name == "mirrored" else ["mira"])
        drawn[name] = np.asarray(Image.open(tmp_path / f"out-{name}" / "panels" / "panel-001.png"))
    np.testing.assert_array_equal(drawn["mirrored"], drawn["flipped"])


def test_a_text_only_character_mirrored_shares_its_sheet(tmp_path, factory):
    characters = {"pip": {"description": "a small green creature"}}
    panels = [{"prompt": "pip", "characters": [{"name": "pip", "mirrored": True}]},
              {"prompt": "pip", "characters": ["pip"]}]
    story = storykit.write_story(tmp_path / "s", panels, characters)
    events = []
    summary = render(story, tmp_path / "out", factory, tmp_path / "cache", progress=events.append)
    assert summary.characters_encoded == ["pip (mirrored)", "pip"] and summary.panels_rendered == [1, 2]
    assert [e.message for e in events if "drawing a character sheet" in e.message] == \
        ["pip: drawing a character sheet from its description"]  # once, not once per encoding
    plain = storykit.write_story(tmp_path / "p", panels[1:], characters)
    render(plain, tmp_path / "plain", factory, tmp_path / "cache-plain")
    assert (tmp_path / "out" / "characters" / "pip.png").read_bytes() == \
        (tmp_path / "plain" / "characters" / "pip.png").read_bytes()


def test_a_new_way_of_drawing_sheets_redraws_their_characters_panels(tmp_path, factory, monkeypatch):
    """A text-only character's encoding follows how its sheet is drawn and cut out, so its panels'
    content keys do too: a new sheet version redraws them, and only them."""
    import anystory_cli.render.characters as render_module

    (tmp_path / "s" / "characters").mkdir(parents=True)
    tiny.sprite(storykit.COLOURS["mira"]).save(tmp_path / "s" / "characters" / "mira.png")
    characters = {"pip": {"description": "a small green creature"}, "mira": {"image": "characters/mira.png"}}
    panels = [{"prompt": "pip on a hill", "characters": ["pip"]}, {"prompt": "mira", "characters": ["mira"]}]
    story = storykit.write_story(tmp_path / "s", panels, characters)
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    assert render(story, out, factory, tmp_path / "cache").panels_rendered == []
    monkeypatch.setattr(render_module, "SHEET_VERSION", render_module.SHEET_VERSION + 1)
    again = render(story, out, factory, tmp_path / "cache")
    assert again.characters_encoded == ["pip"] and again.panels_rendered == [1]


def test_a_sheet_without_a_clear_background_is_not_pasted(tmp_path, factory, monkeypatch):
    """When a sheet's character cannot be cut out, its central box stands for it: that box is
    encoded but not pasted into the panels (it would paste a block of background), then or later
    from the cache."""
    import anystory_cli.render.characters as render_module

    box = np.zeros((32, 32), bool)
    box[4:30, 6:26] = True
    monkeypatch.setattr(render_module, "segment_sheet", lambda sheet: (box, True))
    characters = {"pip": {"description": "a small green creature"}}
    panels = [{"prompt": "pip on a hill", "characters": ["pip"]}]
    drawn = {}
    for at in (0.0, 0.4):
        style = {**storykit.STYLE, "steps": 4, "paste_references_at": at}
        story = storykit.write_story(tmp_path / f"s{at}", panels, characters, style=style)
        summaries = {}
        for run in ("first", "cached"):
            summaries[run] = render(story, tmp_path / f"{run}{at}", factory, tmp_path / f"cache{at}")
            drawn[at, run] = np.asarray(Image.open(tmp_path / f"{run}{at}" / "panels" / "panel-001.png"))
        assert any("not pasted into the panels" in w for w in summaries["first"].warnings)
        assert summaries["cached"].cache_hits == 1
    for run in ("first", "cached"):
        np.testing.assert_array_equal(drawn[0.0, run], drawn[0.4, run])


def test_a_corrupt_cache_entry_is_reported_and_rebuilt_during_a_render(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}])
    render(story, tmp_path / "a", factory, tmp_path / "cache")
    for entry in (tmp_path / "cache" / "encodings").glob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:100])
    events = []
    summary = render(story, tmp_path / "b", factory, tmp_path / "cache", progress=events.append)
    assert summary.cache_rebuilt == 1 and len(summary.warnings) == 1
    assert any(e.kind == "warning" and "corrupt" in e.message for e in events)
    assert (tmp_path / "a" / "panels" / "panel-001.png").read_bytes() == \
        (tmp_path / "b" / "panels" / "panel-001.png").read_bytes()


class _OneCharacterModel:
    """The tiny real pipeline, declared to support one character per image."""

    max_characters = 1

    def __init__(self, pipeline):
        self._pipeline = pipeline

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


def test_more_characters_than_the_model_supports_is_a_story_error(tmp_path, tiny_story_pipeline):
    story = storykit.write_story(tmp_path / "s")
    limited = storykit.TinyFactory(_OneCharacterModel(tiny_story_pipeline))
    with pytest.raises(StoryError, match=r"story.yaml: panels\[1\].characters: 2 characters.*at most 1"):
        render(story, tmp_path / "out", limited, tmp_path / "cache")
    assert not (tmp_path / "out" / "panels").exists()


def test_output_under_a_file_is_an_output_error(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file"):
        render(story, tmp_path / "file" / "out", factory, tmp_path / "cache")
    assert factory.calls == 0


def test_missing_model_folder_says_what_to_put_where(tmp_path):
    story = storykit.write_story(tmp_path / "s", model="models/mine")
    with pytest.raises(ModelError, match=r"story.yaml: model: model folder .*models/mine not found"):
        render_story(story, tmp_path / "out", cache_dir=tmp_path / "cache")


def test_a_local_model_folder_loads_offline_and_renders(tmp_path):
    """The documented layout: save_pretrained pipeline + image_encoder/ + adapter file."""
    from anystory_cli.model_loading import load_pipeline, model_fingerprint
    from anystory_cli.sd.weights import save_adapter

    folder = tmp_path / "models" / "mine"
    base, encoder = tiny.tiny_sd_pipeline(), tiny.tiny_image_encoder()
    base.save_pretrained(folder)
    with pytest.raises(ModelError, match="image_encoder/config.json not found"):
        load_pipeline(str(folder))
    encoder.save_pretrained(folder / "image_encoder")
    with pytest.raises(ModelError, match="anystory_adapter.safetensors not found.*anystory train"):
        load_pipeline(str(folder))
    save_adapter(tiny.tiny_adapter(base.unet, encoder), folder / "anystory_adapter.safetensors")
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}],
                                 model="../models/mine")
    summary = render_story(story, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert summary.panels_rendered == [1] and summary.model_loaded
    assert model_fingerprint(str(folder)) == model_fingerprint("mine", tmp_path / "models")


def test_another_adapter_file_replaces_the_model_s_own(tmp_path):
    """`evaluate adapter --adapter FILE`: the folder's base, that file's weights, its own model id;
    the folder need not hold an adapter of its own."""
    from anystory_cli.model_loading import load_pipeline
    from anystory_cli.sd.weights import save_adapter

    folder = tmp_path / "mine"
    base, encoder = tiny.tiny_sd_pipeline(), tiny.tiny_image_encoder()
    base.save_pretrained(folder)
    encoder.save_pretrained(folder / "image_encoder")
    other = tiny.tiny_adapter(base.unet, encoder, seed=5)
    save_adapter(other, tmp_path / "checkpoint.safetensors")
    with pytest.raises(ModelError, match="missing.safetensors: no adapter file"):
        load_pipeline(str(folder), adapter=tmp_path / "missing.safetensors")
    pipe = load_pipeline(str(folder), adapter=tmp_path / "checkpoint.safetensors")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in pipe.adapter.state_dict().items())
    save_adapter(tiny.tiny_adapter(base.unet, encoder, seed=6), folder / "anystory_adapter.safetensors")
    own = load_pipeline(str(folder))
    assert own.model_id != pipe.model_id
    assert load_pipeline(str(folder), adapter=tmp_path / "checkpoint.safetensors").model_id == pipe.model_id


def test_words_the_default_model_does_not_know_are_reported_per_panel(tmp_path):
    """The default model's tokenizer has one token per world word; any other word would reach it
    as meaningless pieces, so each panel's unknown words are named in a warning."""
    from types import SimpleNamespace

    from anystory_cli.render.model import warn_unknown_words
    from anystory_cli.story import load_story
    from anystory_cli.default_model import build_tokenizer
    from anystory_cli.lab.world import vocabulary

    panels = [{"prompt": "a kite on a hill", "characters": ["mira"]},
              {"prompt": "one character on a hill at night", "characters": ["mira"]}]
    path = storykit.write_story(tmp_path, panels, model="default")
    story = load_story(path)
    plans = build_plan(story, model_id="m")
    pipeline = SimpleNamespace(tokenizer=build_tokenizer(vocabulary()))
    events = []
    warn_unknown_words(story, pipeline, plans, "story.yaml", events.append)
    assert [e.kind for e in events] == ["warning"]
    assert "story.yaml: panels[0].prompt:" in events[0].message and "'kite'" in events[0].message
    assert "'hill'" not in events[0].message
    events.clear()
    other = load_story(storykit.write_story(tmp_path / "other", panels, model="some/folder"))
    warn_unknown_words(other, pipeline, build_plan(other, model_id="m"), "story.yaml", events.append)
    assert events == []  # real CLIP tokenizers read any text
