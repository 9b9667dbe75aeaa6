"""Every module of the package imports on its own, whichever module is imported first: no import circles.

A circle (a imports b, b imports a at the top) only shows when one of its modules is the first of the
package to be imported, so each module is imported with no fdfo module loaded: one interpreter per
order walks the modules and forgets every fdfo module before importing the next. Third-party modules
(torch, diffusers, triton) stay loaded, which keeps this fast; two orders make sure no module works
only because another one happened to be imported before it.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # also run by `make smoke` in the newest releases
ROOT = Path(__file__).resolve().parents[1]

IMPORT_EACH_FIRST = """
import importlib, json, sys, traceback
failures = []
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "fdfo" or m.startswith("fdfo.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures.append(name + ":\\n" + traceback.format_exc(limit=-6))
print(json.dumps(failures))
"""


def package_modules(directory: Path, package: str) -> list[str]:
    """The package and every module below it, found on disk (nothing is imported)."""
    names = [package]
    for info in pkgutil.iter_modules([str(directory)]):
        if info.ispkg:
            names += package_modules(directory / info.name, f"{package}.{info.name}")
        else:
            names.append(f"{package}.{info.name}")
    return names


MODULES = sorted(package_modules(ROOT / "fdfo", "fdfo"))


def test_the_walk_finds_every_package():
    for name in ("fdfo.trainer", "fdfo.tasks", "fdfo.tasks.digits.pretrain", "fdfo.rewards.base",
                 "fdfo.models.sd3", "fdfo.kernels", "fdfo.kernels.fd_loss_triton"):
        assert name in MODULES


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_first(order):
    modules = MODULES if order == "sorted" else MODULES[::-1]
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, json.dumps(modules)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)
