"""Model parts named by Hugging Face hub ids, from the hub cache.

"org/name" names a repository, "org/name/sub/path" a folder or file inside it. A name a local
path also has means that path. The snapshot comes from the cache (`HF_HUB_CACHE`, else
`HF_HOME/hub`); a part the cache lacks is downloaded once when online, only that part when a
path inside is named, and never with HF_HUB_OFFLINE=1; neither cached nor reachable is one
`ModelError` line. huggingface_hub is imported inside the functions.

`PUBLISHED_MODELS` names the published models made of hub parts (`model: anystory-flux`), with
what they need in memory and on disk; `cached_part` says whether the cache holds a part, never
touching the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .library_logging import progress_bars_off


# A Hugging Face hub id: "org/name" (letters, digits, "-", "_", "."), no other slashes.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# Weights for other frameworks that a whole-repository download leaves behind (torch reads none).
_OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.mlmodel", "*.mlpackage/*"]


@dataclass(frozen=True)
class PublishedModel:
    """A model the authors published, by one name: its parts by hub id, and estimates of what it
    needs (bf16 weights, from the parameter counts; nothing is downloaded to say so)."""

    summary: str
    parts: dict[str, str]  # the keys of a story's FLUX mapping: base, redux, adapter
    memory_gib: float  # the weights in GPU memory at once, without offload
    memory_note: str
    disk_gb: float  # what the parts take in the Hugging Face cache


# In bf16, from the parameter counts (docs/flux.md, "Memory and time"): FLUX.1-dev's transformer
# 11.9 B parameters (22.2 GiB), T5-XXL 4.76 B (8.9 GiB), CLIP-L and the VAE 0.4 GiB (33.7 GB of
# files); FLUX.1-Redux-dev's SigLIP 0.43 B and embedder 0.06 B (0.9 GiB, 1.0 GB); the AnyStory
# adapter's embedders 0.3 GiB, routing adapters 0.2 GiB, reference and router LoRAs about
# 1.8 GiB (2.4 GB). Sums: 34.7 GiB in memory, 37.1 GB on disk.
PUBLISHED_MODELS = {
    "anystory-flux": PublishedModel(
        summary="the released AnyStory weights on FLUX.1-dev with FLUX.1-Redux-dev (docs/flux.md)",
        parts={"base": "black-forest-labs/FLUX.1-dev", "redux": "black-forest-labs/FLUX.1-Redux-dev",
               "adapter": "Junjie96/AnyStory/anystory_flux.bin"},
        memory_gib=34.7,
        memory_note="+0.7 GiB per character at 512 px; 8-24 GB cards with --memory auto (quantized and offloaded)",
        disk_gb=37.1,
    ),
}


def hub_shaped(repo_id: str) -> bool:
    """Whether `repo_id` is spelled as a hub repository id, "org/name" (at most 96 characters, the
    hub's limit), whether or not a local path has the same name."""
    return len(repo_id) <= 96 and ".." not in repo_id and bool(_HUB_ID.fullmatch(repo_id))


def is_hub_id(model: str, base_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether `model` names a model on the Hugging Face hub: shaped "org/name", with no local
    folder of that name (relative to `base_dir`) to mean instead."""
    if not hub_shaped(model):
        return False
    local = Path(model) if base_dir is None else Path(base_dir) / model
    try:
        return not local.exists()
    except (OSError, ValueError):  # a name the file system cannot hold
        return True


def names_hub_part(value: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether `value` is "org/name" or "org/name/sub/folder" on the hub rather than a local path:
    hub-shaped, and no local file or folder of that name (relative to `base_dir`)."""
    text = os.fspath(value)
    parts = text.split("/")
    local = Path(text).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = Path(base_dir) / local
    try:
        exists = local.exists()
    except (OSError, ValueError):  # a name the file system cannot hold
        exists = False
    return len(parts) >= 2 and not exists and is_hub_id("/".join(parts[:2]), base_dir)


def model_part_dir(value: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None,
                   download: bool = True, pipeline: bool = False) -> Path | None:
    """A model part named by a path or a hub id (an adapter, a training recipe's pipeline or image
    encoder, a FLUX part): "org/name" is that repository's snapshot (`hub_snapshot`),
    "org/name/sub/path" a folder or file inside it (e.g. an image encoder stored beside other
    weights, or one checkpoint file), of which only that part is downloaded; a local path of the
    same name wins. Else the path, relative to `base_dir`. download=False (checks that must stay
    instant): None for a hub part not cached yet that the hub may still provide."""
    if names_hub_part(value, base_dir):
        parts = os.fspath(value).split("/")
        repo_id, inside = "/".join(parts[:2]), "/".join(parts[2:])
        return hub_snapshot(repo_id, inside, pipeline, download)
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the Hugging Face cache (its `refs/main`); None when the
    cache does not hold it. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hub_cache_dir()), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def cached_part(value: str) -> Path | None:
    """The cached file or folder that hub part `value` ("org/name", "org/name/sub/path") names;
    None when the cache lacks it, or, for a diffusers pipeline folder, any part its
    model_index.json names. Never touches the network."""
    parts = value.split("/")
    snapshot = cached_hub_snapshot("/".join(parts[:2]))
    if snapshot is None or not (snapshot / "/".join(parts[2:])).exists():
        return None
    path = snapshot / "/".join(parts[2:])
    index = path / "model_index.json"
    if index.is_file():
        try:
            components = [k for k, v in json.loads(index.read_text()).items()
                          if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
        except (OSError, ValueError, AttributeError, IndexError):
            return None
        if not all((path / name).is_dir() for name in components):
            return None
    return path


def hub_snapshot(repo_id: str, inside: str = "", pipeline: bool = False, download: bool = True) -> Path | None:
    """The local snapshot folder of hub model `repo_id` (with `inside`: that file or folder of it):
    from the cache, else downloaded once, only `inside` when given (never when HF_HUB_OFFLINE=1);
    one ModelError line when it is neither cached nor reachable. `pipeline`: a diffusers pipeline
    repository, of which diffusers downloads only the parts its model_index.json names (FLUX.1-dev
    also holds single-file checkpoints of tens of GB that the pipeline does not read).
    download=False: None instead of downloading (the offline error stands)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    name = f"{repo_id}/{inside}" if inside else repo_id
    cached = cached_hub_snapshot(repo_id)
    if cached is not None and (cached / inside).exists():
        return cached / inside
    if hub_offline():
        raise ModelError(f"model {name!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 "
                         f"forbids downloading it; run once online, or `hf download {repo_id}`, or give a "
                         "local path instead") from None
    if not download:
        return None
    patterns = [inside, f"{inside}/*"] if inside else None
    try:
        with progress_bars_off():
            if pipeline and not inside:
                from diffusers import DiffusionPipeline

                snapshot = Path(DiffusionPipeline.download(repo_id, cache_dir=str(cache)))
            else:
                snapshot = Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=patterns,
                                                  ignore_patterns=None if inside else _OTHER_FRAMEWORKS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model {name!r} is not in the Hugging Face cache ({cache}) and cannot be "
                         f"downloaded ({_first_line(exc)}); check the id and the network, or give a local "
                         "path instead") from None
    if not (snapshot / inside).exists():
        raise ModelError(f"hub repository {repo_id!r} has no {inside!r}")
    return snapshot / inside


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
