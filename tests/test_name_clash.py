"""No folder at the repository's top level is importable under a name that an installed distribution
or the standard library uses.

Python puts the repository root first on ``sys.path`` when a command runs from it (``python -m``,
``python -c``, pytest's rootdir, ``fdfo/train.py``'s own set-up), so a top-level package there
shadows an installed one of the same name. A ``kernels/`` package at the top once hid Hugging Face's
``kernels`` distribution, which transformers and diffusers import, and every model load failed. The
project's kernels are ``fdfo.kernels``; ``deepspeed fdfo/train.py`` with the stand-in is checked in
tests/test_train.py (test_deepspeed_launcher_runs_the_entry_point).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # also run by `make smoke` in the newest releases
ROOT = Path(__file__).resolve().parents[1]


def importable_top_level_names() -> set[str]:
    """Names that ``import NAME`` finds in the repository root: folders (packages, namespace portions
    included) and .py files, whose name is an identifier."""
    names = set()
    for entry in ROOT.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        if entry.is_dir() and "." in entry.name:
            continue
        if (entry.is_dir() or entry.suffix == ".py") and name.isidentifier():
            names.add(name)
    return names


def test_no_top_level_name_is_one_a_dependency_or_the_standard_library_uses():
    ours = importable_top_level_names()
    assert "fdfo" in ours and "tests" in ours and "kernels" not in ours
    provided = metadata.packages_distributions()  # top-level import name -> distributions providing it
    clashes = {name: provided[name] for name in ours - {"fdfo"} if name in provided}
    assert not clashes, f"top-level folders that shadow installed distributions: {clashes}"
    assert not ours & set(sys.stdlib_module_names)


def test_pytest_finds_no_top_level_kernels_package():
    spec = importlib.util.find_spec("kernels")  # pytest put the repository root on sys.path
    assert spec is None or ROOT / "kernels" not in map(Path, spec.submodule_search_locations or [])


def test_python_from_the_root_imports_the_installed_kernels(stand_in_kernels):
    """As `python -m fdfo....` and `python -c` from the repository root do (the root first on sys.path):
    diffusers' LoRA loader and a bare `import kernels` get the installed distribution (the stand-in),
    and the project's kernels stay `fdfo.kernels`."""
    site, _ = stand_in_kernels
    probe = ("import json, diffusers.loaders.peft, kernels, fdfo.kernels; "
             "print(json.dumps([kernels.__file__, getattr(kernels, 'FDFO_STAND_IN', False), fdfo.kernels.__file__]))")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_file, stand_in, ours = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stand_in and Path(kernels_file).parent == site / "kernels"
    assert Path(ours).parent == ROOT / "fdfo" / "kernels"
