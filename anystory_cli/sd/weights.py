"""Everything AnyStory keeps on disk as safetensors: adapter weights and character encodings.

An adapter is a diffusers-style folder (`config.json` + weights, `AnyStoryAdapter.save_pretrained`)
or one file that carries its config in the metadata; either alone rebuilds the modules. A
character encoding file carries the id of the adapter that made it, so an encoding is never used
with other weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic import atomic_path, replaced_folder
from ..errors import InputError, ModelError
from .adapter import AnyStoryAdapter, AnyStoryConfig

ADAPTER_FORMAT = "anystory-adapter/1"
ENCODING_FORMAT = "anystory-character/2"  # 2: with the figure
# Files an earlier version wrote still load, without a figure (a paste then asks to encode again).
READABLE_ENCODING_FORMATS = ("anystory-character/1", ENCODING_FORMAT)


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None


def save_adapter(adapter: AnyStoryAdapter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write all adapter weights (optionally cast, e.g. to fp16). A path ending in `.safetensors`
    is one file with the config in its metadata; any other path is a folder written by diffusers'
    `save_pretrained` (config.json + weights), replaced whole."""
    path = Path(path)
    if path.suffix != ".safetensors":
        with replaced_folder(path) as tmp:
            module = adapter if dtype is None else copy.deepcopy(adapter).to(dtype)
            module.save_pretrained(str(tmp), safe_serialization=True)
        return path
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
               for k, v in adapter.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT, "config": adapter.spec.to_json()})
    return path


def load_adapter(path: str | Path, dtype: torch.dtype = torch.float32) -> AnyStoryAdapter:
    """Rebuild an adapter from a file or a folder written by `save_adapter` (or `save_pretrained`)."""
    path = Path(path)
    if path.is_dir():
        return _load_adapter_folder(path, dtype)
    if not path.is_file():
        raise ModelError(f"{path}: adapter weights not found (train them with `anystory train`)")
    meta = _metadata(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelError(f"{path}: not an AnyStory adapter file (format {meta.get('format')!r})")
    # Built on the meta device and given uninitialised memory, then filled from the file: no
    # random initialisation of a (for SDXL, two-billion-parameter) ReferenceNet that the file
    # overwrites anyway. (Copying, not assigning, keeps the usual memory alignment, so a loaded
    # adapter computes bit for bit what the adapter that was saved computes.)
    with torch.device("meta"):
        adapter = AnyStoryAdapter.from_spec(AnyStoryConfig.from_json(meta["config"]))
    if any(name not in adapter.state_dict() for name, _ in adapter.named_buffers()):
        raise ModelError("adapter has buffers that are not saved; they cannot be left uninitialised")
    adapter.to_empty(device="cpu")
    state = load_file(str(path))
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the config in the file "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return adapter.to(dtype=dtype).eval()


def _load_adapter_folder(path: Path, dtype: torch.dtype) -> AnyStoryAdapter:
    if not (path / AnyStoryAdapter.config_name).is_file():
        raise ModelError(f"{path}: not an adapter folder (no {AnyStoryAdapter.config_name}; "
                         "`save_adapter` or `AnyStoryAdapter.save_pretrained` writes one)")
    try:
        adapter = AnyStoryAdapter.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        text = str(exc).strip()
        raise ModelError(f"{path}: cannot load the adapter ({text.splitlines()[0] if text else type(exc).__name__})") from None
    return adapter.to(dtype=dtype).eval()


@dataclass
class CharacterEncoding:
    """A character encoded once: what the denoising loop needs, nothing else.

    subject_tokens: (m, d_c) subject QFormer tokens (make the character appear);
    routing_feature: (d_r,) routing QFormer feature (decides where it is);
    reference_features: attn1 layer name -> (L_ref, C) ReferenceNet features (fine detail);
    figure: (h, w, 4) uint8, the segmented reference cropped to the character (alpha: its mask),
        pasted into its place part-way through sampling when a generation asks for it (`figures.py`).
    """

    subject_tokens: torch.Tensor
    routing_feature: torch.Tensor
    reference_features: dict[str, torch.Tensor]
    model_id: str
    name: str = ""
    figure: torch.Tensor | None = None

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What `save` writes: the features (cast to `dtype` if given) and the figure as it is."""
        def cast(t):
            return (t.to(dtype) if dtype is not None else t).detach().contiguous().cpu()

        tensors = {"subject_tokens": cast(self.subject_tokens), "routing_feature": cast(self.routing_feature)}
        tensors.update({f"reference/{k}": cast(v) for k, v in self.reference_features.items()})
        if self.figure is not None:
            tensors["figure"] = self.figure.to(torch.uint8).contiguous().cpu()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "CharacterEncoding":
        """The inverse of `tensors`, with the file's metadata."""
        prefix = "reference/"
        return cls(
            subject_tokens=tensors["subject_tokens"],
            routing_feature=tensors["routing_feature"],
            reference_features={k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
            model_id=meta.get("model_id", ""),
            name=meta.get("name", ""),
            figure=tensors.get("figure"),
        )

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        meta = {"format": ENCODING_FORMAT, "model_id": self.model_id, "name": self.name}
        with atomic_path(path) as tmp:
            save_file(self.tensors(dtype), str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CharacterEncoding":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: character encoding not found")
        try:
            meta = _metadata(path)
            tensors = load_file(str(path))
        except (ModelError, SafetensorError, OSError) as exc:
            raise InputError(f"{path}: corrupt character encoding ({exc})") from None
        if meta.get("format") not in READABLE_ENCODING_FORMATS or "subject_tokens" not in tensors:
            raise InputError(f"{path}: not an AnyStory character encoding")
        return cls.from_tensors(tensors, meta)
