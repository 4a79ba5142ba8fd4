"""Character encodings on disk, so that a character is encoded once per model.

An entry is one safetensors file written by `CharacterEncoding.save`, named by its key:

    <cache>/encodings/<sha256 of (kind, image bytes, mask bytes, model id)>.safetensors

The cache adds a `checksum` (sha256 of every tensor's name, dtype, shape and bytes) and the
entry's own key (`cache_key`) to the file's metadata. Reading an entry reads the file once and
checks its format, model id, key and checksum: a truncated, corrupt, foreign or misnamed entry is
reported through `on_warning`, counted as rebuilt, and encoded again; it is never returned.
Writes are atomic (temp file + rename), so two processes filling the same cache at once only
race to write the same bytes, and a reader sees a whole old file or a whole new one.

The default folder is `$ANYSTORY_CACHE`, else the user cache folder that platformdirs gives
(`$XDG_CACHE_HOME/anystory`, else `~/.cache/anystory` on Linux). torch and safetensors are
imported inside functions: the CLI imports this module before it knows whether it will encode.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .errors import InputError, OutputError

CACHE_ENV = "ANYSTORY_CACHE"
APP_NAME = "anystory"  # the folder's name in the user cache folder
KEY_VERSION = 1  # bump when what goes into a key changes


def default_cache_dir() -> Path:
    """`$ANYSTORY_CACHE`, else platformdirs' user cache folder: `$XDG_CACHE_HOME/anystory` when that
    is set (Linux, macOS), else `~/.cache/anystory` on Linux, `~/Library/Caches/anystory` on macOS,
    `%LOCALAPPDATA%/anystory/Cache` on Windows."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return platformdirs.user_cache_path(APP_NAME, appauthor=False)


def _update(digest, label: str, payload: bytes) -> None:
    # Length-prefixed fields: ("ab", "c") and ("a", "bc") must not hash alike.
    for part in (label.encode(), payload):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)


def encoder_id(pipeline) -> str:
    """What keys an encoding besides its inputs: the model's id, and the kind of device and the
    precision it encodes in unless a CPU in float32 (a GPU or half precision gives other numbers;
    a panel's key says the same, plan.py)."""
    device, dtype = getattr(pipeline, "device", None), getattr(pipeline, "dtype", None)
    kind = getattr(device, "type", str(device).split(":")[0])
    precision = str(dtype).removeprefix("torch.")
    if device is None or dtype is None or (kind, precision) == ("cpu", "float32"):
        return pipeline.model_id
    return f"{pipeline.model_id}@{kind}/{precision}"


def reference_key(image_bytes: bytes, mask_bytes: bytes | None, model_id: str, mirrored: bool = False) -> str:
    """Key of a character encoded from a reference image (and optional mask) by one model,
    flipped left to right when `mirrored`."""
    digest = hashlib.sha256()
    _update(digest, "kind", f"reference/{KEY_VERSION}".encode())
    _update(digest, "image", image_bytes)
    _update(digest, "mask", mask_bytes if mask_bytes is not None else b"")
    _update(digest, "has_mask", b"1" if mask_bytes is not None else b"0")
    _update(digest, "model", model_id.encode())
    _mark_mirrored(digest, mirrored)
    return digest.hexdigest()


def description_key(description: str, settings: dict[str, Any], model_id: str, mirrored: bool = False) -> str:
    """Key of a character whose sheet is generated from a description with `settings`
    (prompt, seed, steps, ...), flipped left to right when `mirrored`."""
    import json

    digest = hashlib.sha256()
    _update(digest, "kind", f"description/{KEY_VERSION}".encode())
    _update(digest, "description", description.encode())
    _update(digest, "settings", json.dumps(settings, sort_keys=True).encode())
    _update(digest, "model", model_id.encode())
    _mark_mirrored(digest, mirrored)
    return digest.hexdigest()


def _mark_mirrored(digest, mirrored: bool) -> None:
    # Only when mirrored: the keys of entries cached before the option existed stay valid.
    if mirrored:
        _update(digest, "mirrored", b"1")


def tensor_checksum(tensors: dict) -> str:
    """sha256 over tensors by name: name, dtype, shape and raw bytes."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        _update(digest, "name", name.encode())
        _update(digest, "meta", f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        _update(digest, "data", tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CacheResult:
    encoding: Any  # CharacterEncoding
    path: Path
    hit: bool  # read from the cache
    rebuilt: bool = False  # an unusable entry was found and replaced


class EncodingCache:
    """Character encodings by key. `on_warning(message)` hears about unusable entries."""

    def __init__(self, folder: str | os.PathLike[str] | None = None,
                 on_warning: Callable[[str], None] | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.on_warning = on_warning or (lambda message: None)

    def path_for(self, key: str) -> Path:
        return self.folder / "encodings" / f"{key}.safetensors"

    def sidecar_path(self, key: str, suffix: str) -> Path:
        """A file that belongs with an entry, e.g. the generated sheet (`.sheet.png`)."""
        return self.folder / "encodings" / f"{key}{suffix}"

    def get(self, key: str, model_id: str):
        """The stored encoding, or None when there is none or it is unusable (reported)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()  # one read: what is checked is what is returned
        except FileNotFoundError:
            return None
        except OSError as exc:
            data, problem = None, f"unreadable ({exc.strerror or exc})"
        if data is not None:
            entry, problem = _parse(data, key, model_id)
            if problem is None:
                return entry
        self.on_warning(f"cache entry {path} is {problem}; encoding the character again")
        return None

    def put(self, key: str, encoding) -> Path:
        """Store `encoding` atomically under `key`; OutputError if the cache is not writable."""
        target = self.path_for(key)
        try:
            with atomic_path(target) as temp:
                encoding.save(temp)  # the project's format (weights.py) ...
                _stamp_checksum(temp, key)  # ... plus a checksum and the key in its metadata
        except (OSError, OutputError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OutputError(f"{target}: cannot write the character cache ({reason}); "
                              f"set {CACHE_ENV} or --cache to a writable folder") from None
        return target

    def get_or_encode(self, key: str, model_id: str, encode: Callable[[], Any]) -> CacheResult:
        """The cached encoding for `key`, else `encode()` stored under `key`."""
        path = self.path_for(key)
        existed = path.exists()
        encoding = self.get(key, model_id)
        if encoding is not None:
            return CacheResult(encoding, path, hit=True)
        encoding = encode()
        self.put(key, encoding)
        return CacheResult(encoding, path, hit=False, rebuilt=existed)


def _parse(data: bytes, key: str, model_id: str):
    """(CharacterEncoding, None) from an entry's bytes, or (None, why it must not be used)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    from .sd.weights import ENCODING_FORMAT, CharacterEncoding

    try:
        # safetensors: 8-byte little-endian header length, a JSON header, then the tensor bytes.
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or size > len(data) - 8:
            raise ValueError(f"{len(data)} bytes, shorter than its header says")
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        return None, f"corrupt or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    from .flux.weights import CHARACTER_FORMAT as FLUX_FORMAT

    if metadata.get("format") not in (ENCODING_FORMAT, FLUX_FORMAT) or "subject_tokens" not in tensors:
        return None, f"not a character encoding of this version (format {metadata.get('format')!r})"
    if metadata.get("model_id") != model_id:
        return None, f"from another model ({metadata.get('model_id')!r}, expected {model_id!r})"
    if metadata.get("checksum") != tensor_checksum(tensors):
        return None, "corrupt (checksum mismatch)"
    if "cache_key" not in metadata:
        return None, "from an older version of the cache (no key in its metadata)"
    if metadata["cache_key"] != key:
        return None, f"stored under the wrong name (it holds key {metadata['cache_key']!r})"
    if metadata["format"] == FLUX_FORMAT:
        from .flux.character import FluxCharacter
        try:
            return FluxCharacter.from_tensors(tensors, metadata), None
        except InputError as exc:
            return None, str(exc)
    return CharacterEncoding.from_tensors(tensors, metadata), None


def _stamp_checksum(path: Path, key: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    metadata["checksum"] = tensor_checksum(tensors)
    metadata["cache_key"] = key
    save_file(tensors, str(path), metadata=metadata)
