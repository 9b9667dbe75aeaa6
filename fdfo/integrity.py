"""Checksummed directories: a manifest of the size and checksum of every file, written last, checked first.

    epoch_0010/manifest.json     (a checkpoint; its state_universal/ has a manifest of its own)
        {"format": 1, "checksum": "crc32", "chunk_bytes": 67108864, "files": {
          "state/mp_rank_00_model_states.pt": {"size": 1234, "chunks": ["1a2b3c4d"]},
          ...}}

``seal(dir)`` writes the manifest of a finished directory (atomically, after every other file:
a directory that has one is complete); ``verify(dir)`` compares the files with it before anything
reads them (all, or ``only`` some: the exported adapter) and names the first file that is missing,
of another size, or whose checksum differs. Files the manifest does not list are not looked at.

The checksum is zlib's CRC-32 of every 64 MiB piece of a file (one value per piece, so a damaged
file also says where it is damaged). It guards against accidents (a bit flip on a disk or in a
copy, a truncated transfer, a file replaced by another), not against tampering, and is the
fastest checksum the standard library has: about 3 GiB/s on one core of a 2-core VM (files in the
page cache), where SHA-256 made 1.0-1.7 GiB/s with the CPU's SHA instructions and BLAKE2b 0.7-0.9
GiB/s (benchmarks/bench_checkpoint_hash.py measures what it adds to a save). The pieces are
checksummed on up to ``MAX_THREADS`` threads, while the files are flushed to disk (``seal``). A manifest names its checksum, so another
one (any ``hashlib`` name) can be read back by the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fdfo import atomic

MANIFEST = "manifest.json"
FORMAT = 1
CHECKSUM = "crc32"
CHUNK = 64 << 20  # bytes checksummed as one piece (and the unit of the threads' work)
READ = 4 << 20  # bytes read at once (each thread holds one such buffer)
MAX_THREADS = 16  # (rank 0 checksums while the other ranks wait: the cores are free)


class ManifestError(ValueError):
    """A manifest that cannot be read or does not describe a directory of this format."""


@dataclass
class Problem:
    """One file that does not match the manifest: its path relative to the directory and what is wrong."""

    rel: str
    what: str  # "is missing (...)", "has 12 bytes, the manifest records 34: size differs", "... hash differs"


@dataclass
class Verdict:
    """The outcome of ``verify``: "good", "bad" (``problems`` says why) or "unverified" (no manifest)."""

    directory: Path
    status: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.status == "good"

    def describe(self, root: Path | None = None) -> str:
        """The first problem as "'<file>' <what>[, and N more file(s)]", the file under ``root`` (default:
        the directory verified)."""
        if not self.problems:
            return self.status
        first = self.problems[0]
        more = len(self.problems) - 1
        extra = f", and {more} more file{'s' if more > 1 else ''} like it" if more else ""
        return f"'{(root or self.directory) / first.rel}' {first.what}{extra}"


# --------------------------------------------------------------------------- checksums


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _piece(path: Path, start: int, length: int, checksum: str) -> str:
    """The checksum of ``length`` bytes of ``path`` from ``start`` (hex). A file shorter than that raises
    EOFError (it shrank since it was measured)."""
    h = None if checksum == "crc32" else hashlib.new(checksum)
    crc = 0
    buf = memoryview(bytearray(min(READ, max(length, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left:
            n = f.readinto(buf[:min(len(buf), left)])
            if not n:
                raise EOFError(f"'{path}' ended {left} bytes early")
            if h is None:
                crc = zlib.crc32(buf[:n], crc)  # (releases the GIL: the pieces run in parallel)
            else:
                h.update(buf[:n])
            left -= n
    return f"{crc:08x}" if h is None else h.hexdigest()


def _pieces(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, size - start)) for start in range(0, size, chunk)] or [(0, 0)]


def _checksum_files(files: list[tuple[Path, int]], checksum: str, chunk: int, during=None) -> dict:
    """{path: [checksum of each piece] or the exception reading it raised}, on several threads; ``during``
    (if given) runs on this thread meanwhile (``seal``: flushing the files to disk)."""
    # The largest files first, so that the last pieces to finish are small ones.
    tasks = [(path, start, length) for path, size in sorted(files, key=lambda f: -f[1])
             for start, length in _pieces(size, chunk)]
    with ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="fdfo-checksum") as pool:
        futures = [(path, pool.submit(_piece, path, start, length, checksum)) for path, start, length in tasks]
        if during is not None:
            during()
        out: dict = {}
        for path, future in futures:
            try:
                value = future.result()
            except (OSError, EOFError) as exc:
                out[path] = exc
                continue
            if not isinstance(out.get(path), BaseException):
                out.setdefault(path, []).append(value)
    return out


def list_files(directory: Path, skip: Iterable[str] = ()) -> list[tuple[str, int]]:
    """(path relative to ``directory`` with '/', size) of every file below it, sorted, without the manifest
    and without the top-level entries ``skip``; a symlink is listed as the file it points to."""
    directory, skip = Path(directory), {MANIFEST, *skip}
    found = []
    for root, dirs, names in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            names = [n for n in names if n not in skip]
        for name in names:
            path = Path(root) / name
            if path.is_file():
                found.append(((rel_root / name).as_posix(), path.stat().st_size))
    return sorted(found)


def seal(directory: Path, skip: Iterable[str] = ()) -> dict:
    """Write ``directory/manifest.json`` for the files now in ``directory`` (except the top-level entries
    ``skip``): every file is checksummed and flushed to disk, both at once, then the manifest is written
    atomically, last. Returns the manifest."""
    directory = Path(directory)
    files = list_files(directory, skip)
    paths = [(directory / rel, size) for rel, size in files]
    sums = _checksum_files(paths, CHECKSUM, CHUNK, during=lambda: [atomic.fsync_file(path) for path, _ in paths])
    for path, value in sums.items():
        if isinstance(value, BaseException):
            raise value if isinstance(value, OSError) else OSError(str(value))
    manifest = {"format": FORMAT, "checksum": CHECKSUM, "chunk_bytes": CHUNK,
                "files": {rel: {"size": size, "chunks": sums[directory / rel]} for rel, size in files}}
    head = json.dumps({k: v for k, v in manifest.items() if k != "files"})[:-1]
    lines = [f"  {json.dumps(rel)}: {json.dumps(entry)}" for rel, entry in manifest["files"].items()]
    atomic.write_text(directory / MANIFEST, head + ', "files": {\n' + ",\n".join(lines) + "\n}}\n")  # a file a line
    return manifest


# --------------------------------------------------------------------------- verification


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, None when it has none; ManifestError when it cannot be used."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        manifest = json.loads(text)
        files, checksum, chunk = manifest["files"], manifest["checksum"], int(manifest["chunk_bytes"])
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or chunk <= 0:
            raise ValueError("unknown format")
        if checksum != "crc32":
            hashlib.new(checksum)
        for entry in files.values():
            int(entry["size"]), list(entry["chunks"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"is damaged or of another format ({type(exc).__name__}: {exc})") from None
    return manifest


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def verify(directory: Path, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> Verdict:
    """Compare the files of ``directory`` with its manifest. ``only``: check just the manifest's entries
    that are one of these paths or lie below one (e.g. ``["adapter", "trainer.json"]``); ``skip``: leave
    out the entries below these. Files the manifest does not list are not looked at.

    Sizes are compared first (a truncated or missing file is found without reading anything), then the
    checksums of every piece, on several threads."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except ManifestError as exc:
        return Verdict(directory, "bad", [Problem(MANIFEST, str(exc))])
    if manifest is None:
        return Verdict(directory, "unverified")
    entries = manifest["files"]
    selected = sorted(rel for rel in entries if _selected(rel, only, skip))
    if only is not None:
        wanted = [p.strip("/") for p in only]
        absent = [p for p in wanted if (directory / p).exists() and not any(_under(rel, p) for rel in selected)]
        if absent:
            return Verdict(directory, "bad", [Problem(p, "is not listed in the manifest") for p in absent])
    problems, to_check = {}, []
    for rel in selected:
        path, size = directory / rel, int(entries[rel]["size"])
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems[rel] = Problem(rel, f"is missing (the manifest records {size} bytes)")
            continue
        except OSError as exc:
            problems[rel] = Problem(rel, f"cannot be read ({exc.strerror or exc})")
            continue
        if actual != size:
            cut = " (truncated)" if actual < size else ""
            problems[rel] = Problem(rel, f"has {actual} bytes, the manifest records {size}: size differs{cut}")
        else:
            to_check.append((path, size))
    chunk = int(manifest["chunk_bytes"])
    sums = _checksum_files(to_check, manifest["checksum"], chunk)
    for path, size in to_check:
        rel = path.relative_to(directory).as_posix()
        value, recorded = sums[path], list(entries[rel]["chunks"])
        if isinstance(value, BaseException):
            reason = value.strerror if isinstance(value, OSError) and value.strerror else str(value)
            problems[rel] = Problem(rel, f"cannot be read ({reason})")
        elif value != recorded:
            bad = [i for i, (a, b) in enumerate(zip(value, recorded)) if a != b] or [0]
            start, end = bad[0] * chunk, min((bad[-1] + 1) * chunk, size)
            where = f" (in bytes {_size(start)} to {_size(end)})" if size > chunk else ""
            problems[rel] = Problem(rel, f"does not match the manifest: hash differs{where}")
    ordered = [problems[rel] for rel in selected if rel in problems]
    return Verdict(directory, "bad" if ordered else "good", ordered)


def _under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix + "/")


def _selected(rel: str, only, skip) -> bool:
    if any(_under(rel, p.strip("/")) for p in skip):
        return False
    return only is None or any(_under(rel, p.strip("/")) for p in only)


# --------------------------------------------------------------------------- once per process

_lock = threading.Lock()
_good: dict[tuple, tuple] = {}  # (directory, only, skip) -> the manifest's stat when it last verified
_said: set[str] = set()


def verify_cached(directory: Path, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> Verdict:
    """``verify``, but a directory that verified before in this process, neither its manifest nor any file it
    lists changed since (size, modification time), is not read again (the trainer checks a checkpoint before
    any model is loaded, and once more as it loads it)."""
    directory = Path(directory)
    key = (str(directory.resolve()), tuple(sorted(only)) if only is not None else None, tuple(sorted(skip)))
    try:
        stamp = []
        for rel in [MANIFEST, *sorted((read_manifest(directory) or {}).get("files", {}))]:
            st = (directory / rel).stat()
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        stamp = tuple(stamp)
    except (OSError, ManifestError):
        stamp = None
    with _lock:
        if stamp is not None and _good.get(key) == stamp:
            return Verdict(directory, "good")
    verdict = verify(directory, only, skip)
    if verdict.good and stamp is not None:
        with _lock:
            _good[key] = stamp
    return verdict


def once(message: str) -> bool:
    """True the first time this process asks about ``message`` (a notice said once, not at each check)."""
    with _lock:
        if message in _said:
            return False
        _said.add(message)
        return True
