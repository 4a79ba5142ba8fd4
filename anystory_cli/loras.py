"""Style LoRAs: other people's LoRA files on a diffusers pipeline, beside the model's own weights.

A style LoRA is loaded with diffusers' adapter API (`load_lora_weights(..., adapter_name=...)`,
`set_adapters`, `delete_adapters`) under a name of its own, so it never replaces what the model
already carries: the AnyStory processors are not LoRA targets, and a LoRA adapter the model
brings (e.g. a panel LoRA) stays active at its weight beside the style. When the style LoRAs go,
the pipeline draws exactly what it drew before they came.

    resolve_lora(value, base_dir)        -> a .safetensors file (a file, a folder, or a hub id)
    lora_fingerprint(path)               -> sha256 of the file's bytes (part of a panel's key)
    StyleLoras(pipe)                     -> load / set / delete on a diffusers pipeline
      .load(source, adapter_name)           counts the layers it lands on; a LoRA for another
                                            base (shapes do not fit, or nothing lands) is a
                                            ModelError naming the file
      .applied([(file, scale), ...])        a context: loaded and weighted inside, gone after

Only safetensors files are read (never a pickle). Hub ids come from the Hugging Face cache,
downloaded once when online; with HF_HUB_OFFLINE=1 an id that is not cached is a clear error.
torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from .errors import InputError, ModelError
from .hub import hub_shaped
from .library_logging import library_logs_quiet as _quiet

# The file name diffusers writes (`save_lora_weights`) and looks for first in a folder.
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
STYLE_PREFIX = "style"


def looks_like_hub_id(value: str) -> bool:
    """'owner/name' or 'owner/name/file.safetensors' that is not also a local path (./x, ../x, /x,
    ~/x, C:/x, dir/x.safetensors)."""
    parts = value.split("/")
    if value.startswith((".", "~")) or not hub_shaped("/".join(parts[:2])):
        return False
    return len(parts) > 2 or not value.endswith(".safetensors")


def resolve_lora(value: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None = None) -> Path:
    """The .safetensors file that `value` names: a file; a folder holding one (diffusers'
    `pytorch_lora_weights.safetensors`, or the only .safetensors file there); or a hub id, whose
    snapshot in the Hugging Face cache is such a folder. Relative paths are relative to `base_dir`.
    """
    text = str(value)
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists() and looks_like_hub_id(text):
        from .hub import model_part_dir

        try:  # the Hugging Face cache, downloaded once when online (only that file, when named)
            found = model_part_dir(text, base_dir)
        except ModelError as exc:
            raise InputError(f"LoRA {exc}") from None
        if found.is_dir():
            return _lora_file_in(found, text)
        path = found
    if not path.exists():
        raise InputError(f"LoRA {text}: no such file or folder ({path}); give a .safetensors file, a "
                         f"folder holding one, or a hub id (owner/name)")
    if path.is_dir():
        return _lora_file_in(path, text)
    if path.suffix != ".safetensors":
        kind = f"a {path.suffix} file" if path.suffix else "a file without an extension"
        raise InputError(f"LoRA {path}: only .safetensors files are read ({kind} may run code when "
                         f"loaded); convert it to safetensors")
    return path


def _lora_file_in(folder: Path, value: str) -> Path:
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    named = [p for p in files if p.name == DIFFUSERS_LORA_FILE]
    if named:
        return named[0]
    if len(files) == 1:
        return files[0]
    if not files:
        raise InputError(f"LoRA {value}: no .safetensors file in {folder}")
    raise InputError(f"LoRA {value}: {len(files)} .safetensors files in {folder} "
                     f"({', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''}); "
                     f"name the file")


def lora_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a LoRA file's bytes: a panel drawn with it is redrawn when it changes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# on a pipeline


def _lora_a_key(key: str) -> bool:
    """Whether a (diffusers-normalised) LoRA key is one adapted layer's down projection."""
    return "lora" in key and key.endswith(("lora_A.weight", "down.weight", "lora_embedding_A"))


class StyleLoras:
    """Style LoRAs on one diffusers pipeline (with diffusers' LoRA loader mixin).

    The adapters that are active when it is made are the model's own: they stay active (at
    weight 1) whatever style LoRAs come and go."""

    def __init__(self, pipe, own: Sequence[str] | None = None, on_change=None):
        """`own`: the model's adapters kept on beside the styles (default: those active now);
        `on_change()`: called after every change of the style LoRAs (a pipeline that switches
        adapters per stream sets its own state there)."""
        self.pipe = pipe
        if not hasattr(pipe, "load_lora_weights"):
            raise ModelError(f"{type(pipe).__name__} cannot take LoRAs (it has no load_lora_weights)")
        self.own = list(self._active()) if own is None else list(own)
        self.on_change = on_change
        self.loaded: dict[str, float] = {}  # adapter name -> weight, in load order
        self.warn = lambda message: warnings.warn(message, stacklevel=3)  # the CLI shows them its way

    def _library(self, name: str):
        """The pipeline's own diffusers method `name`: on a pipeline with `StyleLoraMixin`, the
        one that mixin's calls of the same name come here to reach."""
        if isinstance(self.pipe, StyleLoraMixin):
            return getattr(super(StyleLoraMixin, self.pipe), name)
        return getattr(self.pipe, name)

    def _active(self) -> list[str]:
        if not self.pipe.get_list_adapters():
            return []
        return list(self._library("get_active_adapters")())

    def _components(self):
        for name in getattr(self.pipe, "_lora_loadable_modules", ()):
            model = getattr(self.pipe, name, None)
            if model is not None:
                yield name, model

    def landed(self, adapter_name: str) -> int:
        """How many layers of the pipeline carry `adapter_name`."""
        count = 0
        for _, model in self._components():
            for module in model.modules():
                for table in ("lora_A", "lora_embedding_A"):
                    if adapter_name in (getattr(module, table, None) or {}):
                        count += 1
        return count

    def load(self, source, adapter_name: str | None = None, **kwargs) -> str:
        """Load a LoRA (a file, a folder, a hub id, or a state dict) under `adapter_name` and
        switch it on at weight 1 beside the model's own adapters and the style LoRAs already
        loaded. ModelError, naming the source, when it does not fit this pipeline."""
        name = adapter_name or f"{STYLE_PREFIX}_{len(self.loaded)}"
        if name in self.own or name in self.loaded:
            raise InputError(f"a LoRA named {name!r} is loaded already; choose another adapter_name")
        where = "a LoRA state dict" if isinstance(source, dict) else str(source)
        if not isinstance(source, dict):
            file = resolve_lora(source)
            source = str(file.parent)
            kwargs.setdefault("weight_name", file.name)
            where = str(file)
        kwargs.setdefault("use_safetensors", True)
        try:
            state_dict, alphas = self._state_dict(source, **kwargs)
            text = [k for k in state_dict if k.startswith("text_encoder")]
            skip_text = bool(text) and not text_encoder_loras_supported()
            expected = sum(_lora_a_key(k) for k in state_dict if not (skip_text and k.startswith("text_encoder")))
            with _quiet():
                if skip_text:
                    self._load_denoiser_only(state_dict, alphas, name)
                else:
                    self._library("load_lora_weights")(source, adapter_name=name, **kwargs)
        except (ValueError, RuntimeError, KeyError, OSError, TypeError, AttributeError) as exc:
            self._forget(name)
            self._activate()
            raise ModelError(f"LoRA {where} does not fit this model ({_first_line(exc)}); "
                             f"is it for another base model?") from None
        landed = self.landed(name)
        if landed == 0 or landed < expected:
            self._forget(name)
            self._activate()
            raise ModelError(f"LoRA {where} does not fit this model: {landed} of its {expected} layers "
                             f"found a place; is it for another base model?")
        if skip_text:
            self.warn(f"LoRA {where}: its {sum(_lora_a_key(k) for k in text)} text-encoder layers are left "
                      f"out (this transformers loads LoRAs into text encoders only with a newer peft); "
                      f"its {landed} denoiser layers are used")
        self.loaded[name] = 1.0
        self._activate()
        return name

    def _state_dict(self, source, **kwargs) -> tuple[dict, dict | None]:
        """The LoRA normalised by the pipeline's own loader (diffusers' key names, any format it
        converts), and its network alphas where the format keeps them apart."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("low_cpu_mem_usage", "hotswap")}
        parameters = inspect.signature(self.pipe.lora_state_dict).parameters
        if "unet_config" in parameters and hasattr(self.pipe, "unet"):
            kwargs["unet_config"] = self.pipe.unet.config
        if "return_alphas" in parameters:
            kwargs["return_alphas"] = True
        with _quiet():
            result = self.pipe.lora_state_dict(dict(source) if isinstance(source, dict) else source, **kwargs)
        if isinstance(result, tuple):
            return result[0], result[1]
        return result, None

    def _load_denoiser_only(self, state_dict: dict, alphas: dict | None, name: str) -> None:
        pipe = self.pipe
        if hasattr(pipe, "load_lora_into_unet") and getattr(pipe, "unet", None) is not None:
            pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet, adapter_name=name,
                                     _pipeline=pipe)
        elif hasattr(pipe, "load_lora_into_transformer") and getattr(pipe, "transformer", None) is not None:
            pipe.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=pipe.transformer,
                                            adapter_name=name, _pipeline=pipe)
        else:
            raise ModelError(f"{type(pipe).__name__}: no UNet or transformer to load a LoRA into")

    def set_weights(self, weights: dict[str, float]) -> None:
        """Weights of loaded style LoRAs (0 switches one off without unloading it)."""
        for name, weight in weights.items():
            if name not in self.loaded:
                raise InputError(f"no style LoRA named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'})")
            self.loaded[name] = float(weight)
        self._activate()

    def _activate(self) -> None:
        names = self.own + list(self.loaded)
        if names:
            with _quiet():
                self._library("set_adapters")(names, [1.0] * len(self.own) + list(self.loaded.values()))
        if self.on_change is not None:
            self.on_change()

    def delete(self, names: Sequence[str] | None = None) -> None:
        """Remove style LoRAs (all of them by default); the model's own adapters stay active.
        With no adapter left at all, the adapted layers are plain layers again."""
        names = list(self.loaded) if names is None else list(names)
        for name in names:
            if name not in self.loaded:
                raise InputError(f"no style LoRA named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'})")
        for name in names:
            self._forget(name)
            del self.loaded[name]
        self._activate()

    def _forget(self, name: str) -> None:
        with _quiet():
            if any(name in adapters for adapters in self.pipe.get_list_adapters().values()):
                self._library("delete_adapters")([name])
            if not any(self.pipe.get_list_adapters().values()):
                self._library("unload_lora_weights")()  # unwrap the LoRA layers: plain modules again

    @contextlib.contextmanager
    def applied(self, loras: Sequence[tuple[object, float]]) -> Iterator[list[str]]:
        """Load each (source, scale), weighted; inside, the pipeline draws with them; after
        (also on an error or an interrupt), they are deleted."""
        names: list[str] = []
        try:
            for index, (source, scale) in enumerate(loras):
                name = self.load(source, adapter_name=f"{STYLE_PREFIX}_{index}")
                names.append(name)
                self.set_weights({name: scale})
            yield names
        finally:
            if names:
                self.delete(names)


def text_encoder_loras_supported() -> bool:
    """Whether transformers can load a LoRA into a text encoder (its PEFT integration wants a
    newer peft than some environments have)."""
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return True
    return Version(version("peft")) >= Version(MIN_PEFT_VERSION)


class StyleLoraMixin:
    """diffusers' LoRA calls on an AnyStory pipeline, for style LoRAs (`self.style_loras`)."""

    style_loras: StyleLoras

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          **kwargs) -> str:
        """Load a style LoRA (a .safetensors file, a folder holding one, a hub id, or a state dict)
        under `adapter_name`, switched on at weight 1 beside the model's own adapters; returns its
        name. A LoRA for another base model is a ModelError naming it."""
        return self.style_loras.load(pretrained_model_name_or_path_or_dict, adapter_name, **kwargs)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Weights of loaded style LoRAs (as diffusers' `set_adapters`: one float, or one per
        name); the model's own adapters stay on."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, (list, tuple)):
            weights = list(adapter_weights)
        else:
            weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(weights) != len(names):
            raise InputError(f"{len(weights)} adapter weights for {len(names)} adapters")
        self.style_loras.set_weights(dict(zip(names, weights)))

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove style LoRAs; the model's own adapters stay."""
        self.style_loras.delete([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def unload_lora_weights(self) -> None:
        """Remove every style LoRA; the model's own adapters stay."""
        self.style_loras.delete()

    def get_active_adapters(self) -> list[str]:
        return self.style_loras._active()


def _first_line(exc: BaseException) -> str:
    """The error's first line; when that only announces a list ("Error(s) in loading state_dict
    for X:"), the first entry of the list too."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
