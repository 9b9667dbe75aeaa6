"""Trajectories in host memory (train.trajectory_device: host): the same values as on the device.

On a machine without CUDA host and device memory are one, but the host path still runs its own
code (chunked exchange, micro-batches served one run ahead); these tests hold it to the device
path bit for bit. The 2-rank case is in tests/test_distributed.py."""

import random

import pytest
import torch

from fdfo import distributed
from fdfo.trajectories import TrajectoryStore


def test_served_micro_batches_are_the_indexed_rows():
    g = torch.Generator().manual_seed(random.randrange(10**6))
    xs, vs = torch.randn(24, 3, 4, 4, generator=g), torch.randn(24, 3, 4, 4, generator=g)
    host, device = (TrajectoryStore(p, torch.device("cpu")) for p in ("host", "device"))
    serve_h, serve_d = host.server(xs, vs), device.server(xs, vs)
    for start in (0, 6, 12, 18, 5):  # consecutive micro-batches (read ahead), then a run out of order
        p = torch.arange(start, start + 6)
        for a, b in zip(serve_h(p), serve_d(p)):
            assert torch.equal(a, b)
    p = torch.randperm(24, generator=g)[:5]  # not a run: copied as indexed
    for a, b, t in zip(serve_h(p), serve_d(p), (xs, vs)):
        assert torch.equal(a, t[p]) and torch.equal(b, t[p])
    # the host store had at most the served micro-batch and the one read ahead: 2 × 6 rows of both tensors
    assert host.device_bytes == 2 * 2 * 6 * 3 * 4 * 4 * 4


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 1000])
def test_fetch_in_chunks_is_plain_indexing(chunk_rows):
    g = torch.Generator().manual_seed(random.randrange(10**6))
    x = torch.randn(30, 5, generator=g)
    rows = torch.randint(30, (41,), generator=g)
    assert not distributed.active()
    assert torch.equal(distributed.fetch_rows(x, rows, chunk_rows=chunk_rows, into=torch.device("cpu")), x[rows])


def test_an_unknown_trajectory_device_is_refused():
    from fdfo.errors import ConfigError
    from fdfo.settings import build_config

    with pytest.raises(ConfigError, match="train.trajectory_device.*device, host"):
        build_config({"train": {"trajectory_device": "disk"}})


@pytest.mark.parametrize("algorithm", ["fdfo", "flow_grpo"])
def test_host_trajectories_train_exactly_like_device_ones(tmp_path, tiny_pipeline_dir, digit_reward_dir, algorithm):
    from fdfo.trainer import Trainer
    from tests.test_train import QUIET, lora_weights, tiny_run

    seed = random.randrange(10**6)
    finals, logged = {}, {}
    for place in ("device", "host"):
        cfg = tiny_run(tmp_path / place, tiny_pipeline_dir, digit_reward_dir, **dict(
            QUIET, train={"epochs": 1, "seed": seed, "algorithm": algorithm, "trajectory_device": place,
                          "micro_batch_rows": 4 if algorithm == "fdfo" else 3},
            **({"flow_grpo": {"group_size": 2, "groups_per_epoch": 2, "kl_beta": 0.0}} if algorithm == "flow_grpo"
               else {})))
        t = Trainer(cfg)
        logged[place] = t.train_epoch(0)
        finals[place] = lora_weights(t)
    if not torch.cuda.is_available():  # (on a GPU, kernels with atomics differ run to run in the last bits)
        for k in finals["device"]:
            assert torch.equal(finals["host"][k], finals["device"][k]), k
        assert logged["host"]["loss"] == logged["device"]["loss"]
    else:
        for k in finals["device"]:
            torch.testing.assert_close(finals["host"][k], finals["device"][k], rtol=1e-4, atol=1e-6)
    assert logged["host"]["trajectory_mib"] == logged["device"]["trajectory_mib"]
    dev, host = logged["device"]["trajectory_device_mib"], logged["host"]["trajectory_device_mib"]
    assert dev == logged["device"]["trajectory_mib"] and 0 < host < dev  # a micro-batch's worth, not the epoch's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host memory and the copy stream")
def test_on_cuda_the_host_store_serves_the_rows_through_its_copy_stream():
    """Pinned epoch buffers, read-ahead copies on the side stream while the default stream computes: every
    served micro-batch equals the rows indexed on the device, also when the consumer's work is long."""
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(random.randrange(10**6))
    sampled = [torch.randn(16, 5, 8, 8, generator=g, device=device) for _ in range(4)]
    host = TrajectoryStore("host", device)
    buf = host.buffer(64)
    for t in sampled:
        host.keep((buf, t))
    xs = buf.tensor()
    assert xs.device.type == "cpu" and xs.is_pinned()
    reference = torch.cat(sampled)
    serve = host.server(xs)
    heavy = torch.randn(2048, 2048, device=device)
    for start in range(0, 64, 8):
        (got,) = serve(torch.arange(start, start + 8, device=device))
        for _ in range(20):  # keep the default stream busy while the next micro-batch is copied ahead
            heavy = torch.tanh(heavy @ heavy / 2048)
        assert got.device == device and torch.equal(got, reference[start:start + 8])
    assert host.device_bytes == max(16 * 5 * 8 * 8 * 4, 2 * 8 * 5 * 8 * 8 * 4)
