"""A character encoded once for one AnyStory FLUX model, and its safetensors file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .weights import CHARACTER_FORMAT


@dataclass
class FluxCharacter:
    """A character encoded once for one model (`encode_character`); reusable across calls.

    subject_tokens (1, 81, D): added to the text stream; router_tokens (1, 9, D): the router
    stream; reference_latents (1, L, C): the masked reference's packed VAE latent;
    reference_mask (1, L, 1): 1 on the subject's latent tokens."""

    subject_tokens: torch.Tensor
    router_tokens: torch.Tensor
    reference_latents: torch.Tensor
    reference_mask: torch.Tensor
    reference_size: int
    name: str = ""
    model_id: str = ""
    figure: None = None  # the story renderer's pasted figure: none on FLUX

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("subject_tokens", "router_tokens", "reference_latents", "reference_mask")
        return {k: getattr(self, k).detach().contiguous().cpu() for k in names}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoding as safetensors (atomically)."""
        from safetensors.torch import save_file

        from ..atomic import atomic_path
        meta = {"format": CHARACTER_FORMAT, "reference_size": str(self.reference_size), "name": self.name,
                "model_id": self.model_id}
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FluxCharacter:
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: character encoding not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: corrupt character encoding ({exc})") from None
        if meta.get("format") != CHARACTER_FORMAT:
            raise InputError(f"{path}: not an AnyStory FLUX character encoding")
        return cls.from_tensors(tensors, meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> FluxCharacter:
        """The inverse of `tensors`, with the file's metadata."""
        names = ("subject_tokens", "router_tokens", "reference_latents", "reference_mask")
        missing = [n for n in names if n not in tensors]
        if missing or "reference_size" not in meta:
            raise InputError(f"not a complete FLUX character encoding (missing {(missing or ['reference_size'])[0]})")
        return cls(**{n: tensors[n] for n in names}, reference_size=int(meta["reference_size"]),
                   name=meta.get("name", ""), model_id=meta.get("model_id", ""))
