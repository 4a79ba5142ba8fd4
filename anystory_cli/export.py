"""Writing the comic: PNG files, one multi-page PDF, a CBZ with ComicInfo.xml.

Every file is written to a temporary file in the destination folder and then renamed over the
target (`os.replace`, atomic on one file system): an interrupted or failed write leaves no
partial file and keeps the earlier version intact. OS failures become `OutputError` naming the
path. No torch.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, PngImagePlugin

from anystory_cli.atomic import atomic_path, check_within
from anystory_cli.errors import OutputError


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and parents) if needed; OutputError if that is impossible."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output path {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    return folder


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None],
                 within: str | os.PathLike[str] | None = None) -> Path:
    """Call `write(handle)` on a temp file next to `path`, then rename it over `path`
    (the package's `atomic_path`); the result keeps the replaced file's permissions.
    `within`: refuse a path that symbolic links would take outside that folder."""
    target = Path(path)
    if within is not None:
        check_within(target, within)
    ensure_dir(target.parent)
    with atomic_path(target, within=within) as temp:
        with open(temp, "wb") as handle:
            write(handle)
    return target


def write_png(image: Image.Image, path: str | os.PathLike[str], dpi: int | None = None,
              text: dict[str, str] | None = None, within: str | os.PathLike[str] | None = None) -> Path:
    """A PNG, with its resolution (`dpi`) and text chunks (`text`) when given."""
    info = PngImagePlugin.PngInfo()
    for name, value in (text or {}).items():
        info.add_text(name, value)
    extra = {"dpi": (dpi, dpi)} if dpi else {}
    return atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info, **extra), within)


# A page to export: its image, or the PNG file it was written to (used as it is, not re-encoded).
PageSource = Union[Image.Image, str, os.PathLike]


def write_pdf(
    pages: Iterable[PageSource], path: str | os.PathLike[str], title: str = "", dpi: int = 150,
    within: str | os.PathLike[str] | None = None,
) -> Path:
    """All pages in one PDF, each page sized by `dpi` (a W x H pixel page is W*72/dpi x
    H*72/dpi points). Pages are embedded without loss: each page's PNG data goes into the PDF
    as it is (img2pdf; Flate, no JPEG), so decoding a page gives back its exact pixels. No
    creation date and no random file id: the same pages give the same bytes (a resumed render
    matches an uninterrupted one).

    Written as a stream, one page at a time: img2pdf makes each page a one-page PDF in a
    temporary folder beside `path`, and pikepdf (qpdf) joins them, reading each page's image data
    from its file only as it writes the result. Memory does not grow with the number of pages."""
    import img2pdf  # imports pikepdf; only a PDF write needs it
    import pikepdf

    layout = img2pdf.get_fixed_dpi_layout_fun((dpi, dpi))
    target = Path(path)

    def write(handle: BinaryIO) -> None:
        # Encoding inside the write: its failures are reported like any other write failure.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=PDF_PARTS_PREFIX) as folder:
            parts = []
            for number, page in enumerate(pages):
                part = Path(folder) / f"page-{number:06d}.pdf"
                with open(part, "wb") as stream:
                    img2pdf.convert(_pdf_png(page), outputstream=stream, nodate=True, layout_fun=layout,
                                    engine=img2pdf.Engine.internal)
                parts.append(part)
            if not parts:
                raise ValueError("a PDF needs at least one page")
            while len(parts) > _PARTS_AT_ONCE:  # each join keeps its parts open: bound the open files
                groups = [parts[i:i + _PARTS_AT_ONCE] for i in range(0, len(parts), _PARTS_AT_ONCE)]
                parts = [_join_pdfs(group, group[0].with_suffix(".joined.pdf"), pikepdf) for group in groups]
            _join_pdfs(parts, handle, pikepdf, {"/Title": title or None, "/Creator": "anystory",
                                                 "/Producer": "anystory"})

    return atomic_write(target, write, within)


_PARTS_AT_ONCE = 256
PDF_PARTS_PREFIX = ".anystory-pdf-"  # the one-page PDFs' temporary folder, beside the PDF


def _join_pdfs(parts: Sequence[Path], into, pikepdf, info: dict[str, str | None] | None = None):
    """The pages of `parts`, in order, saved to `into` (a path or a binary file)."""
    with pikepdf.new() as pdf, contextlib.ExitStack() as opened:
        for part in parts:
            pdf.pages.extend(opened.enter_context(pikepdf.open(part)).pages)
        for name, value in (info or {}).items():
            if value is not None:
                pdf.docinfo[name] = pikepdf.String(value)
        # Image data copied as it is (no decoding, no recompression), a fixed file id.
        pdf.save(into, static_id=True, stream_decode_level=pikepdf.StreamDecodeLevel.none,
                 recompress_flate=False, object_stream_mode=pikepdf.ObjectStreamMode.disable)
    return into


def _pdf_png(page: PageSource) -> bytes:
    """A page's PNG as the PDF takes it: RGB."""
    if isinstance(page, Image.Image):
        return _png_bytes(page.convert("RGB"))
    data = Path(page).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.mode == "RGB":
            return data
        return _png_bytes(image.convert("RGB"))


def comic_info_xml(
    title: str,
    page_sizes: Sequence[tuple[int, int, int]],
    reading_order: str = "ltr",
    characters: Sequence[str] = (),
) -> bytes:
    """ComicInfo.xml (schema 2.0). `page_sizes` are (width, height, bytes) per page.

    Elements follow the schema's order (some readers validate it). ElementTree escapes markup;
    a character XML cannot hold at all (a NUL, most control characters, a lone surrogate,
    U+FFFE) is a ValueError rather than a file no reader opens. A story never holds one
    (`story.forbidden_kind`).
    """
    for what, text in (("title", title), *(("character name", name) for name in characters)):
        bad = _NOT_XML.search(text)
        if bad:
            raise ValueError(f"ComicInfo.xml cannot hold U+{ord(bad.group()):04X} (in the {what} {text!r})")
    root = ET.Element(
        "ComicInfo",
        {
            "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
            "xmlns:xsd": "http://www.w3.org/2001/XMLSchema",
        },
    )
    ET.SubElement(root, "Title").text = title
    ET.SubElement(root, "Notes").text = "Made with anystory (AnyStory, arXiv 2501.09503)"
    ET.SubElement(root, "PageCount").text = str(len(page_sizes))
    ET.SubElement(root, "Manga").text = "YesAndRightToLeft" if reading_order == "rtl" else "No"
    if characters:
        ET.SubElement(root, "Characters").text = ", ".join(characters)
    pages = ET.SubElement(root, "Pages")
    for number, (width, height, size) in enumerate(page_sizes):
        attributes = {
            "Image": str(number),
            "ImageSize": str(size),
            "ImageWidth": str(width),
            "ImageHeight": str(height),
        }
        if number == 0:
            attributes["Type"] = "FrontCover"
        ET.SubElement(pages, "Page", attributes)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# What XML 1.0 refuses anywhere in a document: not a `Char` of its grammar.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def write_cbz(
    pages: Iterable[PageSource],
    path: str | os.PathLike[str],
    title: str,
    reading_order: str = "ltr",
    characters: Sequence[str] = (),
    within: str | os.PathLike[str] | None = None,
) -> Path:
    """A comic book archive: 001.png, 002.png, ... and ComicInfo.xml, written one page at a time
    (a page file goes in as it is)."""

    def write(handle: BinaryIO) -> None:
        # Encoding inside the write: its failures are reported like any other write failure.
        sizes = []
        # PNGs are already compressed: store them; deflate only the XML. Entries get a fixed
        # date, so the same pages give the same archive bytes (a resumed render matches).
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for number, page in enumerate(pages, start=1):
                if isinstance(page, Image.Image):
                    data, size = _png_bytes(page), page.size
                else:
                    data = Path(page).read_bytes()
                    with Image.open(io.BytesIO(data)) as image:
                        size = image.size
                archive.writestr(_zip_entry(f"{number:03d}.png", zipfile.ZIP_STORED), data)
                sizes.append((*size, len(data)))
            info = comic_info_xml(title, sizes, reading_order, characters)
            archive.writestr(_zip_entry("ComicInfo.xml", zipfile.ZIP_DEFLATED), info)

    return atomic_write(path, write, within)


ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry


def _zip_entry(name: str, compression: int) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    entry.compress_type = compression
    entry.external_attr = 0o644 << 16  # rw-r--r-- when unpacked
    return entry


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
