"""The lock of tested versions: write it from an environment, check an environment against it, say
what changed.

    python scripts/lock.py freeze LOCK       # the running environment's versions -> LOCK (prints the changes)
    python scripts/lock.py check LOCK [--torch-kept] [--system-site]
    python scripts/lock.py gpu LOCK OUT      # the GPU lock: LOCK without torch, triton and CUDA libraries

Run with the environment's own Python (``.venv/bin/python scripts/lock.py ...``): it reads that
environment's installed distributions. A lock holds one ``name==version`` line per distribution,
names normalised (PEP 503), sorted, fdfo itself left out; torch's local label (``+cpu``) is dropped,
so the same line serves the CPU build and PyPI's.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

# What a GPU image brings itself: never pinned by the GPU lock, and not compared when a run keeps
# a torch of its own (FDFO_TORCH=system, or a CUDA build kept in the environment).
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*)$")
OWN = {"fdfo"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every distribution this Python sees, first on sys.path wins (as imports do)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = normalise(dist.metadata["Name"] or "")
        if name and name not in OWN and name not in found:
            found[name] = dist.version.split("+")[0] if name == "torch" else dist.version
    return found


def read(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise SystemExit(f"{path}:{number}: not a 'name==version' line: {line!r}")
        pins[normalise(match[1])] = match[2]
    return pins


def write(path: Path, pins: dict[str, str], header: str) -> None:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins)]
    path.write_text("\n".join(lines) + "\n")


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            out.append(f"  {name}: {a or '(none)'} -> {b or '(removed)'}")
    return out


def freeze(args) -> int:
    path = Path(args.lock)
    old = read(path) if path.exists() else {}
    new = installed()
    header = (f"The versions the CPU test suite passed with: scripts/bootstrap.sh installs exactly these.\n"
              f"Made by `make lock` on {date.today().isoformat()} (Python {platform.python_version()}, "
              f"{platform.machine()}); torch is the CPU build\n"
              f"there (its +cpu label is dropped here). Do not edit by hand: `make lock` resolves anew and rewrites it.")
    write(path, new, header)
    diff = changes(old, new)
    print(f"{path}: {len(new)} distributions; " + (f"{len(diff)} changed:" if diff else "nothing changed"))
    print("\n".join(diff)) if diff else None
    return 0


def check(args) -> int:
    """Every distribution of the lock installed at its version (exit 1, listing the differences,
    otherwise). Distributions the lock does not name are listed and kept: a user's own additions
    (a tracker, a profiler), or with --system-site the base Python's packages."""
    want = read(Path(args.lock))
    have = installed()
    if args.torch_kept:
        want = {n: v for n, v in want.items() if not TORCH_STACK.match(n)}
    diff = changes(want, {n: v for n, v in have.items() if n in want})
    if diff:
        print("installed versions that differ from the lock (lock -> installed):")
        print("\n".join(diff))
        return 1
    extra = sorted(n for n in have if n not in want and not (args.torch_kept and TORCH_STACK.match(n)))
    if extra and not args.system_site:
        print("installed besides the lock (kept): " + ", ".join(f"{n}=={have[n]}" for n in extra))
    return 0


def gpu(args) -> int:
    pins = {n: v for n, v in read(Path(args.lock)).items() if not TORCH_STACK.match(n)}
    header = ("The GPU image's lock: the versions of locks/cpu.txt without torch, triton and the CUDA libraries,\n"
              "which the image brings. scripts/gpu_wheels.sh takes the versions of the wheels it brings from here.\n"
              "Made by `make lock` from locks/cpu.txt; do not edit by hand.")
    write(Path(args.out), pins, header)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("freeze", help="write the running environment's versions as the lock")
    p.add_argument("lock")
    p.set_defaults(run=freeze)
    p = sub.add_parser("check", help="exit 1, listing the differences, unless this environment is the lock")
    p.add_argument("lock")
    p.add_argument("--torch-kept", action="store_true", help="torch, triton and CUDA libraries are not compared")
    p.add_argument("--system-site", action="store_true", help="packages the lock does not name are not compared")
    p.set_defaults(run=check)
    p = sub.add_parser("gpu", help="write the GPU lock derived from the CPU lock")
    p.add_argument("lock")
    p.add_argument("out")
    p.set_defaults(run=gpu)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
