"""`anystory world ...`: the sprite world from the command line."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from anystory_cli.cli import app
from anystory_cli.lab.world import reference_image


def test_world_reference_writes_the_characters_rgba_front_view(tmp_path):
    out = tmp_path / "mira.png"
    result = CliRunner().invoke(app, ["world", "reference", "37", str(out)])
    assert result.exit_code == 0, result.output
    assert "heldout" in result.output
    image = Image.open(out)
    assert image.mode == "RGBA" and image.size == (64, 64)
    assert np.array_equal(np.asarray(image), reference_image(37, size=64))


def test_world_sample_writes_scenes_masks_and_captions(tmp_path):
    result = CliRunner().invoke(app, ["world", "sample", "--out", str(tmp_path / "s"), "--count", "2"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert {"captions.jsonl", "scene_000.png", "scene_000_masks.png", "scene_001.png"} <= names


def test_world_sample_into_an_unwritable_place_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["world", "sample", "--out", str(blocker / "s")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
