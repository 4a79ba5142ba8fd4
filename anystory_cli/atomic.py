"""Atomic file writes: write beside the target, then rename over it.

An interrupted or failed write leaves the previous file untouched and no half-written file.
Two processes writing the same file at once each rename a whole file into place: the last one
wins, and a reader never sees a mixture.

`within=ROOT` keeps a write inside ROOT: a folder on the way that is a symbolic link leading out
of ROOT is refused (the target itself may be a link: the rename replaces the link, it never
writes through it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError


TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside their target
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_path(target: str | Path, within: str | Path | None = None):
    """Yield a temporary path in the target's folder; on success it replaces `target`.

    With `within`, OutputError if the target's folder is (or would be) outside that folder."""
    target = Path(target)
    if within is not None:
        check_within(target, within)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot write here ({os_error_reason(exc)})") from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp makes the file private (0600)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"{target}: write failed ({os_error_reason(exc)}); the previous file is intact") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def replaced_folder(target: str | Path):
    """Yield a new folder beside `target`; on success it takes `target`'s place (the old one is
    renamed aside, then removed), so a reader finds the old folder or the new one, whole."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot write here ({os_error_reason(exc)})") from None
    aside = target.parent / f".{target.name}.old{TEMP_SUFFIX}"
    try:
        yield tmp
        shutil.rmtree(aside, ignore_errors=True)
        if target.exists():
            target.rename(aside)
        tmp.rename(target)
    except OSError as exc:
        raise OutputError(f"{target}: write failed ({os_error_reason(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def os_error_reason(exc: OSError) -> str:
    """The OS's words, and what to do when they do not say it (a full disk); training uses it."""
    words = exc.strerror or str(exc) or type(exc).__name__
    return f"{words}: the disk is full; free some space and run again" if exc.errno in _DISK_FULL else words


def check_within(target: str | Path, root: str | Path) -> None:
    """OutputError unless `target` lies in `root` once symbolic links on the way are followed.

    The target itself is not followed (a rename replaces a link; it does not write through it);
    every folder between `root` and the target is. `root` itself may be a link: it is the
    folder the user chose."""
    target, root = Path(target), Path(root)
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(target.parent)
    if os.path.commonpath([real_root, real_parent]) == real_root:
        return
    # Name the link that leads out, for the message.
    culprit, current = target.parent, root
    with contextlib.suppress(ValueError):
        for part in target.parent.relative_to(root).parts:
            current = current / part
            if current.is_symlink():
                culprit = current
                break
    where = (f"{culprit} is a symbolic link to {os.path.realpath(culprit)}" if culprit.is_symlink()
             else f"{culprit} resolves to {real_parent}")
    raise OutputError(f"{target}: not written, it would land outside the output folder {root} "
                      f"({where}); remove the link or choose another output folder")


def _mode_for(target: Path) -> int:
    """The replaced file's permissions, else those a plain open() would give a new file."""
    try:
        return target.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask
