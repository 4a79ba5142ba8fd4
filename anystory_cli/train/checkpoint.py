"""A training run's state on disk, one layout for every trainer, written and read by accelerate.

    checkpoints = Checkpoints(out / "checkpoints", out / "latest", accelerator=accelerator,
                              weights={"adapter.safetensors": WeightsFile(save, load)})
    found = checkpoints.latest()          # the newest checkpoint folder, or None
    info = checkpoints.load(found)        # restores everything in place; returns its run_state.json
    checkpoints.save(step, {"seed": 0})   # writes folder/step-NNNNNNN, then moves the pointer

A checkpoint folder holds what `Accelerator.save_state` writes (the optimizer, the prepared
learning-rate scheduler, the mixed-precision GradScaler, each process's RNG states), the trainer's
weights in safetensors files it writes itself (through the accelerator's save/load-state hooks), and
`run_state.json`: the format, the step, the trainer's own values and the size of every other file.
Everything is read back with safe loaders (safetensors; torch.load with weights_only).

Atomic: a checkpoint is written into a temporary folder beside the others, flushed to disk and
renamed into place whole; the pointer file then moves (atomic_path). A crash or a full disk at any
moment leaves the previous checkpoint the one that resumes. `keep=1` removes the older folders
once the pointer has moved (a large state kept once per run); `keep=None` keeps every step.
Loading checks each file's size against run_state.json, and what accelerate, torch or safetensors
raise about a damaged file becomes one ModelError line.

Trainers without an Accelerator (the lab's) pass their optimizers and schedulers instead; the files
are the same, written and read by the functions `Accelerator.save_state` / `load_state` call. (An
Accelerator fixes the process's AcceleratorState, mixed precision included, for good: a process that
trains a base model in fp32 and then an adapter in bf16 could not make the second Accelerator.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import atomic_path, os_error_reason
from ..errors import ModelError, OutputError

FORMAT = "anystory-run-state/1"
INFO_FILE = "run_state.json"
SCHEDULE_FILE = "scheduler.bin"  # what save_state writes for the first learning-rate scheduler
_STEP_FOLDER = re.compile(r"^step-\d+$")
_REPLACED = ".replaced."  # `.step-N.replaced.*`: a checkpoint set aside while the same step is written again


@dataclass(frozen=True)
class WeightsFile:
    """A file of weights the trainer writes and reads itself (e.g. an adapter in its published format)."""

    save: Callable[[Path], None]
    load: Callable[[Path], None]


def step_folder_name(step: int) -> str:
    return f"step-{step:07d}"


class Checkpoints:
    """The checkpoints of one run: `folder/step-NNNNNNN/`, the newest named by the `pointer` file."""

    def __init__(self, folder: Path, pointer: Path | None = None, *, accelerator=None,
                 optimizers: Sequence[Any] = (), schedulers: Sequence[Any] = (),
                 weights: dict[str, WeightsFile] | None = None, keep: int | None = None,
                 restart_hint: str = "start the run over"):
        if accelerator is not None and (optimizers or schedulers):
            raise TypeError("with an Accelerator, its prepared optimizers and schedulers are saved")
        self.folder = Path(folder)
        self.pointer = Path(pointer) if pointer is not None else self.folder / "latest"
        self.accelerator = accelerator
        self.optimizers, self.schedulers = list(optimizers), list(schedulers)
        self.weights = dict(weights or {})
        self.keep = keep
        self.restart_hint = restart_hint
        self._hooks = []
        if accelerator is not None and self.weights:
            self._hooks = [accelerator.register_save_state_pre_hook(self._save_weights_hook),
                           accelerator.register_load_state_pre_hook(self._load_weights_hook)]

    def close(self) -> None:
        """Take the weights hooks off the accelerator (it may train something else next)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- where -------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """The checkpoint the pointer names; None when there is no pointer (nothing to resume);
        ModelError when it names a folder that is not there."""
        if not self.pointer.is_file():
            return None
        name = self.pointer.read_text().strip()
        found = self.folder / name
        if _STEP_FOLDER.match(name) and not found.exists():  # stopped while it was being replaced
            for aside in sorted(self.folder.glob(f".{name}{_REPLACED}*")):
                if (aside / INFO_FILE).is_file():
                    os.replace(aside, found)
                    break
        if not _STEP_FOLDER.match(name) or not found.is_dir():
            raise ModelError(f"{self.pointer} names the checkpoint {found}, which is not there; "
                             f"{self.restart_hint}")
        return found

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int, info: dict | None = None) -> Path:
        """Write the state at `step` as folder/step-NNNNNNN (whole or not at all), then point at it.
        OutputError if it cannot be written; the previous checkpoint is then intact."""
        final = self.folder / step_folder_name(step)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.folder))
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot write checkpoints ({os_error_reason(exc)})") from None
        aside = None
        try:
            self._write_state(tmp, step)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            record = {"format": FORMAT, "step": int(step), **(info or {}), "files": files}
            (tmp / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
            for path in [*files, INFO_FILE]:  # on disk before the rename makes the folder the checkpoint
                with open(tmp / path, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():  # the same step again: the pointer may name it, so it goes aside first
                aside = Path(tempfile.mkdtemp(prefix=f".{final.name}{_REPLACED}", dir=self.folder))
                os.replace(final, aside)
            os.replace(tmp, final)
        except (OSError, OutputError) as exc:
            if aside is not None and not final.exists():  # put the set-aside checkpoint back
                with contextlib.suppress(OSError):
                    os.replace(aside, final)
            # OutputError: from atomic_path, about a file in the temporary folder
            reason = (os_error_reason(exc) if isinstance(exc, OSError)
                      else str(exc).partition(" (")[2].rpartition(")")[0] or str(exc))
            raise OutputError(f"{final}: checkpoint not written ({reason}); "
                              f"the previous checkpoint is intact") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with atomic_path(self.pointer) as path:  # the pointer moves only once the folder is whole
            path.write_text(final.name + "\n")
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if self.keep is not None:
            self._prune(final)
        return final

    def _write_state(self, folder: Path, step: int) -> None:
        if self.accelerator is not None:
            self.accelerator.save_state(str(folder))  # the hooks write the weights files
            return
        from accelerate.checkpointing import save_accelerator_state

        for name, weights in self.weights.items():
            weights.save(folder / name)
        save_accelerator_state(str(folder), [], self.optimizers, self.schedulers, [], 0, step)

    def _save_weights_hook(self, models, weights, output_dir) -> None:
        for name, file in self.weights.items():
            file.save(Path(output_dir) / name)

    def _prune(self, newest: Path) -> None:
        """Older step folders go once the pointer names `newest` (keep=1: only it stays), and so do
        the temporary folders of writes that were stopped (a run with `keep` has one writer)."""
        older = sorted((p for p in self.folder.iterdir() if p.is_dir() and _STEP_FOLDER.match(p.name)
                        and p != newest), key=lambda p: p.name)
        debris = [p for p in self.folder.glob(".step-*") if p.is_dir()]
        for path in older[: max(0, len(older) - (self.keep - 1))] + debris:
            shutil.rmtree(path, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------

    def load(self, checkpoint: Path) -> dict:
        """Restore the weights, optimizers, schedulers and RNG states in place from `checkpoint`;
        returns its run_state.json. ModelError (one line) if the checkpoint is incomplete or damaged."""
        from safetensors import SafetensorError

        info = read_info(checkpoint, self.restart_hint)
        try:
            if self.accelerator is not None:
                self.accelerator.load_state(str(checkpoint))  # the hooks read the weights files
            else:
                from accelerate.checkpointing import load_accelerator_state

                for name, weights in self.weights.items():
                    weights.load(checkpoint / name)
                load_accelerator_state(str(checkpoint), [], self.optimizers, self.schedulers, [], 0, None, "cpu")
        except ModelError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, EOFError,
                pickle.UnpicklingError, SafetensorError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{checkpoint}: the checkpoint does not load ({reason}); {self.restart_hint}") from None
        return info

    def _load_weights_hook(self, models, input_dir) -> None:
        for name, file in self.weights.items():
            file.load(Path(input_dir) / name)


def advance_schedule(schedule, step: int) -> None:
    """Step a fresh learning-rate scheduler `step` times: where a state holds no scheduler file, the
    schedule, a function of the step, is found again from the step alone."""
    import warnings

    with warnings.catch_warnings():  # no optimizer step comes before these
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(step):
            schedule.step()


def read_info(checkpoint: Path, restart_hint: str = "start the run over") -> dict:
    """A checkpoint's run_state.json, once every file it lists is there with its size; ModelError otherwise."""
    path = Path(checkpoint) / INFO_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{checkpoint}: not a training checkpoint ({INFO_FILE} is missing); {restart_hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc}); {restart_hint}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("step"), int):
        raise ModelError(f"{path}: not a training state of this program (expected format {FORMAT!r} "
                         f"and a step); {restart_hint}")
    for name, size in dict(info.get("files", {})).items():
        file = Path(checkpoint) / name
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            what = "is missing" if actual is None else f"has {actual} bytes, {size} were written"
            raise ModelError(f"{file}: the checkpoint is damaged ({name} {what}); {restart_hint}")
    return info
