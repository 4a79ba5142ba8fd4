"""Where the FLUX pieces are, checked without loading anything (no torch: `validate` stays instant)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError


def resolve_part(value: str | os.PathLike, what: str, download: bool = True, folder: bool = True) -> Path | None:
    """A local folder (or file: folder=False), or a hub id ("org/name", "org/name/file"): from the
    Hugging Face cache, downloaded once when online (model_loading.model_part_dir). download=False
    (`validate`, which stays instant): None for a hub part not cached yet that the hub may provide."""
    from ..hub import model_part_dir, names_hub_part

    path = Path(value).expanduser()
    if not path.exists() and names_hub_part(os.fspath(value)):
        path = model_part_dir(os.fspath(value), download=download, pipeline=folder)
        if path is None:
            return None
    if not path.exists():
        raise ModelError(f"{path}: {what} not found")
    if folder and not path.is_dir():
        raise ModelError(f"{path}: expected a {what} folder, found a file")
    if not folder and not path.is_file():
        raise ModelError(f"{path}: expected the {what} file, found a folder")
    return path


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


def check_flux_model(base, redux, adapter, download: bool = True,
                     where: str | None = None) -> tuple[Path | None, Path | None, Path | None]:
    """(base folder, Redux folder, adapter file), each checked; ModelError naming the first problem
    ("<where>: <field>: ..." when `where`, e.g. a model file, named the parts). Hub ids are fetched
    (download=False: a part not cached yet is None, unchecked); base None: the Redux folder and the
    adapter only."""
    def checked(field: str, check):
        try:
            return check()
        except ModelError as exc:
            raise ModelError(f"{where}: {field}: {exc}" if where else str(exc)) from None

    def base_folder():
        folder = None if base is None else resolve_part(base, "FLUX.1 base model", download)
        if folder is not None:
            check_flux_folder(folder)
        return folder

    def redux_folder():
        folder = resolve_part(redux, "FLUX.1-Redux folder", download)
        if folder is not None:
            check_redux_folder(folder)
        return folder

    def adapter_file():
        try:
            return resolve_part(adapter, "AnyStory adapter", download, folder=False)
        except ModelError as exc:
            raise ModelError(f"{exc} (expected anystory_flux.bin, e.g. the hub file "
                             "Junjie96/AnyStory/anystory_flux.bin)") from None

    return checked("base", base_folder), checked("redux", redux_folder), checked("adapter", adapter_file)
