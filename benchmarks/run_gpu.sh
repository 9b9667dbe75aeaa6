#!/usr/bin/env bash
# Takes the GPU figures of benchmarks/RESULTS.md on one GPU machine, in commands of at most 280 s
# each (FDFO_GPU_BUDGET_S), each leaving at most three files in its OUT folder.
#
#   bash scripts/gpu_wheels.sh                  # here, first: .whl/ with the wheels that machine lacks
#   bash benchmarks/run_gpu.sh OUT quick        # there, first contact: env sampling train epoch
#   bash benchmarks/run_gpu.sh OUT levers       # the MFU levers: one epoch each, against today's path
#   bash benchmarks/run_gpu.sh OUT PART ...     # named parts (install env sampling train epoch levers
#                                               # tests aot kernels sampling_off sampling_on large_levers
#                                               # zero_lora zero_full zero_offload), in the order given
#   FDFO_GPU_DRY_RUN=1 bash benchmarks/run_gpu.sh OUT quick   # CPU: the same parts at tiny size (< 90 s)
#
# Output: OUT (new or empty: one folder per command) ends with at most three files, whenever the
# command stops: gpu_report.md (benchmarks/gpu_report.py: device, versions, date, a table per part,
# the status and log tail of each part that did not succeed), NAME.json (NAME: "quick", else the
# parts joined by "-"; the status line and every result of every part) and logs.tar.gz (the parts'
# logs). The parts write into a scratch folder outside OUT (the benchmarks rewrite their JSON as they
# measure); after every part, and when the command is stopped (TERM, INT, HUP), those three files are
# rewritten from it, so a part cut short by its limit, or a command stopped in mid-part, keeps what
# it measured. The scratch folder goes at the end.
#
# The working tree and .whl/ travel together (under 64 MiB). Every command first installs the
# wheels of .whl/ that the machine lacks into a temporary folder put on PYTHONPATH (never a torch or
# triton wheel: it refuses), then runs its parts in order. Each part has its own time limit
# (`timeout`), and the command as a whole keeps within FDFO_GPU_BUDGET_S (default 280 s, machine-side
# install included): a part gets at most what is left, one that would get under 20 s is skipped and
# says so, and a failing or timed-out part does not stop the others.
#
# quick, in order: env (imports of torch, triton, diffusers, deepspeed, transformers, peft and fdfo,
# versions, the device, a bf16 matmul), sampling (bench_train.py --phase sample: SD3.5 Medium, 512²,
# 6 rows, CFG off, 205 text tokens, 10 steps, eager / CUDA graph / graph + torch.compile, LoRA r32 and
# none), train (bench_train.py --phase train: one forward + backward, LoRA r32, 6 and 24 rows, eager
# and compiled), epoch (bench_epoch.py: 6 pairs, 10 steps, one warm-up epoch, the published formulation
# then the fast path). The later parts get what the earlier ones leave, up to their own limits, and
# each part takes its compiled figures last. Sizes are SD3.5 Medium at 512² (64×64 latents) on the
# GPU; the limits are estimates until the parts are timed there.
#
# levers: bench_epoch.py, one epoch each (6 pairs, 8 steps, 2 optimizer steps) after a warm-up epoch:
# baseline (today's path) and each MFU lever with its one setting changed (overlap, lora_bf16,
# rows_12, rows_24, compile), then fast (every default); each against baseline, in the same run.
#
# Environment: PYTHON (default python3, else python), FDFO_WHEELS (default .whl), FDFO_GPU_SITE
# (where the wheels go; default $TMPDIR/fdfo-gpu-site), FDFO_GPU_REQUIRED (the modules that must
# import; default diffusers deepspeed pydantic hjson), FDFO_GPU_BUDGET_S, FDFO_GPU_MAX_PART_S (a
# cap on every part's limit), FDFO_GPU_TESTS (the pytest selection of the tests part),
# FDFO_GPU_DRY_RUN=1 (tiny sizes, runs without CUDA: what needs CUDA is skipped by the benchmarks
# themselves, with the reason in their JSON; torch.compile is not timed on CPU, and bench_epoch's
# compile lever runs there with torch.compile's aot_eager backend: the plumbing, no speed).
set -u
usage="usage: bash benchmarks/run_gpu.sh OUT_DIR {quick|PART...}"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

QUICK="env sampling train epoch"
ALL_PARTS="install env sampling train epoch levers tests aot kernels sampling_off sampling_on large_levers zero_lora zero_full zero_offload"
case "$1" in
quick) PARTS=$QUICK LABEL=quick ;;
*) PARTS="$*" LABEL=$(echo "$*" | tr ' ' '-') ;;
esac
for part in $PARTS; do
    case " $ALL_PARTS " in
    *" $part "*) ;;
    *) echo "unknown part '$part' (parts: $ALL_PARTS; group: quick)" >&2; exit 2 ;;
    esac
done
if [ -n "$(ls -A "$OUT")" ]; then
    echo "$OUT is not empty: give each command a new or empty folder (gpu_report.py merges folders)" >&2
    exit 2
fi

PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY=${FDFO_GPU_DRY_RUN:-0}
BUDGET=${FDFO_GPU_BUDGET_S:-280}
WHEELS=${FDFO_WHEELS:-$ROOT/.whl}
SITE=${FDFO_GPU_SITE:-${TMPDIR:-/tmp}/fdfo-gpu-site}
REQUIRED=${FDFO_GPU_REQUIRED:-diffusers deepspeed pydantic hjson}
MAX_PART=${FDFO_GPU_MAX_PART_S:-}  # a cap on every part's limit (empty: none)
RESERVE=8    # seconds kept for the last bundle and report
MIN_PART=20  # a part that would get less than this is skipped
DEADLINE=$((SECONDS + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fdfo-gpu-run.XXXXXX") || exit 2  # the parts' loose files, outside OUT
unset TRITON_INTERPRET  # compiled Triton on the GPU; the CPU smoke runs set it where they need it
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The Python's own tools first (ninja, for DeepSpeed's JIT-built ops), as tests/conftest.py has them: two ninja
# versions hash the build command differently, and each would rebuild the ops the other built.
PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"  # (absolute: ninja runs in the build folder)
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
    cmd=${cmd//"$WORK"/WORK}
    printf '{"part": %s, "status": %s, "rc": %s, "seconds": %s, "limit_s": %s, "reason": %s, "command": %s, "log": %s}\n' \
        "$(json_str "$part")" "$(json_str "$status")" "${rc:-null}" "$secs" "${limit:-null}" "$(json_str "$reason")" \
        "$(json_str "$cmd")" "$(json_str "$part.log")" >> "$WORK/status.jsonl"
    echo "== $part: $status${reason:+ ($reason)} in ${secs}s"
}

bundle() {  # OUT's three files from the scratch folder: NAME.json, logs.tar.gz, gpu_report.md
    "$PY" benchmarks/gpu_report.py --bundle "$WORK" "$OUT" --name "$LABEL" > /dev/null 2>> "$WORK/gpu_report.log" \
        || echo "(gpu_report.py --bundle failed: see gpu_report.log in $OUT/logs.tar.gz)"
}

PART_PID="" CURRENT="" PART_T0=0
stop() {  # the command is stopped: end the running part, keep what it measured, leave the three files
    trap - TERM INT HUP
    if [ -n "$PART_PID" ]; then
        kill -TERM "$PART_PID" 2> /dev/null
        wait "$PART_PID" 2> /dev/null
        clear_locks "$CURRENT"
        record "$CURRENT" interrupted "" $((SECONDS - PART_T0)) "" "the command was stopped during this part"
    fi
    bundle
    rm -rf "$WORK"
    echo "run_gpu: stopped; what was measured is in $OUT"
    exit 130
}
trap stop TERM INT HUP

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
    PART_T0=$SECONDS CURRENT=$part
    touch "$WORK/.$part.start"
    local rc
    # in the background, so that a TERM to this script is handled at once (stop), not after the part;
    # the three files are rewritten every 30 s meanwhile, so even a KILL of this script leaves them recent
    timeout -k 10 "$limit" "$@" > "$WORK/$part.log" 2>&1 < /dev/null &
    PART_PID=$!
    local ticks=0
    while kill -0 "$PART_PID" 2> /dev/null; do
        sleep 1 &
        wait $!
        ticks=$((ticks + 1))
        [ $((ticks % 30)) = 0 ] && bundle
    done
    wait "$PART_PID"
    rc=$?
    PART_PID=""
    local status=ok reason=""
    case $rc in
    0) ;;
    124 | 137) status=timeout reason="killed after ${limit}s" ;;
    *) status=failed reason="exit code $rc" ;;
    esac
    [ "$status" = timeout ] && clear_locks "$part"
    record "$part" "$status" "$rc" $((SECONDS - PART_T0)) "$limit" "$reason" "$@"
    tail -n 12 "$WORK/$part.log" | sed 's/^/   | /'
}

clear_locks() {  # clear_locks PART: the JIT-extension build locks a killed part left (GPU machine only)
    # torch.utils.cpp_extension takes a lock file for every load of a JIT-built op (DeepSpeed's CPU Adam, its
    # shared-memory comm) and waits forever while one exists: a part killed while holding it would hang every
    # later one. The benchmarks release it on TERM; this catches a KILL. Not in the dry run: a shared machine's
    # other users take these locks too.
    [ "$DRY" = 1 ] && return 0
    local ext=${TORCH_EXTENSIONS_DIR:-${HOME:-}/.cache/torch_extensions}
    [ -d "$ext" ] || return 0
    find "$ext" -name lock -newer "$WORK/.$1.start" -print -delete 2> /dev/null \
        | sed 's/^/run_gpu.sh: removed the build lock a killed part left: /' >> "$WORK/$1.log"
}

# --------------------------------------------------------------------------- install

install_wheels() {  # the wheels of $WHEELS whose distributions this Python lacks, into $SITE
    local t0=$SECONDS
    exec 3>> "$WORK/install.log"
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

# The MFU levers of bench_epoch.py, each one lever on top of "baseline" (today's path); fast = every default.
LEVERS="baseline overlap lora_bf16 rows_12 rows_24 compile fast"

part() {
    local p=$1
    case $p in
    install) ;;  # done before the parts
    env)
        if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not on this machine"; fi \
            > "$WORK/nvidia-smi.txt" 2>&1
        run_part env 45 "$PY" benchmarks/gpu_report.py --env "$WORK/env.json" ;;
    sampling)  # quick (b): one micro-batch of paired sampling, LoRA r32 and none, eager / graph / graph + compile
        tiny --arch tiny --rows 2 --steps 3 --text-tokens 8 --lora 4 0 -- \
            --arch sd35-medium --rows 6 --steps 10 --text-tokens 205 --lora 32 0
        run_part sampling 80 "$PY" benchmarks/bench_train.py --phase sample "${ARGS[@]}" --out "$WORK/sampling.json" ;;
    train)  # quick (c): one training micro-batch (forward + backward), LoRA r32, eager and compiled
        tiny --arch tiny --rows 2 4 --text-tokens 8 --lora 4 -- --arch sd35-medium --rows 6 24 --text-tokens 205 --lora 32
        run_part train 70 "$PY" benchmarks/bench_train.py --phase train "${ARGS[@]}" --out "$WORK/train.json" ;;
    epoch)  # quick (d): one short epoch after a warm-up epoch, the fast path against the published formulation
        # (published first: the fast path compiles the transformer in its warm-up epoch, the longest wait)
        tiny --tiny --warmup-epochs 1 --variants published fast -- --pairs 6 --steps 10 --warmup-epochs 1 --variants published fast
        run_part epoch 240 "$PY" benchmarks/bench_epoch.py "${ARGS[@]}" --out "$WORK/epoch.json" ;;
    levers)  # each MFU lever against today's path (baseline), one epoch each after a warm-up epoch
        # shellcheck disable=SC2086
        tiny --tiny --pairs 6 --steps 4 --optimizer-steps 1 --warmup-epochs 1 --variants $LEVERS -- \
            --pairs 6 --steps 8 --optimizer-steps 2 --warmup-epochs 1 --variants $LEVERS
        run_part levers 270 "$PY" benchmarks/bench_epoch.py "${ARGS[@]}" --out "$WORK/levers.json" ;;
    tests)  # the GPU-only tests (CUDA-graph capture and replay, weight updates, shared pool) and the kernels
        local sel
        if [ -n "${FDFO_GPU_TESTS:-}" ]; then
            read -r -a sel <<< "$FDFO_GPU_TESTS"
        elif [ "$DRY" = 1 ]; then
            sel=(tests/test_graphs.py::test_graph_on_gpu)  # without CUDA they skip, and say why
        else
            sel=(tests/test_graphs.py tests/test_kernels.py tests/test_trajectories.py)
        fi
        run_part tests 200 "$PY" -m pytest "${sel[@]}" -v -rs -p no:cacheprovider --junitxml="$WORK/tests.xml" ;;
    aot)
        tiny --arch 90 --res 512 --rows 2 -- --arch 90
        run_part aot 90 "$PY" -m fdfo.kernels.aot "${ARGS[@]}" --json "$WORK/aot.json" ;;
    kernels)
        tiny --small --no-compile -- --res 512 1024 --rows 6 --dtypes bf16 --rep-ms 100
        run_part kernels 200 "$PY" benchmarks/bench_kernels.py "${ARGS[@]}" --out "$WORK/kernels.json" ;;
    sampling_off | sampling_on)
        tiny --tiny --rows 2 --repeats 1 -- --rows 6 --repeats 1
        run_part "$p" 200 "$PY" benchmarks/bench_sampling.py --cfg "${p#sampling_}" "${ARGS[@]}" --out "$WORK/$p.json" ;;
    large_levers)  # the large-model levers, each an epoch on the fast path (uncompiled: five compilations would
        # not fit one command): host trajectories, SDPA kernels
        tiny --tiny --warmup-epochs 1 --set model.compile=false --variants fast host sdpa_math -- \
            --pairs 6 --steps 20 --warmup-epochs 1 --set model.compile=false \
            --variants fast host sdpa_flash sdpa_cudnn sdpa_efficient
        run_part large_levers 270 "$PY" benchmarks/bench_epoch.py "${ARGS[@]}" --out "$WORK/large_levers.json" ;;
    zero_lora | zero_full | zero_offload)
        local small=(--rows 2 --text-tokens 8 --steps 1 --warmup 0)
        zero_cmd
        case $p in
        # (FLUX.1 [dev] and SD3.5 Large at ZeRO-3 after SD3.5 Medium's stages; the dry run: the tiny FLUX)
        zero_lora) tiny --arch tiny flux-tiny:3 --stage 0 2 3 "${small[@]}" -- \
            --arch sd35-medium flux1-dev:3 sd35-large:3 --stage 0 2 3 --steps 5 --warmup 2 ;;
        zero_full) tiny --arch tiny "${small[@]}" --stage 3 --full -- --arch sd35-medium --stage 3 --full --steps 5 --warmup 2 ;;
        zero_offload) tiny --arch tiny "${small[@]}" --stage 3 --offload -- --arch sd35-large --stage 3 --offload --steps 2 --warmup 1 ;;
        esac
        local limit=120
        [ "$p" = zero_lora ] && limit=240  # (two 8-12 B models built and partitioned after SD3.5 Medium's three stages)
        [ "$p" = zero_offload ] && limit=270  # (includes building DeepSpeed's CPU Adam op on first use, about a minute)
        run_part "$p" "$limit" "${ZERO[@]}" "${ARGS[@]}" --out "$WORK/$p.jsonl" ;;
    esac
    bundle
}

STARTED=$(date -u +%FT%TZ)
write_run() {  # WORK/run.json: what this command runs; with an argument, its seconds when it ended
    printf '{"parts": %s, "label": %s, "dry_run": %s, "budget_s": %s, "started": %s, "seconds": %s}\n' \
        "$(json_str "$PARTS")" "$(json_str "$LABEL")" "$([ "$DRY" = 1 ] && echo true || echo false)" "$BUDGET" \
        "$(json_str "$STARTED")" "${1:-null}" > "$WORK/run.json"
}

echo "run_gpu: parts '$PARTS' into $OUT as $LABEL.json, logs.tar.gz, gpu_report.md (budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', dry run: tiny sizes'))"
write_run
: > "$WORK/status.jsonl"
install_wheels
bundle
for p in $PARTS; do
    part "$p"
done
write_run "$SECONDS"
bundle
trap - TERM INT HUP
rm -rf "$WORK"
echo "run_gpu: done in ${SECONDS}s; $(ls "$OUT" | tr '\n' ' ')in $OUT"
