"""Exports: atomic writes, PNG/PDF/CBZ contents, ComicInfo.xml, failures that keep old files."""

from __future__ import annotations

import io
import os
import re
import stat
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anystory_cli.errors import OutputError
from anystory_cli.export import (
    atomic_write,
    comic_info_xml,
    ensure_dir,
    write_cbz,
    write_pdf,
    write_png,
)


def pages(count=2, size=(30, 40)):
    return [Image.new("RGB", size, (40 * i, 100, 200)) for i in range(count)]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------------


def test_png_is_written_whole_with_usual_permissions(tmp_path):
    path = write_png(pages(1)[0], tmp_path / "sub" / "page.png", dpi=150)
    with Image.open(path) as image:
        assert image.size == (30, 40)
        assert round(image.info["dpi"][0]) == 150
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert leftovers(path.parent) == []


def test_pdf_has_one_page_per_image_and_the_title(tmp_path):
    path = write_pdf(pages(3), tmp_path / "comic.pdf", title="Kite", dpi=100)
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", data)) == 3
    assert b"/Title" in data
    # 30 x 40 px at 100 dpi = 21.6 x 28.8 pt.
    assert b"/MediaBox [ 0 0 21.6 28.8 ]" in data


def _pdf_pages(path):
    """(media box in points, the embedded image decoded) for each page of the PDF."""
    import pikepdf

    with pikepdf.open(path) as pdf:
        found = []
        for page in pdf.pages:
            (raw,) = page.get_images().values()
            found.append(([float(v) for v in page.MediaBox],
                          pikepdf.PdfImage(raw).as_pil_image().convert("RGB")))
        return found


def test_pdf_embeds_each_page_without_loss(tmp_path):
    # Noise and a sharp black-on-white edge: any JPEG step would change pixels.
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    lettered = Image.new("RGB", (30, 40), "white")
    lettered.paste((0, 0, 0), (5, 5, 9, 35))
    palette = lettered.convert("P")  # not RGB: converted as the PNG page is
    images = [noisy, lettered, palette]
    path = write_pdf(images, tmp_path / "comic.pdf", title="小猫 Kite", dpi=100)
    assert b"/DCTDecode" not in path.read_bytes()
    decoded = _pdf_pages(path)
    assert len(decoded) == 3
    for image, (box, page) in zip(images, decoded):
        assert box == pytest.approx([0, 0, 21.6, 28.8])  # 30 x 40 px at 100 dpi
        assert np.array_equal(np.asarray(page), np.asarray(image.convert("RGB")))


def test_pdf_page_decodes_to_the_page_png(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8))]
    png_path = write_png(images[0], tmp_path / "out" / "pages" / "page-001.png", dpi=72)
    (box, page), = _pdf_pages(write_pdf(images, tmp_path / "out" / "comic.pdf", "Kite", dpi=72))
    assert box == pytest.approx([0, 0, 36, 24])
    with Image.open(png_path) as png:
        assert np.array_equal(np.asarray(page), np.asarray(png.convert("RGB")))


def test_pdf_bytes_are_the_same_for_the_same_pages(tmp_path):
    first = write_pdf(pages(2), tmp_path / "a.pdf", title="Kite", dpi=100).read_bytes()
    second = write_pdf(pages(2), tmp_path / "b.pdf", title="Kite", dpi=100).read_bytes()
    assert first == second
    other = write_pdf(pages(2, size=(31, 40)), tmp_path / "c.pdf", title="Kite", dpi=100)
    assert other.read_bytes() != first


def test_cbz_holds_the_pages_and_a_valid_comic_info(tmp_path):
    images = pages(3)
    path = write_cbz(images, tmp_path / "comic.cbz", "The Lost Kite", "rtl", ["mira", "bolt"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names == ["001.png", "002.png", "003.png", "ComicInfo.xml"]
        with Image.open(io.BytesIO(archive.read("002.png"))) as second:
            assert second.size == (30, 40) and second.getpixel((0, 0)) == (40, 100, 200)
        sizes = [archive.getinfo(n).file_size for n in names[:3]]
        root = ET.fromstring(archive.read("ComicInfo.xml"))
    assert root.tag == "ComicInfo"
    assert root.findtext("Title") == "The Lost Kite"
    assert root.findtext("PageCount") == "3"
    assert root.findtext("Manga") == "YesAndRightToLeft"
    assert root.findtext("Characters") == "mira, bolt"
    page_nodes = root.find("Pages").findall("Page")
    assert [p.get("Image") for p in page_nodes] == ["0", "1", "2"]
    assert [int(p.get("ImageSize")) for p in page_nodes] == sizes
    assert all((p.get("ImageWidth"), p.get("ImageHeight")) == ("30", "40") for p in page_nodes)
    assert page_nodes[0].get("Type") == "FrontCover"
    # Elements appear in the order of the ComicInfo 2.0 schema.
    order = [child.tag for child in root]
    assert order == ["Title", "Notes", "PageCount", "Manga", "Characters", "Pages"]


def test_comic_info_for_left_to_right_and_escaped_title():
    root = ET.fromstring(comic_info_xml("Cats & <Dogs>", [(10, 20, 99)], "ltr"))
    assert root.findtext("Title") == "Cats & <Dogs>"
    assert root.findtext("Manga") == "No"
    assert root.find("Characters") is None


def test_png_carries_its_text_chunks(tmp_path):
    path = write_png(pages(1)[0], tmp_path / "page.png", text={"anystory:key": "abc", "Title": "Kite"})
    with Image.open(path) as image:
        assert image.text == {"anystory:key": "abc", "Title": "Kite"}
        assert "dpi" not in image.info


# --------------------------------------------------------------------------------------------
# Failures: an error naming the path, no partial file, the earlier file intact
# --------------------------------------------------------------------------------------------


def _failing_save(self, fp, *args, **kwargs):
    """Image.save that writes half a file, then hits a full disk."""
    fp.write(b"half a file")
    raise OSError(28, "No space left on device")


WRITERS = {
    "png": lambda path: write_png(pages(1)[0], path),
    "pdf": lambda path: write_pdf(pages(2), path, "T"),
    "cbz": lambda path: write_cbz(pages(2), path, "T"),
}


@pytest.mark.parametrize("name, writer", WRITERS.items(), ids=WRITERS.keys())
def test_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch, name, writer):
    target = tmp_path / f"comic.{name}"
    writer(target)
    before = target.read_bytes()
    monkeypatch.setattr(Image.Image, "save", _failing_save)
    with pytest.raises(OutputError, match=rf"comic\.{name}: write failed \(No space left on device: the disk is full"):
        writer(target)
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_rename_keeps_the_earlier_file(tmp_path, monkeypatch):
    target = tmp_path / "page.png"
    target.write_bytes(b"old page")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="page.png"):
        write_png(pages(1)[0], target)
    assert target.read_bytes() == b"old page"
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "page.png"
    target.write_bytes(b"old page")

    def interrupted(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old page"
    assert leftovers(tmp_path) == []


def test_output_folder_under_a_file_is_an_output_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    for writer in WRITERS.values():
        with pytest.raises(OutputError, match="not-a-folder"):
            writer(blocker / "out" / "comic")
    assert blocker.read_text() == "x"
    with pytest.raises(OutputError, match="exists and is not a folder"):
        ensure_dir(blocker)


@pytest.mark.parametrize("name, writer", WRITERS.items(), ids=WRITERS.keys())
def test_read_only_output_folder_is_an_output_error(tmp_path, monkeypatch, name, writer):
    """A folder that refuses new files (read-only; also for root, by refusing the temporary file
    as the OS does for other users) is an OutputError naming it, and the earlier file stays."""
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / f"comic.{name}"
    target.write_bytes(b"old file")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"ro: cannot write here \(Permission denied\)"):
        writer(target)
    assert target.read_bytes() == b"old file"
    assert sorted(p.name for p in folder.iterdir()) == [f"comic.{name}"]


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "page.png"
    target.write_bytes(b"old")
    target.chmod(0o600)
    write_png(pages(1)[0], target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_long_pdf_is_joined_in_order_and_leaves_no_parts_behind(tmp_path, monkeypatch):
    import anystory_cli.export as export

    monkeypatch.setattr(export, "_PARTS_AT_ONCE", 3)  # joined in groups, then the groups joined
    images = pages(7)
    files = [write_png(image, tmp_path / "pages" / f"page-{i:03d}.png", dpi=100, text={"anystory:key": "k"})
             for i, image in enumerate(images)]
    mixed = [files[0], images[1], *files[2:]]  # page files are used as they are, images encoded
    decoded = _pdf_pages(write_pdf(mixed, tmp_path / "comic.pdf", "Kite", dpi=100))
    assert [np.asarray(page).tolist() for _, page in decoded] == [np.asarray(i).tolist() for i in images]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comic.pdf", "pages"]
    monkeypatch.setattr(Image.Image, "save", _failing_save)
    with pytest.raises(OutputError):
        write_pdf(images, tmp_path / "comic.pdf", "Kite", dpi=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comic.pdf", "pages"]
