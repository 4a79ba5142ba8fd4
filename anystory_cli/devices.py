"""Where a model runs and at what precision: `--device`, `--dtype`, `--offload`.

Each setting comes from, in order: the command-line option, its environment variable, the
automatic choice.

    ANYSTORY_DEVICE   auto | cpu | cuda | cuda:1 | mps     auto: cuda, then mps, then cpu (under
                                                            torchrun, each process its LOCAL_RANK's GPU)
    ANYSTORY_DTYPE    auto | float32 | bfloat16 | float16   auto: bfloat16 on cuda, float32 elsewhere
    ANYSTORY_OFFLOAD  0 | 1                                 model CPU offload (CUDA only)

With offload, each model (text encoders, UNet, VAE, ...) sits in CPU memory and moves to the GPU
only while it runs (diffusers' `enable_model_cpu_offload`): slower, for GPUs with little memory.
A device and a precision draw different pixels; offload does not.

torch is asked only where the answer needs it: `cpu` (named, or `auto` with a torch built for
no GPU, which can only ever run on the CPU) is known from torch's build metadata without
importing torch. Elsewhere a render takes the kind `auto` gave the panels it drew before (kept
beside them) as a `Request`'s assumption, and asks torch only when a panel must be drawn; a panel
drawn on one kind of device is then never taken for another's (render/orchestrate.py).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

DEVICE_ENV = "ANYSTORY_DEVICE"
DTYPE_ENV = "ANYSTORY_DTYPE"
OFFLOAD_ENV = "ANYSTORY_OFFLOAD"
AUTO = "auto"

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Runtime:
    device: str          # a torch device: cpu, cuda, cuda:1, mps
    dtype: str           # float32, bfloat16 or float16
    offload: bool = False

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def key(self) -> dict[str, str]:
        """What changes pixels: the kind of device and the precision (not the GPU's number, not
        offload)."""
        return {"device": self.device.split(":")[0], "dtype": self.dtype}

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "offload": self.offload}


@dataclass(frozen=True)
class Request:
    """What the options and the environment ask for, checked without torch: the device as
    written (`auto` or a device), the precision (`auto` or a name), offload."""
    device: str
    dtype: str
    offload: bool
    device_source: str = "--device"
    dtype_source: str = "--dtype"
    _asked: list = field(default_factory=list, compare=False, repr=False)  # torch's answer, once

    def known(self) -> Runtime | None:
        """The runtime when it is certain without torch (a CPU named, or `auto` with a torch built
        for no GPU); None when torch must be asked."""
        if _CPU.fullmatch(self.device) or (self.device.lower() == AUTO and not gpu_build()):
            return self._runtime("cpu" if self.device.lower() == AUTO else self.device)
        return None

    def assuming(self, kind: str) -> Runtime | None:
        """The runtime `auto` gave before, when it gave `kind` (cuda, mps, cpu: recorded beside
        the panels it drew), unconfirmed; None for a device that is not `auto` or an unknown kind."""
        if self.device.lower() != AUTO or kind not in ("cuda", "mps", "cpu"):
            return None
        return self._runtime(kind)

    def resolve(self) -> Runtime:
        """The runtime, asking torch where needed (once per request)."""
        known = self.known()
        if known is not None:
            return known
        if not self._asked:
            self._asked.append(self._runtime(_chosen_device(self.device, self.device_source)))
        return self._asked[0]

    def _runtime(self, device: str) -> Runtime:
        precision = self.dtype
        if precision == AUTO:
            precision = "bfloat16" if device.startswith("cuda") else "float32"
        if self.offload and not device.startswith("cuda"):
            raise InputError(f"--offload (model CPU offload) needs a CUDA GPU, and this run's device is {device}; "
                             f"drop --offload (or unset {OFFLOAD_ENV})")
        return Runtime(device, precision, self.offload)


def request_runtime(device: str | None = None, dtype: str | None = None, offload: bool | None = None) -> Request:
    """What the options (None: not given) and the environment ask for, checked without torch;
    InputError for an unknown precision or a bad offload flag."""
    wanted = (device if device is not None else os.environ.get(DEVICE_ENV, "")).strip() or AUTO
    precision = (dtype if dtype is not None else os.environ.get(DTYPE_ENV, "")).strip().lower() or AUTO
    dtype_source = "--dtype" if dtype is not None else DTYPE_ENV
    if precision != AUTO:
        if precision not in DTYPES:
            raise InputError(f"{dtype_source}={precision!r} is not a precision; use auto, float32, bfloat16 or float16")
        precision = DTYPES[precision]
    if offload is None:
        flag = os.environ.get(OFFLOAD_ENV, "").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise InputError(f"{OFFLOAD_ENV}={flag!r}: use 1 or 0")
        offload = flag in _TRUE
    return Request(wanted, precision, bool(offload), "--device" if device is not None else DEVICE_ENV, dtype_source)


def resolve_runtime(device: str | None = None, dtype: str | None = None, offload: bool | None = None) -> Runtime:
    """The runtime the options (None: not given) and the environment ask for; InputError for a
    device this machine does not have, an unknown precision, or offload without CUDA."""
    return request_runtime(device, dtype, offload).resolve()


def settled(runtime) -> Runtime:
    """A Runtime for a Runtime or a Request (resolved, asking torch where needed)."""
    return runtime.resolve() if isinstance(runtime, Request) else runtime


def _chosen_device(wanted: str, where: str) -> str:
    """The torch device string for an --device value (`auto` or a device)."""
    import torch

    if wanted.lower() == AUTO:
        chosen = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
        local_rank = os.environ.get("LOCAL_RANK", "")
        if chosen == "cuda" and local_rank.isdigit() and torch.cuda.device_count() > 1:
            chosen = f"cuda:{int(local_rank) % torch.cuda.device_count()}"  # torchrun: one GPU each
        return chosen
    try:
        chosen = str(torch.device(wanted))
    except (RuntimeError, ValueError):
        raise InputError(f"{where}={wanted!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    kind = chosen.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{where}={wanted!r}: torch sees no CUDA GPU here (a CPU-only torch, or no "
                         f"driver); use --device cpu or auto")
    if kind == "cuda" and ":" in chosen and int(chosen.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"{where}={wanted!r}: there are {torch.cuda.device_count()} CUDA GPUs here")
    if kind == "mps" and not _mps_available():
        raise InputError(f"{where}={wanted!r}: Apple's MPS is not available here; use --device cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise InputError(f"{where}={wanted!r}: AnyStory runs on cpu, cuda or mps")
    return chosen


_CPU = re.compile(r"cpu(:\d+)?")


@functools.lru_cache(maxsize=1)
def gpu_build() -> bool:
    """Whether the installed torch could reach a GPU at all, read from its build metadata
    (torch/version.py) without importing torch: a build for CUDA or ROCm, or macOS (MPS). When
    False, `auto` is the CPU for certain; when True, torch is asked."""
    if sys.platform == "darwin":
        return True
    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    try:
        text = (Path(folders[0]) / "version.py").read_text()
    except (IndexError, OSError):
        return True  # unknown: ask torch
    built_for = {}
    for statement in ast.parse(text).body:
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and isinstance(statement.value, ast.Constant):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            built_for.update({t.id: statement.value.value for t in targets if isinstance(t, ast.Name)})
    if not {"cuda", "hip"} <= built_for.keys():
        return True  # a layout this code does not know: ask torch
    return built_for["cuda"] is not None or built_for["hip"] is not None


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
