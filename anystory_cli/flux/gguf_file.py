"""A GGUF transformer file as the memory plan and the loader see it, from its header alone (the
`gguf` package memory-maps the file; no torch, nothing dequantized): whether it holds a FLUX
transformer, its quantization type and the bytes its tensors take.

FLUX GGUF files name their tensors either as the original FLUX checkpoints do
(`double_blocks.0.img_attn.qkv.weight`, the files people download, e.g. flux1-dev-Q4_K_S.gguf)
or as diffusers does (`transformer_blocks.0.attn.to_q.weight`, what anystory_cli.testing writes);
diffusers' `from_single_file` converts the first.
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

EXTRA = 'pip install "anystory-cli[quant]"'
_FLUX_BLOCKS = ("double_blocks.", "transformer_blocks.")  # a FLUX transformer's double-stream blocks


@dataclass(frozen=True)
class GgufTransformer:
    path: Path
    quant_type: str      # the type of most of its 2-D weights' bytes, e.g. "Q8_0", "Q4_K"
    tensor_bytes: int    # every tensor as stored


def check_gguf_installed() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"a GGUF transformer needs the gguf package, which is not installed ({EXTRA})")


def read_gguf_transformer(path: str | Path) -> GgufTransformer:
    """The file's header; InputError (one line naming the file) for a missing file, one that is not
    GGUF or is cut short, and a GGUF file that holds no FLUX transformer."""
    path = Path(path)
    check_gguf_installed()
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    import gguf

    try:
        tensors = gguf.GGUFReader(str(path)).tensors
    except Exception as exc:  # noqa: BLE001 (the reader raises ValueError, IndexError, ... on bad bytes)
        raise InputError(f"{path}: not a GGUF file, or truncated ({_first_line(exc)})") from None
    names = [t.name for t in tensors]
    if not any(name.removeprefix("model.diffusion_model.").startswith(_FLUX_BLOCKS) for name in names):
        seen = ", ".join(names[:2]) or "no tensors"
        raise InputError(f"{path}: not a FLUX transformer GGUF file (no double-stream blocks; it holds {seen}, ...)")
    weights = Counter()
    for tensor in tensors:
        if len(tensor.shape) == 2:
            weights[tensor.tensor_type.name] += int(tensor.n_bytes)
    quant_type = weights.most_common(1)[0][0] if weights else "F32"
    return GgufTransformer(path, quant_type, sum(int(t.n_bytes) for t in tensors))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
