"""The GPU benchmark scripts run end to end at tiny size on CPU, so they are known to work."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_zero_tiny_on_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "zero.jsonl"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "1", "--master_port", port,
         "benchmarks/bench_zero.py", "--arch", "tiny", "--stage", "0", "3", "--offload", "--steps", "2",
         "--warmup", "1", "--rows", "2", "--text-tokens", "8", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["stage"], r["offload"]) for r in rows] == [(0, False), (3, True)]
    assert all(r["samples_per_s"] > 0 and r["step_s"] > 0 for r in rows)
