#!/usr/bin/env bash
# Takes every GPU figure of benchmarks/RESULTS.md, in parts that each run in minutes.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [PART ...]
#
# PART: env tests aot kernels sampling epoch zero (default: all, in this order). Each part
# writes OUT_DIR/<part>*.log (and the benchmarks' JSON) and appends "<name> rc=<status>" to
# OUT_DIR/status.txt; a failing part does not stop the others. PYTHON (default: python) and
# DEEPSPEED (default: deepspeed) pick the interpreter and launcher, NGPU the GPUs for ZeRO.
set -u
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR [env tests aot kernels sampling epoch zero]}
shift
PY=${PYTHON:-python}
DS=${DEEPSPEED:-deepspeed}
NGPU=${NGPU:-$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")}
mkdir -p "$OUT"
PARTS=${*:-env tests aot kernels sampling epoch zero}

run() {  # run NAME CMD...: log to OUT/NAME.log, record the status, show the tail
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
    tail -n 30 "$OUT/$name.log"
}

for part in $PARTS; do
    case $part in
    env)
        run env $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
        (nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1 ;;
    tests)  # the GPU-only tests (CUDA-graph replay, weight updates, shared pool) and the kernels
        run tests $PY -m pytest tests/test_graphs.py tests/test_kernels.py -q -rs ;;
    aot)
        run aot $PY -m fdfo.kernels.aot --arch 90 --json "$OUT/aot.json" ;;
    kernels)
        run kernels $PY benchmarks/bench_kernels.py --out "$OUT/kernels.json" ;;
    sampling)
        run sampling_cfg_off $PY benchmarks/bench_sampling.py --cfg off --out "$OUT/sampling_cfg_off.json"
        run sampling_cfg_on $PY benchmarks/bench_sampling.py --cfg on --out "$OUT/sampling_cfg_on.json" ;;
    epoch)
        run epoch $PY benchmarks/bench_epoch.py --out "$OUT/epoch.json"
        run epoch_cfg $PY benchmarks/bench_epoch.py --guidance 4.5 --out "$OUT/epoch_cfg.json"
        run epoch_warm $PY benchmarks/bench_epoch.py --warmup-epochs 1 --out "$OUT/epoch_warm.json" ;;
    zero)
        run zero_medium $DS --num_gpus "$NGPU" benchmarks/bench_zero.py --arch sd35-medium --stage 0 2 3 \
            --out "$OUT/zero.jsonl"
        run zero_medium_full $DS --num_gpus "$NGPU" benchmarks/bench_zero.py --arch sd35-medium --stage 3 --full \
            --out "$OUT/zero.jsonl"
        run zero_large_offload $DS --num_gpus "$NGPU" benchmarks/bench_zero.py --arch sd35-large --stage 3 \
            --offload --out "$OUT/zero.jsonl" ;;
    *)
        echo "unknown part '$part' (env tests aot kernels sampling epoch zero)" >&2
        exit 2 ;;
    esac
done
