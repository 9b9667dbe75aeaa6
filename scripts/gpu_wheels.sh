#!/usr/bin/env bash
# Fills a folder with the wheels the benchmark GPU machine lacks, for its Python 3.12 on
# x86-64 Linux, so that benchmarks/run_gpu.sh can install them there without a network.
#
#   bash scripts/gpu_wheels.sh [DIR]        # DIR defaults to .whl/ at the repository root
#
# That machine has torch (CUDA), triton, transformers, peft, accelerate, safetensors, numpy,
# pytest, nvidia-ml-py, psutil, py-cpuinfo, msgpack, ninja and einops, but not diffusers,
# deepspeed, nor these dependencies of theirs: hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, importlib-metadata (with zipp and lazy-importer, which it needs); nor
# open_clip_torch, whose wheel carries the CLIP BPE vocabulary the offline tokenizer is
# built from (the file is read, the package is never imported). Each is pinned to its
# version in locks/gpu.txt (the CPU lock without the torch stack, made by `make lock`), so
# that the GPU runs the code the CPU tests ran. DeepSpeed is published as source only: it is
# built here into a pure wheel against this machine's environment's torch (.venv, or
# $PYTHON; its CUDA ops compile on first use there). Never torch or triton: the GPU
# machine's own builds are used.
#
# Idempotent: wheels already in DIR are kept, other versions of these packages and any
# other wheel are removed, so DIR holds exactly one wheel per package. Prints each wheel and
# the total, and fails if the total exceeds GPU_WHEELS_BUDGET_MIB (default 40; the tree and
# the wheels travel together under 64 MiB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/.whl}"
py="${PYTHON:-$root/.venv/bin/python}"
budget_mib="${GPU_WHEELS_BUDGET_MIB:-40}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

# Distribution names as pip spells them; their versions come from locks/gpu.txt.
binary=(pydantic-core)  # compiled: the cp312 manylinux wheel
pure=(diffusers hjson pydantic annotated-types typing-inspection importlib-metadata zipp lazy-importer
      open-clip-torch)
built=(deepspeed)  # source only on the index: built here

lock="$root/locks/gpu.txt"
norm() {  # a distribution name as wheel file names spell it: lower case, runs of -_. as _
    echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'
}
version_of() {  # the GPU lock's version of a distribution
    local v
    v="$(sed -nE "s/^$(norm "$1" | tr _ -)==(.+)/\1/p" "$lock")"
    [ -n "$v" ] || { echo "gpu_wheels: locks/gpu.txt names no version of $1 (refresh it with 'make lock')" >&2; exit 1; }
    echo "$v"
}

declare -A want  # normalised name -> version
for name in "${binary[@]}" "${pure[@]}" "${built[@]}"; do
    want[$(norm "$name")]="$(version_of "$name")"
done

# Remove what does not belong: other versions, other packages, and never a torch or triton.
shopt -s nullglob
for whl in "$dir"/*.whl; do
    base="$(basename "$whl")"
    dist="$(norm "${base%%-*}")"
    rest="${base#*-}"
    ver="${rest%%-*}"
    if [ "${want[$dist]:-}" != "$ver" ]; then
        echo "removing $base (not one of the wheels this script brings)"
        rm -f "$whl"
    fi
done

have() {  # have NAME: a wheel of NAME at the wanted version is already in DIR
    local n
    n="$(norm "$1")"
    compgen -G "$dir/${n}-${want[$n]}-*.whl" > /dev/null
}

pip=("$py" -m pip --disable-pip-version-check)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
missing=()
for name in "${binary[@]}" "${pure[@]}"; do
    have "$name" || missing+=("$name==${want[$(norm "$name")]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading ${missing[*]}"
    "${pip[@]}" download -q --no-deps "${platform[@]}" -d "$dir" "${missing[@]}" \
        2> >(grep -v "WARNING: Location .* is ignored" >&2)
fi
for name in "${built[@]}"; do
    if ! have "$name"; then
        echo "building $name==${want[$(norm "$name")]} (a pure wheel, against this environment's torch)"
        DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$dir" "$name==${want[$(norm "$name")]}" \
            2> >(grep -v "WARNING: Location .* is ignored" >&2)
    fi
done

# Check: one wheel per package, each for CPython 3.12 on x86-64 Linux or pure.
status=0
for n in "${!want[@]}"; do
    files=("$dir/${n}-${want[$n]}-"*.whl)
    if [ ${#files[@]} -ne 1 ]; then
        echo "gpu_wheels: expected one wheel of $n ${want[$n]} in $dir, found ${#files[@]}" >&2
        status=1
        continue
    fi
    tag="${files[0]##*/}"
    case "$tag" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*x86_64*.whl | *-abi3-*x86_64*.whl) ;;
    *) echo "gpu_wheels: $tag is not for CPython 3.12 on x86-64 Linux" >&2; status=1 ;;
    esac
done
for whl in "$dir"/*.whl; do
    case "$(basename "$whl")" in
    torch-* | triton-*) echo "gpu_wheels: $whl must not be brought: the GPU machine has its own" >&2; status=1 ;;
    esac
done

total=0
for whl in "$dir"/*.whl; do
    bytes=$(stat -c %s "$whl")
    total=$((total + bytes))
    printf '%10.2f MiB  %s\n' "$(awk -v b="$bytes" "BEGIN {print b / 1048576}")" "$(basename "$whl")"
done
tree=$(cd "$root" && { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
printf '%10.2f MiB  in all, %d wheels (%s); budget %s MiB\n' "$(awk -v b="$total" "BEGIN {print b / 1048576}")" \
    "$(ls "$dir"/*.whl | wc -l)" "$dir" "$budget_mib"
printf '%10.2f MiB  the working tree (tracked and untracked files git does not ignore); with the wheels %.2f MiB of 64\n' \
    "$(awk -v b="$tree" "BEGIN {print b / 1048576}")" "$(awk -v b="$((tree + total))" "BEGIN {print b / 1048576}")"
if [ "$total" -gt $((budget_mib * 1048576)) ]; then
    echo "gpu_wheels: the wheels exceed the ${budget_mib} MiB budget" >&2
    status=1
fi
exit $status
