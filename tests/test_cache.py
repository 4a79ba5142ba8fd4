"""The character cache: keys, round trips, and entries that must never be returned."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from anystory_cli.cache import (
    CACHE_ENV,
    EncodingCache,
    default_cache_dir,
    description_key,
    reference_key,
)
from anystory_cli.errors import OutputError
from anystory_cli.sd.weights import CharacterEncoding

MODEL = "model-a"


def encoding(seed=0, model_id=MODEL) -> CharacterEncoding:
    generator = torch.Generator().manual_seed(seed)
    return CharacterEncoding(
        subject_tokens=torch.randn(4, 8, generator=generator),
        routing_feature=torch.randn(8, generator=generator),
        reference_features={"down.attn1": torch.randn(16, 8, generator=generator),
                            "up.attn1": torch.randn(4, 8, generator=generator)},
        model_id=model_id,
        name="mira",
    )


def same(a: CharacterEncoding, b: CharacterEncoding) -> bool:
    return (torch.equal(a.subject_tokens, b.subject_tokens)
            and torch.equal(a.routing_feature, b.routing_feature)
            and a.reference_features.keys() == b.reference_features.keys()
            and all(torch.equal(a.reference_features[k], b.reference_features[k]) for k in a.reference_features)
            and a.model_id == b.model_id and a.name == b.name)


class Encoder:
    """encode() for get_or_encode, counting calls."""

    def __init__(self, seed=0, model_id=MODEL):
        self.seed, self.model_id, self.calls = seed, model_id, 0

    def __call__(self):
        self.calls += 1
        return encoding(self.seed, self.model_id)


def test_default_folder_is_env_else_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV, " ")  # blank: not set
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / ".cache" / "anystory"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "anystory"
    else:
        import platformdirs

        assert default_cache_dir() == platformdirs.user_cache_path("anystory", appauthor=False)
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "xdg").exists()  # made on first write
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "d"))
    assert EncodingCache().folder == tmp_path / "d"


def test_keys_change_with_image_mask_and_model():
    base = reference_key(b"image", None, MODEL)
    assert base == reference_key(b"image", None, MODEL)
    others = [reference_key(b"image2", None, MODEL), reference_key(b"image", b"", MODEL),
              reference_key(b"image", b"mask", MODEL), reference_key(b"image", None, "model-b"),
              # field boundaries are part of the key
              reference_key(b"imag", b"e", MODEL)]
    assert len({base, *others}) == len(others) + 1
    assert description_key("a robot", {"seed": 1}, MODEL) != description_key("a robot", {"seed": 2}, MODEL)
    assert description_key("a robot", {"seed": 1}, MODEL) != description_key("a robot", {"seed": 1}, "m2")


def test_round_trip_then_hit(tmp_path):
    cache = EncodingCache(tmp_path)
    encode = Encoder()
    first = cache.get_or_encode("k" * 64, MODEL, encode)
    second = cache.get_or_encode("k" * 64, MODEL, encode)
    assert (first.hit, second.hit, encode.calls) == (False, True, 1)
    assert same(first.encoding, second.encoding)
    assert second.path == tmp_path / "encodings" / f"{'k' * 64}.safetensors"
    # Atomic writes leave no temporary files behind.
    assert [p.name for p in (tmp_path / "encodings").iterdir()] == [second.path.name]


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip_a_tensor_byte(path: Path) -> None:
    # The tensor data is at the end of a safetensors file; its header still parses after this.
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_garbage(path: Path) -> None:
    path.write_bytes(b"not a safetensors file at all")


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_tensor_byte, damage_garbage, damage_empty])
def test_damaged_entries_are_reported_and_rebuilt_never_returned(tmp_path, damage):
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    key = "d" * 64
    cache.get_or_encode(key, MODEL, Encoder(seed=1))
    damage(cache.path_for(key))
    assert cache.get(key, MODEL) is None
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(cache.path_for(key)) in warnings[0]
    encode = Encoder(seed=1)
    result = cache.get_or_encode(key, MODEL, encode)
    assert (result.hit, result.rebuilt, encode.calls) == (False, True, 1)
    # The rebuilt entry is whole again.
    assert same(cache.get(key, MODEL), encoding(1))


def test_an_entry_from_another_model_is_not_returned(tmp_path):
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    key = "m" * 64
    cache.put(key, encoding(model_id="old-model"))
    assert cache.get(key, MODEL) is None
    assert "another model" in warnings[0] and "old-model" in warnings[0]
    result = cache.get_or_encode(key, MODEL, Encoder())
    assert result.rebuilt and result.encoding.model_id == MODEL
    assert cache.get(key, MODEL).model_id == MODEL


def test_an_entry_without_checksum_is_not_trusted(tmp_path):
    """A file written by CharacterEncoding.save alone (no cache checksum) is re-encoded."""
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    key = "c" * 64
    cache.path_for(key).parent.mkdir(parents=True)
    encoding().save(cache.path_for(key))
    assert cache.get(key, MODEL) is None and "checksum" in warnings[0]


def test_unwritable_cache_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = EncodingCache(blocker / "cache")
    with pytest.raises(OutputError, match="cache"):
        cache.put("k" * 64, encoding())


def _rewrite_metadata(path: Path, **changes) -> None:
    """Rewrite an entry's metadata (None removes a field), its tensors unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    for name, value in changes.items():
        if value is None:
            metadata.pop(name, None)
        else:
            metadata[name] = value
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize("changes, said", [
    ({"format": "anystory-character/0"}, "not a character encoding of this version (format 'anystory-character/0')"),
    ({"format": None}, "not a character encoding of this version (format None)"),
    ({"cache_key": None}, "from an older version of the cache (no key in its metadata)"),
    ({"cache_key": "e" * 64}, "stored under the wrong name"),
])
def test_entries_of_an_older_format_or_another_key_are_encoded_again(tmp_path, changes, said):
    warnings: list[str] = []
    cache = EncodingCache(tmp_path, on_warning=warnings.append)
    key = "f" * 64
    cache.put(key, encoding())
    assert same(cache.get(key, MODEL), encoding())  # whole, before the change
    _rewrite_metadata(cache.path_for(key), **changes)
    assert cache.get(key, MODEL) is None
    assert len(warnings) == 1 and said in warnings[0] and str(cache.path_for(key)) in warnings[0]
    encode = Encoder(seed=2)
    result = cache.get_or_encode(key, MODEL, encode)
    assert (result.hit, result.rebuilt, encode.calls) == (False, True, 1)
    assert same(cache.get(key, MODEL), encoding(2))


class _Placed:
    """A pipeline's identity and where it encodes: all `encoder_id` reads."""

    def __init__(self, device, dtype, model_id=MODEL):
        self.device, self.dtype, self.model_id = torch.device(device), dtype, model_id


def test_an_encoding_is_keyed_by_where_and_at_what_precision_it_was_made():
    from anystory_cli.cache import encoder_id

    cpu = encoder_id(_Placed("cpu", torch.float32))
    assert cpu == MODEL  # the default keeps the keys entries were cached under
    ids = {cpu, encoder_id(_Placed("cpu", torch.bfloat16)), encoder_id(_Placed("cuda:0", torch.bfloat16)),
           encoder_id(_Placed("cuda:1", torch.bfloat16)), encoder_id(_Placed("cuda", torch.float32))}
    assert len(ids) == 4  # the GPU's number does not change the numbers, the kind and precision do
    keys = {reference_key(b"img", None, model_id) for model_id in ids}
    assert len(keys) == 4


def test_a_render_in_another_precision_encodes_its_characters_again(tmp_path):
    import copy
    from contextlib import contextmanager

    import storykit
    import tiny

    with contextmanager(storykit.one_torch_thread)():
        pipe = tiny.tiny_story_pipeline()
    half = copy.deepcopy(pipe)
    half.base.to(dtype=torch.bfloat16)
    half.image_encoder.to(dtype=torch.bfloat16)
    half.adapter.to(dtype=torch.bfloat16)
    story = storykit.write_story(tmp_path / "s", [{"prompt": "mira", "characters": ["mira"]}])
    cache = tmp_path / "cache"
    first = storykit.render(story, tmp_path / "a", lambda *a: pipe, cache)
    again = storykit.render(story, tmp_path / "b", lambda *a: pipe, cache)
    other = storykit.render(story, tmp_path / "c", lambda *a: half, cache)
    assert first.characters_encoded == ["mira"] and again.characters_encoded == []
    assert other.characters_encoded == ["mira"]
