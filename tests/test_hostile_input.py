"""Hostile and unusual input: YAML bombs, image bombs and odd images, path escapes.

Each case is refused with one clear line that says what and where (or, for unusual but valid
images, handled), quickly, through the same functions the CLI uses: `load_story`,
`load_image`, and for a few cases the CLI itself. No model, no torch: every test is instant.
docs/troubleshooting.md lists these messages.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from anystory_cli import cli, story as story_module
from anystory_cli.errors import AnyStoryError, InputError, StoryError
from anystory_cli.masks import ImageFileError, load_image, prepare_reference
from anystory_cli.story import MAX_STORY_BYTES, Story, format_loc, load_story, validate_story

PANEL = "panels:\n  - prompt: sky\n"
runner = CliRunner()


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh folder, the test's cwd, so messages start with 'story.yaml: '."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(text: str, name: str = "story.yaml", seconds: float = 5.0) -> list[str]:
    """load_story's problems for `text`; the refusal must also be quick (in this process's CPU
    time, which other work on a busy machine does not stretch)."""
    Path(name).write_text(text, encoding="utf-8")
    start = time.process_time()
    with pytest.raises(StoryError) as caught:
        load_story(name)
    assert time.process_time() - start < seconds, "refused, but too slowly"
    problems = caught.value.problems
    assert all("\n" not in p for p in problems), problems
    return problems


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


def test_only_safe_loading_no_python_objects(here):
    problems = problems_of("title: !!python/object/apply:os.mkdir [pwned]\n" + PANEL)
    assert problems[0].startswith("story.yaml: not valid YAML: line 1, column 8: could not "
                                  "determine a constructor for the tag"), problems
    assert not (here / "pwned").exists()


def test_alias_bomb_is_refused_quickly(here):
    # "Billion laughs": 9 levels of 10 aliases each expand 533 bytes to 10**9 strings.
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    problems = problems_of("\n".join(lines) + "\n" + PANEL, seconds=1.0)
    assert problems == ["story.yaml: the document expands to over 200000 nodes through aliases "
                        "(*name)"]


def test_merge_key_bomb_is_refused_quickly(here):
    text = "m0: &m0 {k0: 1}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join(f'*m{j}' for j in range(i))}], k{i}: 1}}\n"
        for i in range(1, 40)
    )
    assert "expands to over 200000 nodes" in problems_of(text + PANEL, seconds=1.0)[0]


def test_recursive_alias_is_refused(here):
    problems = problems_of("title: &t [*t]\n" + PANEL)
    assert problems == ["story.yaml: an alias refers to a node that contains it (recursive "
                        "document)"]


@pytest.mark.parametrize(
    "text, line",
    [
        ("title: " + "[" * 100_000 + "]" * 100_000 + "\n", 1),
        ("title: " + "{a: " * 100_000 + "}" * 100_000 + "\n", 1),
        ("".join(" " * i + "-\n" for i in range(1000)), 51),
    ],
    ids=["flow lists", "flow mappings", "block lists"],
)
def test_deep_nesting_is_refused_quickly(here, text, line):
    problems = problems_of(text, seconds=2.0)
    assert problems == [
        f"story.yaml: the document is nested more than 50 levels deep (line {line})"]


def test_a_story_within_the_depth_limit_still_loads(here):
    Path("story.yaml").write_text(
        "panels:\n  - prompt: sky\n    characters: [{name: mira, at: {box: [0, 0, 1, 1]}}]\n"
        "characters: {mira: {description: a cat}}\n"
    )
    assert load_story("story.yaml").panels[0].characters[0].name == "mira"


def test_too_many_nodes_stop_the_parser_early(here, monkeypatch):
    # The real limit (200 000) takes seconds of pure-Python parsing to reach; same code path.
    monkeypatch.setattr(story_module, "MAX_EXPANDED_NODES", 1000)
    problems = problems_of("title: x\nseed: 1\n" + PANEL + "  - prompt: [" + "a, " * 2000 + "]\n")
    assert problems == ["story.yaml: the document has over 1000 nodes (line 5)"]


@pytest.mark.parametrize(
    "number", ["1" * 5000, "1" + ":0" * 200_000, "0." + "5" * 1000],
    ids=["5000 digits", "base 60", "long float"],
)
def test_absurd_numbers_are_refused_quickly(here, number):
    problems = problems_of(f"seed: {number}\n" + PANEL, seconds=2.0)
    assert problems == [f"story.yaml: seed: a number of {len(number)} characters; at most 100 "
                        "(quote it if it is meant as text) (line 1)"]


@pytest.mark.parametrize(
    "value, expected",
    [("!!timestamp soon", "line 1, column 8: cannot read 'soon' as timestamp"),
     ("!!bool maybe", "line 1, column 8: cannot read 'maybe' as bool"),
     ("2024-13-45", "line 1, column 8: cannot read '2024-13-45' as timestamp (month must be in "
                    "1..12)")],
)
def test_values_yaml_itself_cannot_read_name_their_place(here, value, expected):
    # PyYAML fails on these with bare AttributeError / KeyError / ValueError.
    problems = problems_of(f"title: {value}\n" + PANEL)
    assert problems == [f"story.yaml: not valid YAML: {expected}; quote it if it is meant as text"]


def test_gigantic_story_file_is_refused_by_size_without_reading_it(here):
    with open("story.yaml", "wb") as handle:
        handle.truncate(2 * 1024**3)  # a sparse 2 GiB file: instant to make, never read
    start = time.process_time()
    with pytest.raises(StoryError) as caught:
        load_story("story.yaml")
    assert time.process_time() - start < 1.0
    assert str(caught.value) == ("story.yaml: the file is 2048.0 MiB; a story must be at most "
                                 "1 MiB")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_story_stream_is_cut_at_the_size_limit():
    # A device reports size 0 and never ends: reading stops one byte past the limit.
    with pytest.raises(StoryError, match=r"^/dev/zero: a story must be at most 1 MiB$"):
        load_story("/dev/zero")


def test_control_characters_name_line_and_column(here):
    problems = problems_of("title: ok\nseed: 1\x00\n" + PANEL)
    assert problems == ["story.yaml: not valid YAML: line 2, column 8: unacceptable character "
                        "#x0000 (special characters are not allowed; remove it or write it as "
                        "an escape in a quoted string)"]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, depth: int = 8, colour_type: int = 2,
              rows: bytes | None = None) -> bytes:
    """A PNG from raw rows; without rows, a few KB of zeros whose header claims width x height."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def png_16bit(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of `values` (H, W, channels) as big-endian uint16."""
    height, width = values.shape[:2]
    flat = values.astype(">u2").reshape(height, -1)
    rows = b"".join(b"\0" + flat[y].tobytes() for y in range(height))
    return png_bytes(width, height, 16, colour_type, rows)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def reason_of(path: Path, **kwargs) -> str:
    with pytest.raises(ImageFileError) as caught:
        load_image(path, **kwargs)
    assert isinstance(caught.value, InputError)
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    return caught.value.reason


def frames(*colours) -> list[Image.Image]:
    return [Image.new("RGBA", (16, 16), colour) for colour in colours]


RED, BLUE = (255, 0, 0, 255), (0, 0, 255, 255)


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (12_000, 12_000)],
                         ids=["over twice Pillow's limit", "over Pillow's warning limit"])
def test_decompression_bomb_is_refused_before_decoding_and_silently(tmp_path, width, height):
    bomb = write(tmp_path / "bomb.png", png_bytes(width, height))
    assert bomb.stat().st_size < 200
    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        reason = reason_of(bomb)
    assert time.process_time() - start < 1.0
    assert reason == ("image is too large (over 89 megapixels, a possible decompression bomb); "
                      "at most 64 megapixels")


def test_large_image_is_refused_from_its_header(tmp_path):
    big = write(tmp_path / "big.png", png_bytes(9000, 8000))
    assert reason_of(big) == "image is too large (9000x8000); at most 64 megapixels"
    assert reason_of(big, max_pixels=4096 * 4096) == (
        "image is too large (9000x8000); at most 16 megapixels")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image_is_refused_not_half_read(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = encoded(Image.fromarray(noise), fmt)
    cut = write(tmp_path / f"cut.{fmt.lower()}", whole[: len(whole) // 2])
    assert reason_of(cut).startswith("corrupt or truncated image (")


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_or_multipage_image_is_refused(tmp_path, fmt):
    first, *rest = frames(RED, BLUE, RED)
    path = write(tmp_path / f"anim.{fmt.lower()}",
                 encoded(first, fmt, save_all=True, append_images=rest))
    assert reason_of(path) == ("animated or multi-page image (3 frames); save the frame you "
                               "want as a still image (PNG)")


def test_camera_jpeg_with_a_preview_picture_is_not_animation(tmp_path):
    # MPO: how cameras store a photo plus previews. The first picture is the photo.
    photo, preview = (Image.new("RGB", (16, 16), c) for c in ((250, 10, 10), (10, 10, 250)))
    path = write(tmp_path / "camera.jpg", encoded(photo, "MPO", save_all=True,
                                                  append_images=[preview]))
    assert Image.open(path).format == "MPO"
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((8, 8))[0] > 200


def _left_red_right_blue(width=60, height=40) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE[:3])
    image.paste(RED[:3], (0, 0, width // 2, height))
    return image


def _jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(_left_red_right_blue(), "JPEG", quality=95, exif=exif.tobytes())


def _is(colour, pixel) -> bool:
    return all(abs(int(a) - int(b)) < 40 for a, b in zip(colour, pixel))


def test_exif_rotated_photo_comes_out_as_shown(tmp_path):
    # Orientation 6: the camera was turned; viewers rotate 90 degrees clockwise to show it.
    rotated = load_image(write(tmp_path / "phone.jpg", _jpeg_with_orientation(6)))
    assert rotated.size == (40, 60)
    assert _is(RED, rotated.getpixel((20, 10))) and _is(BLUE, rotated.getpixel((20, 50)))
    upside_down = load_image(write(tmp_path / "flipped.jpg", _jpeg_with_orientation(3)))
    assert upside_down.size == (60, 40)
    assert _is(BLUE, upside_down.getpixel((10, 20))) and _is(RED, upside_down.getpixel((50, 20)))


def test_exif_rotated_photo_fits_a_mask_drawn_on_what_is_shown(tmp_path, here):
    write(tmp_path / "phone.jpg", _jpeg_with_orientation(6))
    mask = np.zeros((60, 40), np.uint8)
    mask[5:25, 5:35] = 255  # the red top half, as a viewer shows the photo
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Path("story.yaml").write_text("characters: {mira: {image: phone.jpg, mask: mask.png}}\n"
                                  "panels: [{prompt: sky, characters: [mira]}]\n")
    character = load_story("story.yaml").characters["mira"]
    reference = prepare_reference(load_image(character.image), load_image(character.mask), 32)
    kept = reference.rgb[reference.mask > 0]
    assert len(kept) and (kept[:, 0] > 200).all() and (kept[:, 2] < 60).all()


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 16384, 40000, 65535]], np.uint16)
    path = write(tmp_path / "grey16.png", encoded(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert image.mode == "L"
    assert list(np.asarray(image)[0]) == [0, 64, 156, 255]
    assert image.convert("RGB").getpixel((2, 0)) == (156, 156, 156)  # not clipped to white


def test_16bit_colour_and_alpha_keep_their_transparency(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint16)
    rgba[..., 0] = 65535
    rgba[1:3, 1:3, 3] = 65535  # opaque 2x2 square, the rest transparent
    image = load_image(write(tmp_path / "rgba16.png", png_16bit(rgba, colour_type=6)))
    assert image.mode == "RGBA"
    grey_alpha = np.stack([np.full((4, 4), 30000), rgba[..., 3]], axis=-1)
    image_la = load_image(write(tmp_path / "la16.png", png_16bit(grey_alpha, colour_type=4)))
    for loaded in (image, image_la):
        reference = prepare_reference(loaded, size=8)
        assert 0 < reference.mask.mean() < 1  # the alpha channel became the mask


def test_16bit_mask_works(tmp_path):
    rgb = Image.new("RGB", (8, 8), (200, 20, 20))
    mask = np.zeros((8, 8), np.uint16)
    mask[2:6, 2:6] = 65535
    path = write(tmp_path / "mask16.png", encoded(Image.fromarray(mask), "PNG"))
    reference = prepare_reference(rgb, load_image(path, "mask"), size=8)
    assert reference.mask.sum() > 0 and reference.mask.mean() < 1


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb_with_its_colours(tmp_path, fmt):
    path = write(tmp_path / f"cmyk.{fmt.lower()}",
                 encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt))
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and _is((255, 0, 0), image.getpixel((4, 4)))


def test_transparent_colour_key_becomes_an_alpha_channel(tmp_path):
    picture = Image.new("RGB", (8, 8), (9, 9, 9))
    picture.paste((200, 0, 0), (2, 2, 6, 6))
    image = load_image(write(tmp_path / "key.png", encoded(picture, "PNG", transparency=(9, 9, 9))))
    assert image.mode == "RGBA"
    assert np.asarray(image)[..., 3].tolist()[0][0] == 0 and image.getpixel((3, 3))[3] == 255


def test_formats_outside_the_list_never_reach_their_readers(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("the EPS reader (Ghostscript) was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    eps = write(tmp_path / "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert reason_of(eps) == "not an image (PNG, JPEG, WebP, GIF, BMP or TIFF)"
    ico = write(tmp_path / "x.ico", encoded(Image.new("RGB", (16, 16)), "ICO"))
    assert reason_of(ico) == "not an image (PNG, JPEG, WebP, GIF, BMP or TIFF)"


def test_damaged_tiff_prints_nothing_but_the_error(tmp_path):
    # Pillow logs "More samples per pixel than can be decoded: 40000" at ERROR level; with
    # logging not set up, Python prints that on stderr next to the CLI's one line. (A real
    # process: under pytest, its logging plugin would catch the record.)
    data = bytearray(encoded(Image.new("RGB", (4, 4)), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 277:  # SamplesPerPixel
            struct.pack_into("<H", data, at + 8, 40_000)
    write(tmp_path / "bad.tif", bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "anystory_cli.cli", "encode-character", "bad.tif", "--name", "mira"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 1
    assert result.stderr == ("error: bad.tif: not an image (PNG, JPEG, WebP, GIF, BMP or TIFF)\n")


def test_story_validation_reports_each_image_case_at_its_field(here):
    first, *rest = frames(RED, BLUE)
    write(here / "anim.gif", encoded(first, "GIF", save_all=True, append_images=rest))
    write(here / "bomb.png", png_bytes(100_000, 100_000))
    write(here / "cut.png", encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60])
    Path("story.yaml").write_text(
        "characters:\n  mira: {image: anim.gif}\n  bolt: {image: bomb.png}\n"
        "  pip: {image: cut.png}\n" + PANEL
    )
    with pytest.raises(StoryError) as caught:
        load_story("story.yaml")
    here_ = here.resolve()
    assert caught.value.problems == [
        "story.yaml: characters.mira.image: animated or multi-page image (2 frames); save the "
        f"frame you want as a still image (PNG): {here_ / 'anim.gif'} (line 2)",
        "story.yaml: characters.bolt.image: image is too large (over 89 megapixels, a possible "
        f"decompression bomb); at most 16 megapixels: {here_ / 'bomb.png'} (line 3)",
        "story.yaml: characters.pip.image: corrupt or truncated image (image file is "
        f"truncated): {here_ / 'cut.png'} (line 4)",
    ]


# --------------------------------------------------------------------------------------------
# Paths: a name never writes outside the output folder
# --------------------------------------------------------------------------------------------

HOSTILE_NAMES = ["../evil", "../../etc/passwd", "/tmp/evil", "..\\evil", "C:evil", "mira/../x",
                 "mira\n", "mi\x00ra", ".hidden", "mïra", " mira", "a" * 41, "", "-x"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n) for n in HOSTILE_NAMES])
def test_hostile_character_names_are_refused_where_they_appear(here, name):
    data = {"characters": {name: {"description": "x"}},
            "panels": [{"prompt": "sky", "characters": [name],
                        "dialogue": [{"who": name, "text": "hi"}]}]}
    with pytest.raises(StoryError) as caught:
        validate_story(data, source="story.yaml")
    shown, where = repr(name), format_loc(("characters", name))  # characters['../evil']
    if "\x00" in name:  # no text may hold a NUL: that rule's one line, wherever the name is
        for where in (where, "panels[0].characters[0]", "panels[0].dialogue[0].who"):
            assert any(p.startswith(f"story.yaml: {where}: control character U+0000 at character 3 ")
                       for p in caught.value.problems), (where, caught.value.problems)
        return
    assert any(p.startswith(f"story.yaml: {where}: character name {shown} must start with a "
                            "letter") for p in caught.value.problems), caught.value.problems
    for where in ("panels[0].characters[0].name", "panels[0].dialogue[0].who"):
        assert any(p.startswith(f"story.yaml: {where}: character name {shown}")
                   for p in caught.value.problems), (where, caught.value.problems)


@pytest.mark.parametrize("name", ["CON", "nul", "Aux", "com1", "LPT9"])
def test_windows_device_names_are_refused(here, name):
    problems = problems_of(f"characters: {{{name}: {{description: x}}}}\n" + PANEL)
    assert problems == [f"story.yaml: characters.{name}: character name {name!r} is reserved "
                        "for a device on Windows (con, prn, aux, nul, com0-9, lpt0-9); choose "
                        "another (line 1)"]


def test_names_that_differ_only_in_case_are_refused(here):
    problems = problems_of("characters:\n  Mira: {description: x}\n  mira: {description: y}\n"
                           + PANEL)
    assert problems == ["story.yaml: characters.mira: character name 'mira' differs from 'Mira' "
                        "only in case; names must differ in more than case (they name files) "
                        "(line 3)"]


@settings(max_examples=150, deadline=None)
@given(name=st.one_of(st.text(max_size=45), st.sampled_from(HOSTILE_NAMES),
                      st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,39}", fullmatch=True)))
def test_every_accepted_name_is_a_plain_file_name_inside_the_folder(name):
    data = {"characters": {name: {"description": "x"}}, "panels": [{"prompt": "sky"}]}
    try:
        validate_story(data, check_images=False)
    except StoryError:
        return
    folder = Path("/out/characters")
    target = folder / f"{name}.png"
    assert target.parent == folder and target.name == f"{name}.png"
    assert name.isascii() and name.isprintable() and not set(name) & set("/\\:.\x00 ")


@pytest.mark.parametrize(
    "stories, expected",
    [(["...yaml"], ["out/story"]), (["..yaml"], ["out/story"]), (["a/b/tale.yaml"], ["out/tale"]),
     (["x/tale.yaml", "y/tale.yaml"], ["out/tale", "out/tale-2"])],
)
def test_default_output_folder_stays_inside_out(stories, expected):
    # Path('...yaml').stem is '..': out/.. would be the current folder.
    assert cli.rendering._out_dirs([Path(s) for s in stories], None) == [Path(e) for e in expected]


# --------------------------------------------------------------------------------------------
# Through the CLI: one line, exit 1 (2 for a bad option), nothing written or destroyed
# --------------------------------------------------------------------------------------------


def test_cli_validate_refuses_bombs_in_one_line(here):
    Path("bomb.yaml").write_text(
        "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                  + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)])
        + "\n" + PANEL)
    Path("deep.yaml").write_text("title: " + "[" * 50_000 + "]" * 50_000 + "\n")
    for name, expected in (("bomb.yaml", "expands to over 200000 nodes through aliases"),
                           ("deep.yaml", "nested more than 50 levels deep (line 1)")):
        result = runner.invoke(cli.app, ["validate", name])
        assert result.exit_code == 1
        line = one_error_line(result)
        assert line.startswith(f"error: {name}: ") and expected in line, line


def test_cli_render_refuses_an_escaping_name_and_keeps_earlier_output(here):
    out = here / "out"
    (out / "pages").mkdir(parents=True)
    (out / "pages" / "page-001.png").write_bytes(b"an earlier page")
    Path("story.yaml").write_text("characters: {'../../evil': {description: x}}\n"
                                  "panels: [{prompt: sky, characters: ['../../evil']}]\n")
    before = sorted(p for p in here.rglob("*"))
    result = runner.invoke(cli.app, ["render", "story.yaml", "--out", str(out)])
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith("error: story.yaml: characters['../../evil']: character name "
                           "'../../evil' must start with a letter"), line
    assert sorted(p for p in here.rglob("*")) == before
    assert (out / "pages" / "page-001.png").read_bytes() == b"an earlier page"
    assert not (here.parent / "evil.png").exists() and not (here / "evil.png").exists()


def test_cli_encode_character_refuses_an_animated_reference(here, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model must not load for a bad image")

    monkeypatch.setattr(cli.seams, "PIPELINE_FACTORY", no_model)
    first, *rest = frames(RED, BLUE)
    write(here / "mira.gif", encoded(first, "GIF", save_all=True, append_images=rest))
    result = runner.invoke(cli.app, ["encode-character", "mira.gif", "--name", "mira"])
    assert result.exit_code == 1
    assert one_error_line(result) == ("error: mira.gif: animated or multi-page image (2 frames); "
                                      "save the frame you want as a still image (PNG)")
    assert not (here / "mira-card.png").exists()


def test_cli_encode_character_refuses_a_name_with_a_newline(here):
    result = runner.invoke(cli.app, ["encode-character", "x.png", "--name", "mira\n"])
    assert result.exit_code == 2 and list(here.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Fuzzing: a story or the project's own error, nothing else
# --------------------------------------------------------------------------------------------

_HOSTILE = [
    "title: x\n", "panels:\n", "  - prompt: sky\n", "    characters: [mira]\n", "characters:\n",
    "  mira: {description: d}\n", "  '../x': {description: d}\n", "&a ", "*a", "<<: ", "!!binary ",
    "!!python/object/apply:os.system ", "!!set ", "!!timestamp ", "2024-13-45", "1:0:0:0",
    "9" * 120, "[" * 60, "]" * 60, "{", "}", ":", "-", " ", "\n", "\t", "'", '"', "#", "|", ">",
    "?", "%YAML 1.1\n", "---\n", "...\n", "\x00", "\x85", "\ufeff", "\ud7ff", "é", ".inf", "~",
]
_FIXTURE = HealthCheck.function_scoped_fixture  # tmp_path is reused; each example overwrites
_documents = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(_HOSTILE), max_size=50).map(
        lambda t: "".join(t).encode("utf-8", "surrogatepass")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[_FIXTURE])
@given(document=_documents)
def test_fuzzed_documents_give_a_story_or_the_projects_error(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(document)
    try:
        result = load_story(path, check_images=False)
    except AnyStoryError as error:
        assert str(error) and "\n" not in "".join(getattr(error, "problems", []))
    else:
        assert isinstance(result, Story)


_SEEDS = {
    "png": encoded(Image.new("RGBA", (8, 8), (200, 10, 10, 128)), "PNG"),
    "jpeg": encoded(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"),
    "gif": encoded(Image.new("P", (8, 8)), "GIF"),
    "tiff": encoded(Image.new("CMYK", (8, 8)), "TIFF"),
}


@st.composite
def _damaged_images(draw) -> bytes:
    data = bytearray(_SEEDS[draw(st.sampled_from(sorted(_SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@settings(max_examples=150, deadline=None, suppress_health_check=[_FIXTURE])
@given(data=_damaged_images())
def test_fuzzed_images_give_an_ordinary_image_or_input_error(tmp_path, capsys, data):
    path = write(tmp_path / "damaged", data)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path)
        except InputError as error:
            assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
            image = None
    assert not caught, "a warning would print a second line"
    assert capsys.readouterr().err == "", "a log record would print a second line"
    if image is None:
        return
    assert image.mode in ("L", "LA", "RGB", "RGBA")
    np.asarray(image)  # fully decoded


def test_the_story_loader_is_a_safe_loader():
    # No constructor for python/* tags is registered, and the depth limit leaves room under
    # Python's recursion limit (the composer takes about 3 frames a level).
    tags = story_module.UniqueKeyLoader.yaml_constructors
    assert not any(str(tag).startswith("tag:yaml.org,2002:python/") for tag in tags)
    assert issubclass(story_module.UniqueKeyLoader, yaml.SafeLoader)
    assert "tag:yaml.org,2002:python/object" not in yaml.SafeLoader.yaml_constructors
    assert sys.getrecursionlimit() > 4 * story_module.MAX_NESTING_DEPTH
    # The int/float constructors were swapped on this loader only, not on PyYAML's SafeLoader.
    assert yaml.safe_load("n: " + "1" * 200)["n"] == int("1" * 200)
    assert MAX_STORY_BYTES == 1024 * 1024
