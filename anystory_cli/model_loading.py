"""From a story's `model:` value to an AnyStoryPipeline, offline.

`model: default` is the embedded default model, shipped in `anystory_cli/assets/default/` (its
small base models in the project's own compact files, see `default_model.py`, plus the
adapter). Any other value is a local model folder with this layout::

    my-model/
      model_index.json              a diffusers pipeline folder (`pipe.save_pretrained(...)`):
      unet/ vae/ text_encoder/ tokenizer/ scheduler/ ...   SD 1.5, SDXL, ...
      image_encoder/                a transformers CLIPVisionModel folder (config.json + weights)
      anystory_adapter.safetensors  AnyStory adapter weights from `anystory train`

Nothing is downloaded: every piece is loaded with `local_files_only=True`, and a missing piece is
a `ModelError` that says what to put where. torch, diffusers and transformers are imported inside
the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import atomic_path
from .errors import ModelError, OutputError
from .library_logging import progress_bars_off

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"
ADAPTER_FILE = "anystory_adapter.safetensors"
IMAGE_ENCODER_DIR = "image_encoder"
PIPELINE_INDEX = "model_index.json"

LAYOUT_HELP = (f"a model folder holds {PIPELINE_INDEX} with the diffusers pipeline's subfolders, "
               f"{IMAGE_ENCODER_DIR}/ (a CLIPVisionModel) and {ADAPTER_FILE}")
# Every file is fingerprinted by the sha256 of all its bytes. A file larger than this is hashed
# once: its hash is kept in the cache folder (`fingerprints/`) with the file's path, size,
# modification and change times and inode, and read back while those are unchanged, so that a
# multi-GB model is not read whole on every render. Any write to a file changes its change time.
_HASH_ALWAYS_BYTES = 2 << 20
_FINGERPRINTS_DIR = "fingerprints"
_CHUNK_BYTES = 1 << 20


# The embedded default keeps its small models as <name>.safetensors + <name>.json (fp16, built
# by `default_model.py`, the same classes a diffusers folder would give) beside its adapter.
DEFAULT_PIECES = ("vae.safetensors", "text_encoder.safetensors", "image_encoder.safetensors",
                  "unet.safetensors", "tokenizer_words.json", ADAPTER_FILE)


def resolve_model_dir(model: str, base_dir: str | os.PathLike[str] | None = None, with_adapter: bool = True) -> Path:
    """The folder that `model` names: the embedded default, or a path (relative to `base_dir`).
    with_adapter=False: the caller brings its own adapter file, the folder need not hold one."""
    if model == DEFAULT_MODEL:
        pieces = DEFAULT_PIECES if with_adapter else tuple(p for p in DEFAULT_PIECES if p != ADAPTER_FILE)
        missing = [name for name in pieces if not (DEFAULT_MODEL_DIR / name).is_file()]
        if missing:
            raise ModelError(
                f"the embedded default model is not complete in this build (missing {', '.join(missing)}: "
                f"still being trained; see {DEFAULT_MODEL_DIR / 'README.md'}); set `model:` in the "
                f"story to a local model folder: {LAYOUT_HELP}"
            )
        return DEFAULT_MODEL_DIR
    folder = Path(model).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = Path(base_dir) / folder
    return folder


def check_model_dir(folder: Path, with_adapter: bool = True) -> None:
    """ModelError naming the first missing piece of a model folder."""
    if folder == DEFAULT_MODEL_DIR:
        return  # resolve_model_dir checked its pieces
    if not folder.exists():
        raise ModelError(f"model folder {folder} not found; {LAYOUT_HELP}")
    if not folder.is_dir():
        raise ModelError(f"model {folder} is not a folder; {LAYOUT_HELP}")
    if not (folder / PIPELINE_INDEX).is_file():
        raise ModelError(f"{folder / PIPELINE_INDEX} not found: put a diffusers pipeline there "
                         f"(pipe.save_pretrained('{folder}'))")
    encoder = folder / IMAGE_ENCODER_DIR
    if not (encoder / "config.json").is_file():
        raise ModelError(f"{encoder}/config.json not found: put a transformers CLIPVisionModel "
                         f"there (image_encoder.save_pretrained('{encoder}'))")
    if with_adapter and not (folder / ADAPTER_FILE).is_file():
        raise ModelError(f"{folder / ADAPTER_FILE} not found: put the AnyStory adapter weights "
                         "there (`anystory train` writes them)")


def model_fingerprint(model, base_dir: str | os.PathLike[str] | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A short id of a model folder's contents, without loading it: milliseconds while its large
    files keep their recorded hashes (kept in `cache_dir`, default: the encoding cache's folder)."""
    if not isinstance(model, str):  # {base, redux, adapter}: FLUX.1 with the released weights
        return _flux_fingerprint(model)
    folder = resolve_model_dir(model, base_dir)
    check_model_dir(folder)
    return _pieces_digest(_model_files(folder), cache_dir)


def _model_files(folder: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(name, path) of every file of a model folder, sorted; hidden files and `skip` left out."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or relative.as_posix() in skip:
            continue  # editor and OS droppings do not change the model
        files.append((relative.as_posix(), path))
    return files


def _pieces_digest(files: list[tuple[str, Path]], cache_dir: str | os.PathLike[str] | None = None) -> str:
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\x00")
        digest.update(_file_digest(path, cache_dir))
    return digest.hexdigest()[:16]


def _sha256_file(path: Path) -> bytes:
    """sha256 of every byte of the file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.digest()


def _file_digest(path: Path, cache_dir: str | os.PathLike[str] | None = None) -> bytes:
    """sha256 of the file's contents; for a large file, the recorded one while the file's size,
    times and inode are those it was recorded with (see `_HASH_ALWAYS_BYTES`)."""
    stat = path.stat()
    if stat.st_size <= _HASH_ALWAYS_BYTES:
        return _sha256_file(path)
    from .cache import default_cache_dir

    resolved = str(path.resolve())
    stamp = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    record = folder / _FINGERPRINTS_DIR / f"{hashlib.sha256(resolved.encode()).hexdigest()}.json"
    try:
        stored = json.loads(record.read_text())
        if isinstance(stored, dict) and stored.get("stamp") == stamp:
            return bytes.fromhex(stored["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, or an unreadable one: hash the file
    digest = _sha256_file(path)
    text = json.dumps({"stamp": stamp, "sha256": digest.hex()})
    try:
        with atomic_path(record) as temp:
            temp.write_text(text)
    except OutputError:
        pass  # a read-only cache: the next run hashes the file again
    return digest


def _runtime(runtime):
    """The runtime asked for (devices.Runtime), or the one the environment and the machine give."""
    from .devices import resolve_runtime

    return runtime if runtime is not None else resolve_runtime()


def _flux_fingerprint(model) -> str:
    from .flux.folders import check_flux_model

    base, redux, adapter = check_flux_model(model.base, model.redux, model.adapter)
    files = [(f"base/{n}", p) for n, p in _model_files(base)] + [(f"redux/{n}", p) for n, p in _model_files(redux)]
    return "flux-" + _pieces_digest(files + [("anystory_flux.bin", adapter)])


def _load_flux(model, runtime=None):
    """A story's FLUX mapping -> the FLUX pipeline behind the renderer's calls (flux/comic.py),
    on the runtime's device and precision (devices.py: bf16 on CUDA, fp32 on a CPU)."""
    from .flux import AnyStoryFluxPipeline
    from .flux.comic import FluxComicPipeline

    runtime = _runtime(runtime)
    model_id = _flux_fingerprint(model)
    pipe = AnyStoryFluxPipeline.from_pretrained(
        model.base, redux=model.redux, adapter=model.adapter, torch_dtype=runtime.torch_dtype,
        device="cpu" if runtime.offload else runtime.torch_device)
    if runtime.offload:
        pipe.enable_model_cpu_offload(device=runtime.device)
    return FluxComicPipeline(pipe, model_id)


def load_pipeline(model, base_dir: str | os.PathLike[str] | None = None,
                  adapter: str | os.PathLike[str] | None = None, runtime=None):
    """Load the AnyStoryPipeline that `model` names (see the module docstring). `adapter`: an
    adapter file used instead of the folder's own (e.g. a training checkpoint to evaluate). A FLUX
    mapping {base, redux, adapter} gives the FLUX pipeline (docs/flux.md). `runtime`
    (devices.Runtime): device, precision and offload; default: from the environment
    (ANYSTORY_DEVICE, ANYSTORY_DTYPE, ANYSTORY_OFFLOAD) and the machine."""
    if not isinstance(model, str):
        return _load_flux(model, runtime)
    folder = resolve_model_dir(model, base_dir, with_adapter=adapter is None)
    check_model_dir(folder, with_adapter=adapter is None)
    if adapter is None:
        adapter_file, model_id = folder / ADAPTER_FILE, model_fingerprint(model, base_dir)
    else:
        adapter_file = Path(adapter)
        if not adapter_file.is_file():
            raise ModelError(f"{adapter_file}: no adapter file here")
        model_id = _pieces_digest(_model_files(folder, skip=(ADAPTER_FILE,)) + [(ADAPTER_FILE, adapter_file)])
    runtime = _runtime(runtime)
    dtype = runtime.torch_dtype
    with progress_bars_off():
        if folder == DEFAULT_MODEL_DIR:
            from .default_model import load_default_base

            base, encoder = load_default_base(folder, dtype)
        else:
            base = _load_base(folder, dtype)
            encoder = _load_image_encoder(folder / IMAGE_ENCODER_DIR, dtype)
    from .sd.pipeline import AnyStoryPipeline

    try:
        if not runtime.offload:
            base.to(runtime.torch_device)
        pipeline = AnyStoryPipeline.from_pipe(base, encoder, adapter_file, model_id=model_id)
        if runtime.offload:
            pipeline.enable_model_cpu_offload(device=runtime.device)
    except ModelError as exc:
        raise ModelError(f"model {folder}: {exc}") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"model {folder}: the adapter {adapter_file} does not fit this pipeline "
                         f"({_first_line(exc)})") from None
    return pipeline


def _load_base(folder: Path, dtype):
    from diffusers import DiffusionPipeline

    try:
        base = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers pipeline ({_first_line(exc)})") from None
    if not hasattr(base, "unet"):
        raise ModelError(f"{folder}: {type(base).__name__} has no UNet; AnyStory needs a "
                         "UNet pipeline such as StableDiffusionPipeline or StableDiffusionXLPipeline")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(base, name, None)
        # transformers 5 returns a broken 2-token tokenizer for a missing vocabulary, silently.
        if tokenizer is not None and len(tokenizer) < 10:
            raise ModelError(f"{folder / name}: the tokenizer has only {len(tokenizer)} tokens; "
                             "its vocabulary files are missing")
    base.set_progress_bar_config(disable=True)
    return base


def _load_image_encoder(folder: Path, dtype):
    from transformers import CLIPVisionModel

    try:
        return CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype).eval()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load the image encoder ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
