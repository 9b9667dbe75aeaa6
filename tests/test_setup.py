"""The install: scripts/bootstrap.sh and the lock of tested versions (scripts/lock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "locks" / "cpu.txt"


def lock_py(*args, python=sys.executable):
    return subprocess.run([python, str(ROOT / "scripts" / "lock.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_an_older_python_is_refused_in_one_line(tmp_path):
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\ncase \"$2\" in\n  *version_info*) exit 1 ;;\n  *) echo 3.9.18 ;;\nesac\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=str(fake), FDFO_VENV=str(tmp_path / "venv")))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"[fdfo] error: fdfo needs Python 3.11 or newer; {fake} is 3.9.18. Name another with PYTHON=/path/to/python3.11"]
    assert not (tmp_path / "venv").exists()


def test_lock_check_names_each_distribution_that_differs(tmp_path):
    frozen = tmp_path / "lock.txt"
    assert lock_py("freeze", str(frozen)).returncode == 0

    def read_lines():
        return [line for line in (tmp_path / "frozen-copy.txt").read_text().splitlines()]

    (tmp_path / "frozen-copy.txt").write_text(frozen.read_text())
    assert lock_py("check", str(frozen)).returncode == 0
    lines = frozen.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("safetensors=="))
    lines[i] = "safetensors==0.0.1"
    lines.append("not-installed-anywhere==1.0")
    lines.remove(next(line for line in lines if line.startswith("tqdm==")))
    frozen.write_text("\n".join(lines) + "\n")
    proc = lock_py("check", str(frozen))
    assert proc.returncode == 1
    assert "  safetensors: 0.0.1 -> " in proc.stdout and "  not-installed-anywhere: 1.0 -> (removed)" in proc.stdout
    # A distribution the lock does not name (a user's own addition) is listed and kept, not an error.
    lines = [line for line in lines if not line.startswith(("safetensors==", "not-installed-anywhere=="))]
    frozen.write_text("\n".join(lines + [next(line for line in read_lines() if line.startswith("safetensors=="))]) + "\n")
    proc = lock_py("check", str(frozen))
    assert proc.returncode == 0 and proc.stdout.startswith("installed besides the lock (kept): ")
    assert "tqdm==" in proc.stdout


def test_the_gpu_lock_is_the_cpu_lock_without_the_torch_stack(tmp_path):
    def pins(path):
        return {line for line in path.read_text().splitlines() if line and not line.startswith("#")}

    cpu, gpu = pins(LOCK), pins(ROOT / "locks" / "gpu.txt")
    assert any(p.startswith("torch==") for p in cpu) and any(p.startswith("diffusers==") for p in cpu)
    assert gpu == {p for p in cpu if not p.startswith(("torch==", "triton==", "nvidia-"))}
    assert lock_py("gpu", str(LOCK), str(tmp_path / "gpu.txt")).returncode == 0
    assert pins(tmp_path / "gpu.txt") == gpu  # `make lock` would write the same file


def test_a_half_made_environment_is_made_anew_with_the_locked_versions(tmp_path):
    """A venv killed before pip was installed into it: the next set-up makes it anew, installs exactly the
    lock (bootstrap.sh checks the result against it), and the call after that does nothing."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "VIRTUAL_ENV")}
    env.update(FDFO_VENV=str(venv), PYTHON=sys._base_executable)
    proc = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"[fdfo] {venv} is incomplete (an interrupted set-up?): making it anew" in proc.stderr
    assert lock_py("check", str(LOCK), python=str(venv / "bin" / "python")).returncode == 0
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode == 0 and again.stderr == ""
