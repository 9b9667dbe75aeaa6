"""An output directory, checked before anything is loaded: a command that would fail only
when it writes its first file, after minutes of loading and sampling, fails at once instead.

A directory is usable when it exists, or can be created, and a file can be written in it. Every writer
of a directory checks it here: generate's and evaluate's ``--out``, the protocol's ``--out``, a run's
``log.out_dir`` and the HPSv2 conversion's ``OUT_DIR``; so each says the same about the same mistake.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutDirError(ValueError):
    """An output directory that cannot be used; one line naming it, what is wrong and the fix."""


def check_out_dir(path: str | Path, name: str, *, create: bool = False, empty: bool = False) -> Path:
    """The directory ``path`` (given as ``name``: a flag or a config key), checked; ``create``: then created
    (with the folders above it), else left as it was.

    A file can be written in it, or (when it does not exist yet and is not created) in the nearest folder
    above it, where it would be created; the probe file is removed again. ``empty``: for a writer that
    makes the whole directory beside it and renames it into place, a directory with anything in it is
    refused, and it is the folder above that must take a new file.
    """
    out = Path(path).expanduser()
    fix = f"give a {'new ' if empty else ''}directory that can be created and written to"
    if out.exists() and not out.is_dir():
        raise OutDirError(f"{name} '{path}' is an existing file, not a directory; {fix}")
    if empty and out.is_dir() and any(out.iterdir()):
        raise OutDirError(f"{name} '{path}' exists and is not empty; {fix} (or remove that one first)")
    probe_in = out.parent if empty else out
    while not probe_in.exists():  # (a relative path ends at '.', which exists)
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise OutDirError(f"{name} '{path}' cannot be created: '{probe_in}' is a file; {fix}")
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
            probe_in = out
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=".fdfo-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutDirError(f"{name} '{path}' cannot be written ({exc.strerror or exc}); {fix}") from exc
    return out
