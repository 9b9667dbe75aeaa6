"""fdfo.distributed: reductions, gathers, "rank 0 first" and the shared-memory clean-up, on real ranks.

Two gloo ranks are two processes on this machine (no DeepSpeed needed for the helpers);
the clean-up test starts DeepSpeed's CPU backend the way its launcher does.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from fdfo import distributed

    distributed.init(deepspeed=False)
    rank, out = distributed.rank(), sys.argv[1]
    result = {"world": distributed.world_size()}
    result["sum"] = distributed.sum_over_ranks([1.0, float(rank)])
    result["mean"] = distributed.mean_over_ranks({"a": float(rank), "b": 2.0 * rank})
    result["rows"] = distributed.gather_rows(torch.full((2, 3), float(rank))).sum(1).tolist()
    # rank 0 builds, the others find it built
    with distributed.rank0_first():
        marker = os.path.join(out, "asset")
        if rank == 0:
            time.sleep(0.5)
            open(marker, "w").write("built")
        result["saw_asset"] = os.path.exists(marker)
    # a failure on rank 0 reaches the other ranks instead of leaving them at a barrier
    try:
        with distributed.rank0_first():
            if rank == 0:
                raise FileNotFoundError("no weights at /nowhere")
        result["error"] = None
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    json.dump(result, open(os.path.join(out, f"rank{rank}.json"), "w"))
    distributed.close()
""")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_helpers_on_two_ranks(tmp_path):
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=dict(
        os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r in (r0, r1):
        assert r["world"] == 2
        assert r["sum"] == [2.0, 1.0]
        assert r["mean"] == {"a": 0.5, "b": 1.0}
        assert r["rows"] == [0.0, 0.0, 3.0, 3.0]  # rank order: rank 0's rows, then rank 1's
        assert r["saw_asset"] is True
    assert r0["error"] == "FileNotFoundError: no weights at /nowhere"
    assert r1["error"].startswith("RuntimeError: rank 0 failed") and "no weights at /nowhere" in r1["error"]


def test_helpers_without_a_process_group():
    import torch

    from fdfo import distributed

    assert distributed.sum_over_ranks([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.mean_over_ranks({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}
    x = torch.randn(3, 2)
    assert distributed.gather_rows(x) is x
    ran = []
    with distributed.rank0_first():
        ran.append(distributed.rank())
    assert ran == [0]
    with pytest.raises(KeyError):  # the block's own error, unchanged
        with distributed.rank0_first():
            raise KeyError("x")


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_deepspeed_cpu_shared_memory_buffer_is_removed_at_exit():
    """DeepSpeed's CPU all-reduce creates /dev/shm/deepspeed_allreduce_buffer_* per rank (when its
    launcher sets LOCAL_SIZE) and never removes it; a process that joined through fdfo does."""
    port = _port()
    buffer = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
    code = ("from pathlib import Path; from fdfo import distributed; distributed.init(); "
            f"assert Path('{buffer}').exists(), 'DeepSpeed made no buffer: this test checks nothing'")
    env = dict(os.environ, LOCAL_SIZE="1", MASTER_PORT=port, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not buffer.exists()


FETCH_WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from fdfo import distributed

    distributed.init(deepspeed=False)
    rank, world, out = distributed.rank(), distributed.world_size(), sys.argv[1]
    seed = int(sys.argv[2])
    g = torch.Generator().manual_seed(seed * 100 + rank)  # each rank's own rows and requests
    x = torch.randn(5, 3, 2, generator=g)
    ok = []
    for n in (0, 1, 7, 40):  # nothing, one row, fewer than the rows, repeats (more than the rows)
        rows = torch.randint(5 * world, (n,), generator=g)
        got = distributed.fetch_rows(x, rows)
        ok.append(torch.equal(got, distributed.gather_rows(x)[rows]))
        # in rounds of 3 rows, each rank asking for a different number (host-memory trajectories)
        rows = torch.randint(5 * world, (n + rank,), generator=g)
        got = distributed.fetch_rows(x, rows, into=torch.device("cpu"), chunk_rows=3)
        ok.append(torch.equal(got, distributed.gather_rows(x)[rows]))
    json.dump(ok, open(os.path.join(out, f"fetch{rank}.json"), "w"))
    distributed.close()
""")


@pytest.mark.parametrize("world", [2, 4])
def test_fetch_rows_is_the_gathered_rows_bit_for_bit(tmp_path, world):
    """Each rank asks for its own random rows (empty, repeated, any owner): it gets exactly what indexing
    the full all-gather would give, while only those rows travel; also when the rows move in rounds."""
    import json
    import random

    script = tmp_path / "fetch.py"
    script.write_text(FETCH_WORKER)
    port = _port()
    seed = random.randrange(10**6)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(seed)], cwd=ROOT, env=dict(
        os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), stderr=subprocess.PIPE, text=True)
        for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    for r in range(world):
        assert json.loads((tmp_path / f"fetch{r}.json").read_text()) == [True] * 8, r
