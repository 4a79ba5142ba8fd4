"""What render_story leaves in its output folder as the story changes: pruning, the PDF and CBZ
rewritten exactly when what they hold changes (read back and compared), page DPI, and panels
redrawn when, and only when, their frame's shape changes."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image

import storykit


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


@pytest.fixture
def factory(tiny_story_pipeline):
    return storykit.TinyFactory(tiny_story_pipeline)


render = storykit.render


def files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def pdf_pages(path) -> list[np.ndarray]:
    """Each PDF page's image, decoded (whatever the writer embedded)."""
    import pikepdf

    with pikepdf.open(path) as pdf:
        pages = []
        for page in pdf.pages:
            (raw,) = page.get_images().values()
            pages.append(np.asarray(pikepdf.PdfImage(raw).as_pil_image().convert("RGB"), dtype=np.float32))
        return pages


def pdf_title_and_sizes(path) -> tuple[str, list[list[float]]]:
    """The PDF's title and each page's media box (x0, y0, x1, y1) in points."""
    import pikepdf

    with pikepdf.open(path) as pdf:
        return str(pdf.docinfo.get("/Title", "")), [[float(v) for v in page.MediaBox] for page in pdf.pages]


def png_pages(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
            for p in sorted((out / "pages").glob("page-*.png"))]


def assert_same_pages_in_order(pdf, pngs):
    """Page i of the PDF is page i of the PNGs: close to it (a lossy writer would be allowed some
    levels on average, JPEG on pages of noise) and clearly further from every other page."""
    assert len(pdf) == len(pngs)
    for i, page in enumerate(pdf):
        distances = [np.abs(page - png).mean() if page.shape == png.shape else np.inf for png in pngs]
        assert distances[i] < 15.0, (i, distances)
        assert all(d > 2 * distances[i] + 5.0 for j, d in enumerate(distances) if j != i), (i, distances)


def cbz(out, name="story.cbz"):
    with zipfile.ZipFile(out / name) as archive:
        pages = [np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"), dtype=np.float32)
                 for n in sorted(archive.namelist()) if n.endswith(".png")]
        return pages, ET.fromstring(archive.read("ComicInfo.xml"))


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------


def test_pages_and_panels_the_story_no_longer_has_are_removed(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache", save_routing=True)
    assert {"panels/panel-003.png", "panels/panel-003-routing.png", "panels/panel-003-routing.npy",
            "pages/page-002.png"} <= set(files(out))
    assert len(list((out / ".anystory" / "routing").glob("*.png"))) == 3
    # A selection does not prune (it does not see the whole story).
    storykit.write_story(tmp_path / "s", storykit.panels()[:1])
    render(story, out, factory, tmp_path / "cache", panels=[1])
    assert "panels/panel-003.png" in files(out)
    # The whole story, now one panel: the rest goes, and the routing maps of keys no panel has.
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [] and summary.pages_skipped == [1]  # composed by the selection
    left = files(out)
    for gone in ("panels/panel-002.png", "panels/panel-003.png", "panels/panel-002-routing.png",
                 "panels/panel-003-routing.npy", "pages/page-002.png"):
        assert gone not in left, gone
    assert "panels/panel-001.png" in left and "pages/page-001.png" in left
    assert len(list((out / ".anystory" / "routing").glob("*.png"))) == 1
    assert len(pdf_pages(out / "story.pdf")) == 1 and len(cbz(out)[0]) == 1
    # Files of other names are the user's: kept.
    (out / "pages" / "notes.txt").write_text("mine")
    (out / "pages" / "page-009.jpg").write_bytes(b"mine")
    storykit.write_story(tmp_path / "s", storykit.panels()[:1], title="Again")
    render(story, out, factory, tmp_path / "cache")
    assert (out / "pages" / "notes.txt").exists() and (out / "pages" / "page-009.jpg").exists()


# --------------------------------------------------------------------------------------------
# The PDF and CBZ: order, and rewritten exactly when needed
# --------------------------------------------------------------------------------------------


def test_the_pdf_and_cbz_hold_the_pages_in_order(tmp_path, factory):
    panels = [{"prompt": f"scene {i}", "caption": f"Page {i + 1}.", "page_break": i > 0} for i in range(3)]
    story = storykit.write_story(tmp_path / "s", panels)
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    pngs = png_pages(out)
    assert len(pngs) == 3
    assert_same_pages_in_order(pdf_pages(out / "story.pdf"), pngs)
    pages, info = cbz(out)
    assert len(pages) == 3 and all(np.array_equal(a, b) for a, b in zip(pages, pngs))
    assert info.findtext("PageCount") == "3"


def test_a_new_title_rewrites_both_exports_the_review_page_and_nothing_else(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    before = storykit.snapshot(out)
    storykit.write_story(tmp_path / "s", title="The Lost Kite")
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.exports_written == ["story.pdf", "story.cbz"] and summary.pages_written == []
    assert summary.panels_rendered == []
    assert pdf_title_and_sizes(out / "story.pdf")[0] == "The Lost Kite"
    assert cbz(out)[1].findtext("Title") == "The Lost Kite"
    after = storykit.snapshot(out)
    # review.html shows the title too
    assert {k for k in before if before[k] != after.get(k)} == {"story.pdf", "story.cbz", ".anystory/exports.json",
                                                                 "review.html"}


def test_a_new_dpi_rewrites_the_pages_metadata_and_the_pdf_page_size(tmp_path, factory):
    page = {"size": {"width": 320, "height": 240}, "dpi": 72, "margin": 0, "gutter": 0, "border": 0, "layout": [2]}
    story = storykit.write_story(tmp_path / "s", storykit.panels()[:2], page=page)
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    with Image.open(out / "pages" / "page-001.png") as first:
        assert tuple(round(v) for v in first.info["dpi"]) == (72, 72)
    assert pdf_title_and_sizes(out / "story.pdf")[1][0][2:] == pytest.approx([320, 240])
    storykit.write_story(tmp_path / "s", storykit.panels()[:2], page={**page, "dpi": 144})
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [] and summary.pages_written == [1]
    assert summary.exports_written == ["story.pdf", "story.cbz"]
    with Image.open(out / "pages" / "page-001.png") as again:
        assert tuple(round(v) for v in again.info["dpi"]) == (144, 144)
    # 320 x 240 px at 144 dpi: 160 x 120 pt.
    assert pdf_title_and_sizes(out / "story.pdf")[1][0][2:] == pytest.approx([160, 120])


def test_a_new_reading_order_rewrites_pages_and_exports_right_to_left(tmp_path, factory):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    ltr = png_pages(out)
    storykit.write_story(tmp_path / "s", page={**storykit.PAGE, "reading_order": "rtl"})
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [] and summary.pages_written == [1, 2]
    assert summary.exports_written == ["story.pdf", "story.cbz"]
    rtl = png_pages(out)
    # Page 1 holds two panels: right to left, they swap sides.
    assert np.abs(rtl[0] - ltr[0]).mean() > 5
    assert np.array_equal(rtl[0][:, ::-1].shape, ltr[0].shape)
    assert cbz(out)[1].findtext("Manga") == "YesAndRightToLeft"
    assert_same_pages_in_order(pdf_pages(out / "story.pdf"), rtl)


@pytest.mark.parametrize("name", ["story.pdf", "story.cbz"])
@pytest.mark.parametrize("damage", ["deleted", "edited"])
def test_a_deleted_or_edited_export_is_written_again_alone(tmp_path, factory, name, damage):
    story = storykit.write_story(tmp_path / "s")
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    good = (out / name).read_bytes()
    if damage == "deleted":
        (out / name).unlink()
    else:
        (out / name).write_bytes(good[: len(good) // 2] + b"edited" + good[len(good) // 2:])
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.exports_written == [name] and summary.pages_written == [] and not summary.model_loaded
    assert (out / name).read_bytes() == good
    assert render(story, out, factory, tmp_path / "cache").up_to_date


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def test_a_new_page_size_redraws_the_panels_whose_frame_shape_changed(tmp_path, factory):
    """320 x 320, rows of 2 and 1: two square frames and a 2:1 one. At 640 x 320 the two become
    2:1 and are redrawn wide; the last becomes 4:1, drawn at 2:1 as before: kept."""
    panels = [{"prompt": f"scene {i}", "characters": ["mira"]} for i in range(3)]
    page = {"size": {"width": 320, "height": 320}, "dpi": 72, "margin": 0, "gutter": 0, "border": 0,
            "layout": [2, 1]}
    story = storykit.write_story(tmp_path / "s", panels, page=page)
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    sizes = [Image.open(out / "panels" / f"panel-00{i}.png").size for i in (1, 2, 3)]
    assert sizes == [(32, 32), (32, 32), (64, 32)]
    kept = (out / "panels" / "panel-003.png").read_bytes()
    storykit.write_story(tmp_path / "s", panels, page={**page, "size": {"width": 640, "height": 320}})
    summary = render(story, out, factory, tmp_path / "cache")
    assert summary.panels_rendered == [1, 2] and summary.panels_skipped == [3]
    assert [Image.open(out / "panels" / f"panel-00{i}.png").size for i in (1, 2)] == [(64, 32), (64, 32)]
    assert (out / "panels" / "panel-003.png").read_bytes() == kept


def test_a_new_layout_redraws_only_the_panels_whose_frame_shape_changed(tmp_path, factory):
    panels = [{"prompt": f"scene {i}"} for i in range(3)]
    page = {"size": {"width": 320, "height": 320}, "dpi": 72, "margin": 0, "gutter": 0, "border": 0,
            "layout": [2, 1]}
    story = storykit.write_story(tmp_path / "s", panels, page=page)
    out = tmp_path / "out"
    render(story, out, factory, tmp_path / "cache")
    kept = (out / "panels" / "panel-002.png").read_bytes()
    storykit.write_story(tmp_path / "s", panels, page={**page, "layout": [1, 2]})
    summary = render(story, out, factory, tmp_path / "cache")
    # Panel 1: square -> 2:1; panel 2: square -> square; panel 3: 2:1 -> square.
    assert summary.panels_rendered == [1, 3] and summary.panels_skipped == [2]
    assert Image.open(out / "panels" / "panel-001.png").size == (64, 32)
    assert Image.open(out / "panels" / "panel-003.png").size == (32, 32)
    assert (out / "panels" / "panel-002.png").read_bytes() == kept
