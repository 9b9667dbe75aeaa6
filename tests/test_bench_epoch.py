"""benchmarks/bench_epoch.py runs end to end at tiny size on CPU: both variants report pairs/s."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_epoch_tiny_on_cpu(tmp_path):
    out = tmp_path / "epoch.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/bench_epoch.py", "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    by = {r["variant"]: r for r in report["variants"]}
    assert set(by) == {"fast", "published"}
    for r in by.values():
        assert r["pairs_per_s"] > 0 and r["sample_s"] > 0 and r["train_s"] > 0 and not r["skipped"]
    assert by["fast"]["kernels"] == "auto" and by["fast"]["cuda_graphs"] is True
    assert by["published"]["kernels"] == "torch" and by["published"]["cuda_graphs"] is False
    assert by["published"]["sampler"] == "sample_pairs+sync"
    assert report["speedup_fast_over_published"] > 0
    for r in by.values():  # transformer FLOPs per row: training (forward + backward) costs more than sampling
        assert r["sample_flops_per_row"] > 0 and 1.5 < r["train_flops_per_row"] / r["sample_flops_per_row"] < 3
        assert r["sample_tflops"] > 0 and r["train_tflops"] > 0
        assert r["peak_tflops"] is None and r["sample_mfu"] is None  # no peak for a CPU: no MFU claimed
    assert "fast / published" in proc.stdout
