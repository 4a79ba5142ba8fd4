"""The model fingerprint on a model folder on disk: every byte of every file counts, a large file
is hashed whole once and then recognised by its size, times and inode, and a render keyed by it
redraws exactly when the model's files change."""

from __future__ import annotations

import functools
import json
import os

import pytest

import storykit
from anystory_cli import model_loading
from anystory_cli.model_loading import model_fingerprint
from anystory_cli.render import render_story

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SIZE = 3 << 20  # larger than the size below which files are always hashed whole


def model_folder(root):
    """The documented layout with placeholder files (nothing here loads them)."""
    folder = root / "mine"
    (folder / "unet").mkdir(parents=True)
    (folder / "image_encoder").mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "image_encoder" / "config.json").write_text("{}")
    (folder / "anystory_adapter.safetensors").write_bytes(b"adapter" * 100)
    (folder / WEIGHTS).write_bytes(bytes(range(256)) * (SIZE // 256))
    return folder


def poke(path, offset):
    """Change one byte at `offset`, keeping the file's size and modification time."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def counted_hashing(monkeypatch):
    """Paths whose bytes were hashed whole, in order."""
    hashed = []
    real = model_loading._sha256_file

    def counting(path):
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(model_loading, "_sha256_file", counting)
    return hashed


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_change_anywhere_in_a_large_weight_file_changes_the_fingerprint(tmp_path, where):
    folder = model_folder(tmp_path)
    cache = tmp_path / "cache"
    before = model_fingerprint(str(folder), cache_dir=cache)
    assert model_fingerprint(str(folder), cache_dir=cache) == before
    offset = {"start": 10, "middle": SIZE // 2 + 12345, "end": SIZE - 3}[where]
    poke(folder / WEIGHTS, offset)
    after = model_fingerprint(str(folder), cache_dir=cache)
    assert after != before
    # The recorded hash followed the file: a fresh cache agrees.
    assert model_fingerprint(str(folder), cache_dir=tmp_path / "fresh") == after


def test_a_large_file_is_hashed_once_and_again_only_when_it_changes(tmp_path, counted_hashing):
    folder = model_folder(tmp_path)
    cache = tmp_path / "cache"
    first = model_fingerprint(str(folder), cache_dir=cache)
    assert counted_hashing.count("diffusion_pytorch_model.safetensors") == 1
    records = list((cache / "fingerprints").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["stamp"]["size"] == SIZE
    counted_hashing.clear()
    assert model_fingerprint(str(folder), cache_dir=cache) == first
    # Small files are read every time; the large one is not read at all.
    assert "diffusion_pytorch_model.safetensors" not in counted_hashing
    assert "model_index.json" in counted_hashing
    poke(folder / WEIGHTS, SIZE // 3)
    counted_hashing.clear()
    assert model_fingerprint(str(folder), cache_dir=cache) != first
    assert counted_hashing.count("diffusion_pytorch_model.safetensors") == 1


def test_a_corrupt_or_foreign_record_is_not_trusted(tmp_path):
    folder = model_folder(tmp_path)
    cache = tmp_path / "cache"
    right = model_fingerprint(str(folder), cache_dir=cache)
    (record,) = (cache / "fingerprints").glob("*.json")
    data = json.loads(record.read_text())
    data["sha256"] = "00" * 32
    data["stamp"]["size"] += 1  # recorded for another version of the file
    record.write_text(json.dumps(data))
    assert model_fingerprint(str(folder), cache_dir=cache) == right
    record.write_text("{not json")
    assert model_fingerprint(str(folder), cache_dir=cache) == right


def test_small_files_count_whole_and_hidden_files_and_model_cards_do_not(tmp_path):
    folder = model_folder(tmp_path)
    before = model_fingerprint(str(folder), cache_dir=tmp_path / "cache")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "README.md").write_text("# my model\n")
    (folder / "unet" / "notes.MD").write_text("trained longer\n")
    assert model_fingerprint(str(folder), cache_dir=tmp_path / "cache") == before
    config = folder / "image_encoder" / "config.json"
    config.write_text('{"hidden_size": 32}')
    assert model_fingerprint(str(folder), cache_dir=tmp_path / "cache") != before


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    yield from storykit.one_torch_thread()


def test_a_render_keyed_by_the_model_files_redraws_when_a_weight_file_changes(tmp_path, tiny_story_pipeline):
    """Through render_story with the real fingerprint of a folder on disk: an unchanged model
    loads nothing and draws nothing; a byte changed at the start, the middle or the end of a
    weight file redraws the panel."""
    root = tmp_path / "models"
    folder = model_folder(root)
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}],
                                 model=str(folder))
    factory = storykit.TinyFactory(tiny_story_pipeline)
    fingerprint = functools.partial(model_fingerprint, cache_dir=tmp_path / "cache")

    def render():
        return render_story(story, tmp_path / "out", pipeline_factory=factory, model_fingerprint=fingerprint,
                            cache_dir=tmp_path / "cache")

    assert render().panels_rendered == [1]
    for offset in (10, SIZE // 2, SIZE - 1):
        factory.calls = 0
        again = render()
        assert again.panels_rendered == [] and not again.model_loaded and factory.calls == 0
        poke(folder / WEIGHTS, offset)
        changed = render()
        assert changed.panels_rendered == [1] and factory.calls == 1, offset
