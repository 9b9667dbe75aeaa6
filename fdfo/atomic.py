"""Writes that either complete or leave the previous file (or directory) untouched.

Everything is written to a temporary sibling first, flushed to disk, then renamed into
place (``os.replace`` is atomic within a file system), so a crash, a full disk or a
killed job never leaves a half-written checkpoint, model or result behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give (mkstemp makes it 0600)
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_null(obj):
    """NaN/inf -> null (None), through dicts and lists, so that a results file is strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_null(v) for v in obj]
    return obj


def write_text(path: str | os.PathLike, text: str) -> None:
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under ``root`` to disk (before the directory is renamed into place)."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            fsync_file(path)


def follow_umask(root: str | os.PathLike) -> None:
    """Give every file under ``root`` the mode a plain open() gives (0666 minus the umask): some writers
    (safetensors, tempfile) create 0600 files, which other users of a shared run directory cannot read."""
    mode = 0o666 & ~_umask()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the completed directory ``tmp`` to ``final``, replacing any directory there; its files get
    the modes the umask gives.

    The old directory is renamed aside first and deleted only once the new one is in place,
    so at every moment either the old or the new directory exists under ``final``'s name
    (or under ``final.old`` for the instant between the two renames).
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    follow_umask(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)  # (also what a crash between the two renames left behind)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that it never exists half-deleted under its own name: it is renamed to
    ``<name>.deleting`` first (a crash leaves that name, which the next call for the same path clears)."""
    path = Path(path)
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    if path.exists():
        os.replace(path, doomed)
        _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
