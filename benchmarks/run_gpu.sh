#!/usr/bin/env bash
# Takes every GPU figure of benchmarks/RESULTS.md on one GPU machine, in two commands of at
# most 8 minutes each.
#
#   bash scripts/gpu_wheels.sh                 # here, first: .whl/ with the wheels that machine lacks
#   bash benchmarks/run_gpu.sh OUT 1           # there: env aot kernels sampling_off tests zero_lora
#   bash benchmarks/run_gpu.sh OUT 2           # there: env sampling_on epoch zero_full zero_offload
#   bash benchmarks/run_gpu.sh OUT PART ...    # named parts only (install env tests aot kernels
#                                              # sampling_off sampling_on epoch zero_lora zero_full zero_offload)
#   FDFO_GPU_DRY_RUN=1 bash benchmarks/run_gpu.sh OUT 1    # CPU: the same parts at tiny size
#
# The working tree and .whl/ travel together (under 64 MiB). Every command first installs the
# wheels of .whl/ that the machine lacks into a temporary folder put on PYTHONPATH (never a
# torch or triton wheel: it refuses), then runs its parts in order. Each part has its own time
# limit (`timeout`), and the command as a whole keeps within FDFO_GPU_BUDGET_S (default 450 s):
# a part gets what is left, and one that would get under 20 s is skipped and says so. Each part
# writes OUT/<part>.log and its JSON (the benchmarks rewrite their JSON as they measure, so a
# part cut short keeps what it measured), appends a line to OUT/status.jsonl, and a failing or
# timed-out part does not stop the others. OUT/gpu_report.md (benchmarks/gpu_report.py) is
# rewritten after every part: the device, versions, date, and a table per part in the form of
# RESULTS.md, with the status and log tail of the parts that failed.
#
# Sizes: SD3.5 Medium at 512² (64×64 latents), the published micro-batches (3 pairs = 6 rows
# per sampling forward, 6 rows per training forward), one timed repeat; each part is meant to
# take about 90 s on one H200, the offloaded SD3.5 Large part longer (DeepSpeed's CPU Adam op
# compiles on first use, about a minute). zero_lora adds, after SD3.5 Medium's stages 0, 2 and
# 3, a ZeRO-3 LoRA row each for FLUX.1 [dev] (512² = 32×32 tokens, 512 T5 tokens) and SD3.5
# Large, so it runs last in its command: what it measured is kept if the budget runs out.
#
# Environment: PYTHON (default python3, else python), FDFO_WHEELS (default .whl), FDFO_GPU_SITE
# (where the wheels go; default $TMPDIR/fdfo-gpu-site), FDFO_GPU_REQUIRED (the modules that must
# import; default diffusers deepspeed pydantic hjson), FDFO_GPU_BUDGET_S, FDFO_GPU_MAX_PART_S (a
# cap on every part's limit), FDFO_GPU_TESTS (the pytest selection of the tests part),
# FDFO_GPU_DRY_RUN=1 (tiny sizes, runs without CUDA: what needs CUDA is skipped by the
# benchmarks themselves, with the reason in their JSON; torch.compile is not timed on CPU).
set -u
usage="usage: bash benchmarks/run_gpu.sh OUT_DIR {1|2|all|PART...}"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

GROUP1="env aot kernels sampling_off tests zero_lora"
GROUP2="env sampling_on epoch zero_full zero_offload levers"
ALL_PARTS="install env tests aot kernels sampling_off sampling_on epoch zero_lora zero_full zero_offload levers"
case "${1:-}" in
1) PARTS=$GROUP1 ;;
2) PARTS=$GROUP2 ;;
all | "") PARTS="$GROUP1 ${GROUP2#env }" ;;
*) PARTS="$*" ;;
esac
for part in $PARTS; do
    case " $ALL_PARTS " in
    *" $part "*) ;;
    *) echo "unknown part '$part' (parts: $ALL_PARTS; groups: 1 2 all)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY=${FDFO_GPU_DRY_RUN:-0}
BUDGET=${FDFO_GPU_BUDGET_S:-450}
WHEELS=${FDFO_WHEELS:-$ROOT/.whl}
SITE=${FDFO_GPU_SITE:-${TMPDIR:-/tmp}/fdfo-gpu-site}
REQUIRED=${FDFO_GPU_REQUIRED:-diffusers deepspeed pydantic hjson}
MAX_PART=${FDFO_GPU_MAX_PART_S:-}  # a cap on every part's limit (empty: none)
RESERVE=10   # seconds kept for the last report
MIN_PART=20  # a part that would get less than this is skipped
DEADLINE=$((SECONDS + BUDGET))
unset TRITON_INTERPRET  # compiled Triton on the GPU; the CPU smoke runs set it where they need it
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu
    # tiny sizes gain nothing from threads, and on a busy machine OpenMP's spinning threads slow them 10-100x
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

json_str() {  # a JSON string literal of $1
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/ }
    s=${s//$'\n'/ }
    printf '"%s"' "$s"
}

record() {  # record PART STATUS RC SECONDS LIMIT REASON [CMD...]
    local part=$1 status=$2 rc=$3 secs=$4 limit=$5 reason=$6
    shift 6
    local cmd="$*"
    cmd=${cmd//"$PY"/python}  # as a reader would type it: no machine's paths
    cmd=${cmd//"$OUT"/OUT}
    printf '{"part": %s, "status": %s, "rc": %s, "seconds": %s, "limit_s": %s, "reason": %s, "command": %s, "log": %s}\n' \
        "$(json_str "$part")" "$(json_str "$status")" "${rc:-null}" "$secs" "${limit:-null}" "$(json_str "$reason")" \
        "$(json_str "$cmd")" "$(json_str "$part.log")" >> "$OUT/status.jsonl"
    echo "== $part: $status${reason:+ ($reason)} in ${secs}s"
}

report() {
    "$PY" benchmarks/gpu_report.py "$OUT" > /dev/null 2>> "$OUT/gpu_report.log" \
        || echo "(gpu_report.py failed: see $OUT/gpu_report.log)"
}

run_part() {  # run_part PART LIMIT CMD...: under `timeout`, within what is left of the budget
    local part=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS - RESERVE))
    if [ "$left" -lt "$MIN_PART" ]; then
        record "$part" skipped "" 0 "" "no time left in this command's ${BUDGET}s budget" "$@"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    [ -z "$MAX_PART" ] || [ "$limit" -le "$MAX_PART" ] || limit=$MAX_PART
    echo "== $part (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" > "$OUT/$part.log" 2>&1 < /dev/null
    rc=$?
    local status=ok reason=""
    case $rc in
    0) ;;
    124 | 137) status=timeout reason="killed after ${limit}s" ;;
    *) status=failed reason="exit code $rc" ;;
    esac
    record "$part" "$status" "$rc" $((SECONDS - t0)) "$limit" "$reason" "$@"
    tail -n 12 "$OUT/$part.log" | sed 's/^/   | /'
}

# --------------------------------------------------------------------------- install

install_wheels() {  # the wheels of $WHEELS whose distributions this Python lacks, into $SITE
    local t0=$SECONDS
    exec 3>> "$OUT/install.log"
    echo "python: $PY; wheels: $WHEELS; target: $SITE; required: $REQUIRED" >&3
    local bad
    bad=$(find "$WHEELS" -maxdepth 1 -iname '*.whl' \( -iname 'torch-*' -o -iname 'triton-*' \) 2>/dev/null)
    if [ -n "$bad" ]; then
        echo "refusing to install anything: $bad (the machine's own torch and triton must be used)" >&3
        record install refused 1 $((SECONDS - t0)) "" "a torch or triton wheel is in $WHEELS: remove it"
        return 1
    fi
    local missing  # wheels whose distribution is not installed (here, or in $SITE by an earlier command)
    missing=$("$PY" - "$WHEELS" 2>&3 <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = whl.name.split("-")[0]
    try:
        print(f"present: {name} {version(name)} (not installing {whl.name})", file=sys.stderr)
    except PackageNotFoundError:
        print(whl)
EOF
)
    if [ -z "$missing" ]; then
        # shellcheck disable=SC2086
        if "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
            $REQUIRED >&3 2>&1; then
            record install ok 0 $((SECONDS - t0)) "" "nothing to install: every package is already there"
            return 0
        fi
        echo "no wheel to install from $WHEELS, and not all of $REQUIRED are installed" >&3
        record install failed 1 $((SECONDS - t0)) "" "$REQUIRED not all installed and no wheels for them in $WHEELS: run scripts/gpu_wheels.sh where the tree is prepared"
        return 1
    fi
    mkdir -p "$SITE"
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" $missing >&3 2>&1; then
        record install failed 1 $((SECONDS - t0)) "" "pip install --target $SITE failed (see install.log)"
        return 1
    fi
    # shellcheck disable=SC2086
    echo "installed into $SITE:" $(basename -a $missing) >&3
    # shellcheck disable=SC2086
    if ! "$PY" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $REQUIRED >&3 2>&1; then
        record install failed 1 $((SECONDS - t0)) "" "installed, but $REQUIRED do not all import (see install.log)"
        return 1
    fi
    record install ok 0 $((SECONDS - t0)) "" "installed $(echo "$missing" | wc -l) wheels into $SITE"
}

# --------------------------------------------------------------------------- parts

tiny() {  # tiny DRY_ARGS -- GPU_ARGS: the arguments for this run's size
    local dry=() gpu=() seen=0
    for a in "$@"; do
        if [ "$a" = "--" ]; then seen=1; elif [ $seen = 0 ]; then dry+=("$a"); else gpu+=("$a"); fi
    done
    if [ "$DRY" = 1 ]; then ARGS=("${dry[@]}"); else ARGS=("${gpu[@]}"); fi
}

zero_cmd() {  # one GPU (or the CPU dry run): a plain process is rank 0; several: DeepSpeed's launcher
    local n
    n=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$DRY" != 1 ] && [ "${n:-0}" -gt 1 ]; then
        ZERO=("$PY" -m deepspeed.launcher.runner --num_gpus "$n" benchmarks/bench_zero.py)
    else
        ZERO=("$PY" benchmarks/bench_zero.py)
    fi
}

part() {
    local p=$1
    case $p in
    install) ;;  # done before the parts
    env)
        if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not on this machine"; fi \
            > "$OUT/nvidia-smi.txt" 2>&1
        run_part env 60 "$PY" benchmarks/gpu_report.py --env "$OUT/env.json" ;;
    tests)  # the GPU-only tests (CUDA-graph capture and replay, weight updates, shared pool) and the kernels
        local sel
        if [ -n "${FDFO_GPU_TESTS:-}" ]; then
            read -r -a sel <<< "$FDFO_GPU_TESTS"
        elif [ "$DRY" = 1 ]; then
            sel=(tests/test_graphs.py::test_graph_on_gpu)  # without CUDA they skip, and say why
        else
            sel=(tests/test_graphs.py tests/test_kernels.py tests/test_trajectories.py)
        fi
        run_part tests 150 "$PY" -m pytest "${sel[@]}" -v -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" ;;
    aot)
        tiny --arch 90 --res 512 --rows 2 -- --arch 90
        run_part aot 90 "$PY" -m fdfo.kernels.aot "${ARGS[@]}" --json "$OUT/aot.json" ;;
    kernels)
        tiny --small --no-compile -- --res 512 1024 --rows 6 --dtypes bf16 --rep-ms 100
        run_part kernels 150 "$PY" benchmarks/bench_kernels.py "${ARGS[@]}" --out "$OUT/kernels.json" ;;
    sampling_off | sampling_on)
        tiny --tiny --rows 2 --repeats 1 -- --rows 6 --repeats 1
        run_part "$p" 150 "$PY" benchmarks/bench_sampling.py --cfg "${p#sampling_}" "${ARGS[@]}" --out "$OUT/$p.json" ;;
    epoch)
        tiny --tiny --warmup-epochs 1 -- --pairs 6 --warmup-epochs 1
        run_part epoch 180 "$PY" benchmarks/bench_epoch.py "${ARGS[@]}" --out "$OUT/epoch.json" ;;
    levers)  # the large-model levers, each an epoch on top of the fast path: host trajectories, SDPA kernels
        tiny --tiny --warmup-epochs 1 --variants fast host sdpa_math -- \
            --pairs 6 --warmup-epochs 1 --variants fast host sdpa_flash sdpa_cudnn sdpa_efficient
        run_part levers 300 "$PY" benchmarks/bench_epoch.py "${ARGS[@]}" --out "$OUT/levers.json" ;;
    zero_lora | zero_full | zero_offload)
        local small=(--rows 2 --text-tokens 8 --steps 1 --warmup 0)
        zero_cmd
        case $p in
        # (FLUX.1 [dev] and SD3.5 Large at ZeRO-3 after SD3.5 Medium's stages; the dry run: the tiny FLUX)
        zero_lora) tiny --arch tiny flux-tiny:3 --stage 0 2 3 "${small[@]}" -- \
            --arch sd35-medium flux1-dev:3 sd35-large:3 --stage 0 2 3 --steps 5 --warmup 2 ;;
        zero_full) tiny --arch tiny "${small[@]}" --stage 3 --full -- --arch sd35-medium --stage 3 --full --steps 5 --warmup 2 ;;
        zero_offload) tiny --arch tiny "${small[@]}" --stage 3 --offload -- --arch sd35-large --stage 3 --offload --steps 3 --warmup 1 ;;
        esac
        rm -f "$OUT/$p.jsonl"
        local limit=90
        [ "$p" = zero_lora ] && limit=240  # (two 8-12 B models built and partitioned after SD3.5 Medium's three stages)
        [ "$p" = zero_offload ] && limit=420  # (includes building DeepSpeed's CPU Adam op on first use, slow on a busy machine)
        run_part "$p" "$limit" "${ZERO[@]}" "${ARGS[@]}" --out "$OUT/$p.jsonl" ;;
    esac
    report
}

echo "run_gpu: parts '$PARTS' into $OUT (budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', dry run: tiny sizes'))"
echo "{\"parts\": $(json_str "$PARTS"), \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"budget_s\": $BUDGET, \"started\": $(json_str "$(date -u +%FT%TZ)")}" > "$OUT/run.json"
: > "$OUT/status.jsonl"
install_wheels
report
for p in $PARTS; do
    part "$p"
done
report
echo "run_gpu: report in $OUT/gpu_report.md"
cat "$OUT/status.jsonl"
