"""From a `model:` value to a pipeline: `model_source` is the one dispatch, `load_pipeline`,
`model_fingerprint`, `model_defaults` and `check_model` its users.

A value (a story's `model:`, or `--model` after `story.model_value`) is one of:

    default                the embedded model, a UNet model folder in `anystory_cli/assets/default/`
    anystory-flux          a published model (`hub.PUBLISHED_MODELS`): FLUX parts by hub id
    {base, redux, adapter} FLUX.1 with the released AnyStory weights (story.FluxModel)
    flux.yaml / flux.json  a model file holding that mapping, its paths relative to the file
    org/name               a Hugging Face hub id, whose snapshot comes from the hub cache
    any other path         a local folder: a UNet model folder as below, or a saved
                           AnyStoryFluxPipeline (model_index.json naming AnyStoryFluxPipeline)

Every FLUX model samples with the released code's settings (`FLUX_DEFAULTS`) where the story's
style leaves them out. A UNet model folder has this layout::

    my-model/
      model_index.json              a diffusers pipeline folder (`pipe.save_pretrained(...)`):
      unet/ vae/ text_encoder/ tokenizer/ scheduler/ ...   SD 1.5, SDXL, ...
      image_encoder/                a transformers CLIPVisionModel folder (config.json + weights)
      anystory_adapter.safetensors  AnyStory adapter weights from `anystory train` (or an
                                    anystory_adapter/ folder: `AnyStoryAdapter.save_pretrained`)
      anystory_panel_lora.safetensors  optional: a diffusers-format UNet LoRA used for wide and
                                    tall panels only (squares are drawn by the UNet alone)
      anystory_defaults.json        optional: the model's sampling defaults, e.g.
                                    {"paste_references_at": 0.4}; a story's `style` overrides them

Only a hub id that the cache lacks is downloaded (once, never with HF_HUB_OFFLINE=1); every piece is
then loaded with `local_files_only=True`, and a missing piece is a `ModelError` that says what to
put where. torch, diffusers and transformers are imported inside
the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .atomic import atomic_path
from .errors import ModelError, OutputError
from .hub import PUBLISHED_MODELS, hub_snapshot, is_hub_id, model_part_dir
from .library_logging import progress_bars_off

DEFAULT_MODEL = "default"
MODEL_FILE_SUFFIXES = (".yaml", ".yml", ".json")  # a model file: the mapping a story's `model:` holds
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"
ADAPTER_FILE = "anystory_adapter.safetensors"
ADAPTER_DIR = "anystory_adapter"  # the same adapter as a folder (`AnyStoryAdapter.save_pretrained`)
PANEL_LORA_FILE = "anystory_panel_lora.safetensors"
DEFAULTS_FILE = "anystory_defaults.json"  # the model's recommended sampling settings (`model_defaults`)
SAMPLING_DEFAULTS = ("paste_references_at",)  # what that file may set; a story's `style` overrides it
PANEL_ADAPTER = "panels"
IMAGE_ENCODER_DIR = "image_encoder"
PIPELINE_INDEX = "model_index.json"
SAVED_FLUX_CLASS = "AnyStoryFluxPipeline"  # a saved FLUX pipeline folder's model_index.json `_class_name`
# The released code's sampling (its generate(): 28 steps, guidance 3.5, 512 px panels, the last
# set by flux/comic.py); a story's `style` overrides them.
FLUX_DEFAULTS = {"steps": 28, "guidance": 3.5}
WORD_SUFFIX = "</w>"  # CLIP's BPE marks the end of a word with it

LAYOUT_HELP = (f"a model folder holds {PIPELINE_INDEX} with the diffusers pipeline's subfolders, "
               f"{IMAGE_ENCODER_DIR}/ (a CLIPVisionModel) and {ADAPTER_FILE}")
# Every file is fingerprinted by the sha256 of all its bytes. A file larger than this is hashed
# once: its hash is kept in the cache folder (`fingerprints/`) with the file's path, size,
# modification and change times and inode, and read back while those are unchanged, so that a
# multi-GB model is not read whole on every render. Any write to a file changes its change time.
_HASH_ALWAYS_BYTES = 2 << 20
_FINGERPRINTS_DIR = "fingerprints"
_CHUNK_BYTES = 1 << 20


def resolve_model_dir(model: str, base_dir: str | os.PathLike[str] | None = None, with_adapter: bool = True) -> Path:
    """The folder that `model` names: the embedded default, a hub id's snapshot in the Hugging
    Face cache (downloaded first when it is not there and the hub may be reached), or a path
    (relative to `base_dir`). with_adapter=False: the caller brings its own adapter file, the
    folder need not hold one."""
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_DIR
    if is_hub_id(model, base_dir):
        try:
            return hub_snapshot(model)
        except ModelError as exc:  # it may have meant a local folder: say both
            local = (Path(base_dir) / model if base_dir is not None else Path(model)).absolute()
            raise ModelError(f"model folder {local} not found, and {exc}; {LAYOUT_HELP}") from None
    folder = Path(model).expanduser()
    if not folder.is_absolute() and base_dir is not None:
        folder = Path(base_dir) / folder
    return folder


def check_model_dir(folder: Path, with_adapter: bool = True) -> None:
    """ModelError naming the first missing piece of a model folder."""
    if folder != DEFAULT_MODEL_DIR:
        return _check_folder(folder, with_adapter)
    try:
        _check_folder(folder, with_adapter)
    except ModelError as exc:
        raise ModelError(f"the embedded default model is not complete in this build ({exc}); set `model:` "
                         f"in the story to a local model folder: {LAYOUT_HELP}") from None


def _check_folder(folder: Path, with_adapter: bool) -> None:
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
    if with_adapter and _own_adapter(folder) is None:
        raise ModelError(f"{folder / ADAPTER_FILE} not found: put the AnyStory adapter weights "
                         "there (`anystory train` writes them)")


def _own_adapter(folder: Path) -> Path | None:
    """The folder's adapter: its file, else its adapter folder; None without either."""
    if (folder / ADAPTER_FILE).is_file():
        return folder / ADAPTER_FILE
    if (folder / ADAPTER_DIR / "config.json").is_file():
        return folder / ADAPTER_DIR
    return None


@dataclass(frozen=True)
class FluxParts:
    """FLUX.1 with the released AnyStory weights: each part a path or a hub id. `where` names what
    named them (a built-in name, a model file) for error lines; empty for a story's mapping."""

    base: str
    redux: str
    adapter: str
    where: str = ""
    memory: str | None = None  # a model file's `memory:` (render/memory_plan.py)
    transformer: str | None = None  # a GGUF file of the transformer, drawn with instead of base's


@dataclass(frozen=True)
class SavedFluxFolder:
    """A folder written by `AnyStoryFluxPipeline.save_pretrained` (or its hub snapshot)."""

    folder: Path


def model_source(model, base_dir: str | os.PathLike[str] | None = None,
                 download: bool = True) -> Path | FluxParts | SavedFluxFolder | None:
    """What a model value names (see the module docstring): a UNet model folder (a Path), the FLUX
    parts, or a saved FLUX pipeline folder. Hub ids come from the Hugging Face cache, downloaded
    once when online; download=False (`validate`): None for a hub model not cached yet."""
    if not isinstance(model, str):  # a story's {base, redux, adapter}
        transformer = getattr(model, "transformer", None)
        return FluxParts(str(model.base), str(model.redux), str(model.adapter), memory=getattr(model, "memory", None),
                         transformer=None if transformer is None else str(transformer))
    if model in PUBLISHED_MODELS:
        return FluxParts(**PUBLISHED_MODELS[model].parts, where=model)
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_DIR
    if not download and is_hub_id(model, base_dir):
        folder = model_part_dir(model, download=False)
        if folder is None:
            return None
    else:
        folder = resolve_model_dir(model, base_dir)
    if folder.suffix.lower() in MODEL_FILE_SUFFIXES and not folder.is_dir():
        return _model_file_parts(folder)
    if _index_class(folder) == SAVED_FLUX_CLASS:
        return SavedFluxFolder(folder)
    return folder


def _model_file_parts(path: Path) -> FluxParts:
    from .story import load_model_file

    if not path.is_file():
        raise ModelError(f"model file {path} not found")
    model = load_model_file(path)
    return FluxParts(model.base, model.redux, model.adapter, where=f"model file {path}", memory=model.memory,
                     transformer=model.transformer)


def builtin_models() -> list[dict]:
    """The built-in model names (`anystory models`), each with what it is, what it needs in memory
    and on disk, and whether it is here: the embedded model ships in the package (its sizes are
    measured: fp32 weights, loaded as stored); a published model's parts are looked up in the
    Hugging Face cache without touching the network (its sizes are `hub.PUBLISHED_MODELS`' estimates)."""
    from .hub import cached_part

    weights = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    on_disk = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    models = [{"name": DEFAULT_MODEL, "summary": "the embedded model: the sprite world, trained on a CPU "
               "(docs/default-model.md)", "parts": {"folder": str(DEFAULT_MODEL_DIR)},
               "memory_gib": round(weights / 2**30, 3), "memory_note": "fp32, runs on a CPU",
               "disk_gb": round(on_disk / 1e9, 3), "available": True, "here": "shipped in the package",
               "missing": [], "defaults": model_defaults(DEFAULT_MODEL)}]
    for name, published in PUBLISHED_MODELS.items():
        missing = [field for field, part in published.parts.items() if cached_part(part) is None]
        here = "in the Hugging Face cache" if not missing else f"not cached: {', '.join(missing)}"
        models.append({"name": name, "summary": published.summary, "parts": dict(published.parts),
                       "memory_gib": published.memory_gib, "memory_note": published.memory_note,
                       "disk_gb": published.disk_gb, "available": not missing, "here": here,
                       "missing": missing, "defaults": dict(FLUX_DEFAULTS)})
    return models


def _index_class(folder: Path) -> str:
    """The `_class_name` of a folder's model_index.json; '' without a readable one."""
    try:
        data = json.loads((folder / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return ""
    return str(data.get("_class_name", "")) if isinstance(data, dict) else ""


def is_flux(model, base_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether `model` names a FLUX model (without downloading anything)."""
    return isinstance(model_source(model, base_dir, download=False), (FluxParts, SavedFluxFolder))


def check_model(model, base_dir: str | os.PathLike[str] | None = None) -> None:
    """ModelError naming the first problem of the model, found without loading or downloading
    anything (`anystory validate`); a hub model not cached yet is not checked. The embedded
    default is not checked: it depends on the build, not on the story (`render` says so)."""
    if model == DEFAULT_MODEL:
        return
    source = model_source(model, base_dir, download=False)
    if isinstance(source, FluxParts):
        from .flux.folders import check_flux_model

        check_flux_model(source.base, source.redux, source.adapter, download=False, where=source.where or None)
        gguf = gguf_file(source, download=False) if source.transformer is not None else None
        if gguf is not None:  # its header: a foreign, cut or unreadable file is said before a render
            from .flux.gguf_file import read_gguf_transformer

            read_gguf_transformer(gguf)
    elif isinstance(source, Path):
        check_model_dir(source)
        model_defaults(str(source))  # its sampling defaults file, when it has one, must read


def model_defaults(model, base_dir: str | os.PathLike[str] | None = None) -> dict:
    """The sampling defaults of a model: `FLUX_DEFAULTS` for FLUX, else what a model folder
    recommends (its `DEFAULTS_FILE`), {} without one. A folder that is missing is not an error
    here: loading it says what is wrong."""
    source = model_source(model, base_dir)
    if not isinstance(source, Path):
        return dict(FLUX_DEFAULTS)
    path = source / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object such as {{\"paste_references_at\": 0.4}}")
    unknown = sorted(set(data) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ModelError(f"{path}: unknown key(s) {', '.join(unknown)}; a model may set {', '.join(SAMPLING_DEFAULTS)}")
    paste = data.get("paste_references_at")
    if paste is not None and (isinstance(paste, bool) or not isinstance(paste, (int, float)) or not 0 <= paste <= 1):
        raise ModelError(f"{path}: paste_references_at must be a number from 0 to 1, got {paste!r}")
    return data


def model_fingerprint(model, base_dir: str | os.PathLike[str] | None = None,
                      cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A short id of a model folder's contents, without loading it: milliseconds while its large
    files keep their recorded hashes (kept in `cache_dir`, default: the encoding cache's folder).
    The same FLUX parts, however named (a built-in name, a model file, a mapping, hub ids or
    their folders), give the same id, and so share the encoding cache."""
    source = model_source(model, base_dir)
    if isinstance(source, FluxParts):
        return _flux_fingerprint(source, cache_dir)
    if isinstance(source, SavedFluxFolder):
        return "flux-" + _pieces_digest(_model_files(source.folder), cache_dir)
    check_model_dir(source)
    return _pieces_digest(_model_files(source), cache_dir)


def _model_files(folder: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(name, path) of every file of a model folder that can change what it draws, sorted: hidden
    files (editor and OS droppings), Markdown (model cards) and `skip` are left out."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if hidden or path.suffix.lower() == ".md" or relative.as_posix() in skip:
            continue
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
    """The runtime asked for (a devices.Runtime, or a Request resolved now), or the one the
    environment and the machine give."""
    from .devices import resolve_runtime, settled

    return settled(runtime) if runtime is not None else resolve_runtime()


def _flux_paths(parts: FluxParts) -> tuple[Path, Path, Path]:
    """(base folder, Redux folder, adapter file), each checked (hub parts fetched)."""
    from .flux.folders import check_flux_model

    return check_flux_model(parts.base, parts.redux, parts.adapter, where=parts.where or None)  # type: ignore[return-value]


def gguf_file(parts: FluxParts, download: bool = True) -> Path | None:
    """The parts' GGUF transformer file (a path, or a hub file fetched); None without one (or, with
    download=False, a hub file not cached yet)."""
    from .flux.folders import resolve_part

    if parts.transformer is None:
        return None
    try:
        return resolve_part(parts.transformer, "GGUF transformer", download, folder=False)
    except ModelError as exc:
        raise ModelError(f"{parts.where}: transformer: {exc}" if parts.where else f"transformer: {exc}") from None


def _flux_fingerprint(parts: FluxParts, cache_dir: str | os.PathLike[str] | None = None) -> str:
    return _flux_digest(*_flux_paths(parts), cache_dir, transformer=gguf_file(parts))


def _flux_digest(base: Path, redux: Path, adapter: Path, cache_dir: str | os.PathLike[str] | None = None,
                 transformer: Path | None = None) -> str:
    """The id of FLUX parts from their contents only: where they lie and how they were named
    does not count. A GGUF transformer file counts with them (other weights, other pixels)."""
    files = [(f"base/{n}", p) for n, p in _model_files(base)] + [(f"redux/{n}", p) for n, p in _model_files(redux)]
    files.append(("anystory_flux.bin", adapter))
    if transformer is not None:
        files.append(("transformer.gguf", transformer))
    return "flux-" + _pieces_digest(files, cache_dir)


def _load_flux(parts: FluxParts, runtime=None, plan=None):
    """The FLUX parts -> the FLUX pipeline behind the renderer's calls (flux/comic.py), on the
    runtime's device and precision (devices.py: bf16 on CUDA, fp32 on a CPU), quantized and
    placed as the memory plan (flux.memory.Plan) says."""
    from .flux import AnyStoryFluxPipeline

    runtime = _runtime(runtime)
    base, redux, adapter = _flux_paths(parts)
    gguf = gguf_file(parts)
    model_id = _flux_digest(base, redux, adapter, transformer=gguf)
    options = _flux_load_options(runtime, plan)
    if gguf is not None:  # its weights stay quantized; base's transformer/ gives the configuration
        from .flux.memory_apply import load_gguf_transformer

        options["transformer"] = load_gguf_transformer(gguf, base, dtype=runtime.torch_dtype)
    pipe = AnyStoryFluxPipeline.from_pretrained(base, redux=redux, adapter=adapter, **options)
    _check_stored_precision(pipe, runtime, base / "transformer")
    return _comic_pipeline(pipe, model_id, runtime, plan)


def _check_stored_precision(pipe, runtime, where: Path) -> None:
    """A transformer stored quantized (torchao, bitsandbytes) keeps the precision it was saved in
    and cannot be cast: one line when the render runs in another (a bfloat16 int8 folder drawn in
    float32 would fail at its first matmul)."""
    import torch

    for module in pipe.transformer.modules():
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        # torchao's tensors carry the precision they dequantize to; bitsandbytes' packed integers
        # (uint8, int8) and GGUF's (dequantized in the render's precision) are not checked here
        if isinstance(module, torch.nn.Linear) and weight is not None and type(weight) is not torch.nn.Parameter \
                and type(weight).__name__ != "GGUFParameter" and weight.dtype.is_floating_point \
                and weight.dtype != runtime.torch_dtype:
            stored = str(weight.dtype).removeprefix("torch.")
            raise ModelError(f"{where}: the transformer is stored quantized with {stored} scales; this render "
                             f"runs in {runtime.dtype}: render with --dtype {stored}")


def _load_saved_flux(saved: SavedFluxFolder, runtime=None, plan=None):
    """A saved AnyStoryFluxPipeline folder -> the FLUX pipeline behind the renderer's calls,
    loaded whole by `AnyStoryFluxPipeline.from_pretrained(folder)`."""
    from .flux import AnyStoryFluxPipeline

    runtime = _runtime(runtime)
    folder = saved.folder
    model_id = model_fingerprint(str(folder))
    try:
        pipe = AnyStoryFluxPipeline.from_pretrained(folder, **_flux_load_options(runtime, plan))
    except ModelError as exc:
        said = str(exc)
        raise ModelError(said if str(folder) in said else f"{folder}: {said}") from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load the saved {SAVED_FLUX_CLASS} ({_first_line(exc)})") from None
    _check_stored_precision(pipe, runtime, folder / "transformer")
    return _comic_pipeline(pipe, model_id, runtime, plan)


def _flux_load_options(runtime, plan) -> dict:
    """from_pretrained's precision, device (the CPU when offloaded: placed after loading) and the
    plan's quantization (diffusers' PipelineQuantizationConfig)."""
    # Offloaded, or the transformer waiting for the text encoders to leave: placed after loading.
    offloaded = runtime.offload or (plan is not None and (plan.offload != "none" or plan.text_encoders_leave))
    options = {"torch_dtype": runtime.torch_dtype, "device": "cpu" if offloaded else runtime.torch_device}
    if plan is not None:
        from .flux.memory_apply import pipeline_quantization_config

        quantization = pipeline_quantization_config(plan)
        if quantization is not None:
            options["quantization_config"] = quantization
    return options


def _comic_pipeline(pipe, model_id: str, runtime, plan=None):
    """The loaded pipeline placed (the plan's offload and VAE tiling; --offload asks for model
    offload at least), keyed by its weights (flux.memory.weights_id)."""
    from .flux.comic import FluxComicPipeline
    from .flux.memory import weights_id

    if plan is None:
        if runtime.offload:
            pipe.enable_model_cpu_offload(device=runtime.device)
    else:
        from .flux.memory_apply import apply_plan

        if runtime.offload and plan.offload == "none":
            plan = replace(plan, offload="model")
        apply_plan(pipe, plan, runtime.device)
    return FluxComicPipeline(pipe, weights_id(model_id, plan))


def load_pipeline(model, base_dir: str | os.PathLike[str] | None = None,
                  adapter: str | os.PathLike[str] | None = None, runtime=None, plan=None):
    """Load the pipeline that `model` names (see the module docstring): a UNet model folder gives
    an AnyStoryPipeline, a FLUX model the FLUX pipeline (docs/flux.md). `adapter`: an adapter
    file used instead of a UNet folder's own (e.g. a training checkpoint to evaluate). `runtime`
    (devices.Runtime): device, precision and offload; default: from the environment
    (ANYSTORY_DEVICE, ANYSTORY_DTYPE, ANYSTORY_OFFLOAD) and the machine. `plan` (flux.memory.Plan,
    a FLUX model's only): its quantization at load, its offload and VAE tiling after."""
    source = model_source(model, base_dir)
    if not isinstance(source, Path) and adapter is not None:
        raise ModelError(f"--adapter {adapter}: a FLUX model names its own adapter (anystory_flux.bin); "
                         "--adapter replaces the adapter of a UNet model folder")
    if isinstance(source, FluxParts):
        return _load_flux(source, runtime, plan)
    if isinstance(source, SavedFluxFolder):
        return _load_saved_flux(source, runtime, plan)
    if plan is not None:
        raise ModelError(f"{model}: memory plan {plan.name}: memory plans are for FLUX models")
    folder = source
    check_model_dir(folder, with_adapter=adapter is None)
    if adapter is None:
        adapter_file, model_id = _own_adapter(folder), model_fingerprint(model, base_dir)
    else:
        adapter_file = model_part_dir(adapter, base_dir)
        if adapter_file.is_dir() and (adapter_file / ADAPTER_FILE).is_file():  # e.g. a hub snapshot
            adapter_file = adapter_file / ADAPTER_FILE
        if adapter_file.is_file():
            theirs = [(ADAPTER_FILE, adapter_file)]
        elif (adapter_file / "config.json").is_file():
            theirs = [(f"{ADAPTER_DIR}/{name}", path) for name, path in _model_files(adapter_file)]
        else:
            raise ModelError(f"{adapter_file}: no adapter file or adapter folder here")
        own = [(name, path) for name, path in _model_files(folder)
               if name != ADAPTER_FILE and not name.startswith(f"{ADAPTER_DIR}/")]
        model_id = _pieces_digest(own + theirs)
    runtime = _runtime(runtime)
    dtype = runtime.torch_dtype
    base, encoder = load_base(folder, dtype)
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


def load_base(folder: str | os.PathLike[str], dtype=None, panel_lora: bool = True):
    """(diffusers pipeline, CLIPVisionModel) of a model folder, on the CPU, in `dtype` (float32 when
    None). `panel_lora`: a UNet LoRA the folder carries for wide and tall panels is switched in for
    non-square latents (`load_panel_lora`); adapter training, on squares only, leaves it out."""
    import torch

    folder = Path(folder)
    dtype = dtype or torch.float32
    with progress_bars_off():
        base = _load_base(folder, dtype)
        encoder = _load_image_encoder(folder / IMAGE_ENCODER_DIR, dtype)
        if panel_lora:
            load_panel_lora(base.unet, folder)
    return base, encoder


def _load_base(folder: Path, dtype):
    from diffusers import DiffusionPipeline

    try:
        base = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers pipeline ({_first_line(exc)})") from None
    if not hasattr(base, "unet"):
        raise ModelError(f"{folder}: {type(base).__name__} has no UNet; AnyStory needs a "
                         "UNet pipeline such as StableDiffusionPipeline or StableDiffusionXLPipeline")
    for name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        _check_tokenizer(folder / name, getattr(base, name, None), getattr(base, encoder_name, None))
    base.set_progress_bar_config(disable=True)
    return base


def _check_tokenizer(where: Path, tokenizer, text_encoder) -> None:
    """transformers 5 returns a broken 2-token tokenizer for a missing vocabulary, silently; and
    CLIPTextModel pools at the end-of-text token, which its config must name as the tokenizer does."""
    if tokenizer is None:
        return
    if len(tokenizer) < 10:
        raise ModelError(f"{where}: the tokenizer has only {len(tokenizer)} tokens; its vocabulary files are missing")
    config = getattr(text_encoder, "config", None)
    if config is None or getattr(config, "vocab_size", None) is None:
        return
    if len(tokenizer) > config.vocab_size:
        raise ModelError(f"{where}: the tokenizer has {len(tokenizer)} tokens, the text encoder only "
                         f"{config.vocab_size}")
    # CLIPTextModel pools at argmax(input_ids) when its config's EOS id is 2 (old CLIP configs,
    # where end-of-text is the largest id), otherwise at the first config EOS id.
    eos = tokenizer.eos_token_id
    pools_at_argmax = getattr(config, "eos_token_id", None) == 2
    if eos is not None and not (pools_at_argmax and eos == len(tokenizer) - 1) and config.eos_token_id != eos:
        raise ModelError(f"{where}: the tokenizer's end-of-text id is {eos}, the text encoder pools at "
                         f"{config.eos_token_id}; set eos_token_id in {where.parent}/text_encoder/config.json")


def load_panel_lora(unet, folder: str | os.PathLike[str]) -> bool:
    """Give `unet` the folder's panel LoRA (`PANEL_LORA_FILE`, diffusers format), used for
    non-square latents only; False when the folder has none.

    diffusers loads the LoRA into a float32 copy of the UNet, where it is merged into the layers it
    adapts, once; a forward whose latents change between square and not square swaps those layers'
    weights in place. The UNet stays a plain diffusers UNet: no LoRA matmuls at each step, and
    squares run on exactly its weights.

    A float32 UNet's copy shares its weights (no second UNet in memory); each adapted layer's
    weight is copied just before the LoRA is merged into it, and that copy is the panel weight."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = Path(folder) / PANEL_LORA_FILE
    if not path.is_file():
        return False
    parameters = list(unet.parameters())
    trainable = [p.requires_grad for p in parameters]  # peft freezes what it does not add
    shared = unet.dtype == torch.float32
    merged = copy.deepcopy(unet, {id(p): p for p in parameters} if shared else None)
    if not shared:
        merged.to(dtype=torch.float32)
    try:
        with progress_bars_off():
            merged.load_lora_adapter(str(path), prefix="unet", adapter_name=PANEL_ADAPTER)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load the panel LoRA ({_first_line(exc)})") from None
    finally:
        for parameter, flag in zip(parameters, trainable):
            parameter.requires_grad_(flag)
    panel_weights = {}
    for name, module in merged.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            module.merge(adapter_names=[PANEL_ADAPTER])
            panel_weights[f"{name}.weight"] = base.weight.detach()
    if not panel_weights:
        raise ModelError(f"{path}: the panel LoRA adapts no layer of this UNet")
    swap = _PanelWeights(unet, panel_weights, path)
    unet.register_forward_pre_hook(lambda module, args, kwargs: swap.use(_non_square(args, kwargs)), with_kwargs=True)
    return True


def _non_square(args, kwargs) -> bool:
    sample = args[0] if args else kwargs["sample"]
    return sample.shape[-1] != sample.shape[-2]


class _PanelWeights:
    """The adapted layers' two weight sets, the one not in use kept aside; `use` swaps them."""

    def __init__(self, unet, panel_weights: dict, path: Path):
        self.parameters = {name: p for name, p in unet.named_parameters() if name in panel_weights}
        if len(self.parameters) != len(panel_weights):
            raise ModelError(f"{path}: the panel LoRA adapts layers this UNet does not have")
        self.aside = panel_weights
        self.panel_in_use = False

    def use(self, panel: bool) -> None:
        import torch

        if panel == self.panel_in_use:
            return
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                incoming = self.aside[name].to(device=parameter.device, dtype=parameter.dtype)  # after pipe.to()
                self.aside[name] = parameter.data
                parameter.data = incoming
        self.panel_in_use = panel


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The words the tokenizer sees in `prompt` (its own normalizer and pre-tokenizer)."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(prompt)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` that are not one token of the tokenizer's vocabulary, in order, without
    repeats (for a model, such as the default one, that knows whole words only)."""
    vocab = tokenizer.get_vocab()
    unknown: list[str] = []
    for word in prompt_words(tokenizer, prompt):
        if word + WORD_SUFFIX not in vocab and word not in unknown:
            unknown.append(word)
    return unknown


def _load_image_encoder(folder: Path, dtype):
    from transformers import CLIPVisionModel

    try:
        return CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype).eval()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load the image encoder ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
