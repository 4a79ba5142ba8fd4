"""Where the FLUX pieces are, checked without loading anything (no torch: `validate` stays instant)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError


def resolve_folder(value: str | os.PathLike, what: str) -> Path:
    """A local folder, or a hub id already in the Hugging Face cache (never downloads here)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a {what} folder, found a file")
        return path
    text = str(value)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 (not in the cache: the hub raises many types)
            raise ModelError(f"{text}: {what} not found locally nor in the Hugging Face cache "
                             f"(download it once with `hf download {text}`)") from None
    raise ModelError(f"{path}: {what} not found")


def check_flux_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{folder}: not a diffusers pipeline folder (no model_index.json; expected FLUX.1-dev)")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index}: unreadable ({exc})") from None
    if "Flux" not in name or not (folder / "transformer").is_dir():
        kind = f"a {name} folder" if name else "not a FLUX pipeline"
        raise ModelError(f"{folder}: {kind}, not FLUX.1 (expected model_index.json naming FluxPipeline and a "
                         f"transformer/ folder)")


def check_redux_folder(folder: Path) -> None:
    for part in ("image_encoder", "image_embedder"):
        if not (folder / part / "config.json").is_file():
            raise ModelError(f"{folder}: missing {part}/ (expected the FLUX.1-Redux-dev folder with "
                             f"image_encoder/ and image_embedder/)")


def check_flux_model(base, redux, adapter) -> tuple[Path, Path, Path]:
    """(base folder, Redux folder, adapter file), each checked; ModelError naming the first problem."""
    base_dir = resolve_folder(base, "FLUX.1 base model")
    check_flux_folder(base_dir)
    redux_dir = resolve_folder(redux, "FLUX.1-Redux folder")
    check_redux_folder(redux_dir)
    adapter_file = Path(adapter).expanduser()
    if not adapter_file.is_file():
        raise ModelError(f"{adapter_file}: AnyStory adapter not found (expected anystory_flux.bin from the "
                         f"hub repository Junjie96/AnyStory)")
    return base_dir, redux_dir, adapter_file
