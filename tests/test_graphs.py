"""The CUDA-graph sampler (fdfo.graphs), its eager twin, GPU statistics and the sampling benchmark.

CPU: the eager twin is ``sample_pairs`` exactly, given the same noise (PyTorch kernels) and
within float rounding with the Triton kernels (interpreter); the fallback says why once;
GPU statistics degrade to {} without NVML; the benchmark runs end to end at tiny size.

GPU (skipped without CUDA): graph replay is bit-identical to the eager twin; in-place
weight updates are seen by the captured graph (and moved weights are re-captured); graphs
share one memory pool. They run in a subprocess without TRITON_INTERPRET, which
tests/conftest.py sets for the whole session (the interpreter cannot be captured).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fdfo import gpu_stats, kernels, sampling
from fdfo.graphs import GraphSampler
from fdfo.models.base import Conditioning
from fdfo.sampling import churn_schedule, sample_pairs

ROOT = Path(__file__).resolve().parents[1]


class TinyVelocity(nn.Module):
    """A per-pixel MLP of (x, σ, mean text embedding, pooled): deterministic, matmul-backed."""

    def __init__(self, channels: int = 4, embed_dim: int = 8, pooled_dim: int = 6, hidden: int = 32):
        super().__init__()
        self.inp = nn.Linear(channels + 1 + embed_dim + pooled_dim, hidden)
        self.out = nn.Linear(hidden, channels)

    def forward(self, x, sigma, cond):
        B, _, H, W = x.shape
        w = self.inp.weight
        ctx = torch.cat([sigma.reshape(B, 1).to(w.dtype), cond.embeds.to(w.dtype).mean(1), cond.pooled.to(w.dtype)], 1)
        h = torch.cat([x.to(w.dtype).permute(0, 2, 3, 1), ctx[:, None, None, :].expand(B, H, W, -1)], -1)
        return self.out(torch.tanh(self.inp(h))).permute(0, 3, 1, 2).float()


def _inputs(P: int, T: int, device="cpu", seed: int = 0, side: int = 4, weight: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(P, 4, side, side, generator=g).to(device)
    cond = Conditioning(torch.randn(2 * P, 5, 8, generator=g).to(device), torch.randn(2 * P, 6, generator=g).to(device))
    uncond = Conditioning(torch.randn(1, 5, 8, generator=g).to(device), torch.randn(1, 6, generator=g).to(device))
    sigmas = torch.linspace(1.0, 0.0, T + 1)
    g_prior, g_steps = churn_schedule("raw", weight, sigmas, 2 * P)
    g_steps[0] *= torch.linspace(0.5, 1.5, 2 * P, dtype=torch.float64)  # per-row γ, to catch row mix-ups
    return latents, cond, uncond, sigmas, g_prior, g_steps


def _velocity_closure(net, cond, uncond, guidance):
    """What Policy.velocity_fn gives sample_pairs: model.velocity's CFG on the [uncond; cond] batch."""
    rows = len(cond)

    def velocity(x, t):
        if guidance == 1.0:
            return net(x, t, cond)
        both = Conditioning.cat([uncond.expand(rows), cond])
        v_u, v_c = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return velocity


class _OffsetNoise:
    """Stands in for ``torch`` inside fdfo.sampling: its i-th randn is churn_noise(seed, offset=i)."""

    def __init__(self, seed: int, backend: str):
        self.seed, self.backend, self.calls = seed, backend, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, shape, generator=None, device=None, dtype=None):
        noise = kernels.churn_noise(shape, self.seed, self.calls, device=device, dtype=dtype, backend=self.backend)
        self.calls += 1
        return noise


def _reference(monkeypatch, net, latents, cond, uncond, guidance, sigmas, g_prior, g_steps, seed, backend,
               store_dtype=None):
    fake = _OffsetNoise(seed, backend)
    with monkeypatch.context() as m:
        m.setattr(sampling, "torch", fake)
        traj = sample_pairs(_velocity_closure(net, cond, uncond, guidance), latents, sigmas, g_prior, g_steps, None,
                            store_dtype=store_dtype)
    assert fake.calls == sigmas.numel()  # the prior and every step drew noise
    return traj


# --------------------------------------------------------------------------- CPU: the eager twin


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("store_dtype", [None, torch.bfloat16])
def test_eager_twin_is_sample_pairs_given_the_same_noise(monkeypatch, guidance, store_dtype):
    torch.manual_seed(0)
    net = TinyVelocity()
    latents, cond, uncond, sigmas, g_prior, g_steps = _inputs(P=2, T=4)
    sampler = GraphSampler(net, guidance_scale=guidance, uncond=uncond, store_dtype=store_dtype, backend="torch",
                           module=net, log=lambda msg: None)
    for seed in (7, 8):  # a second micro-batch through the same static buffers
        got = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=seed)
        ref = _reference(monkeypatch, net, latents, cond, uncond, guidance, sigmas, g_prior, g_steps, seed, "torch",
                         store_dtype)
        for name in ("xs", "vs", "x0"):
            a, b = getattr(got, name), getattr(ref, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name}: max |Δ| = {(a.float() - b.float()).abs().max()}"
    assert not torch.equal(got.x0[0::2], got.x0[1::2])  # the churn drove the two rows of each pair apart


def test_eager_twin_partial_micro_batch_and_fresh_outputs():
    """A smaller last micro-batch gets its own buffers; returned tensors are not the reused buffers."""
    net = TinyVelocity()
    sampler = GraphSampler(net, backend="torch", log=lambda msg: None)
    latents, cond, _, sigmas, g_prior, g_steps = _inputs(P=2, T=3)
    small = _inputs(P=1, T=3)
    a = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=1)
    b = sampler.sample(small[0], small[1], *small[3:], seed=1)
    a2 = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=2)
    assert b.xs.shape == (2, 3, 4, 4, 4) and a.xs.shape == (4, 3, 4, 4, 4)
    assert not torch.equal(a.x0, a2.x0)  # a's tensors were not overwritten by the later call
    assert len(sampler._buffers) == 2


def test_eager_twin_with_triton_kernels_matches_sample_pairs(monkeypatch):
    """The Triton churn kernel (interpreter on CPU) with seed/offset in tensors: same trajectories up to rounding."""
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    if not kernels.triton_interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1: its kernels cannot run on CPU tensors")
    net = TinyVelocity()
    latents, cond, uncond, sigmas, g_prior, g_steps = _inputs(P=1, T=2, side=4)
    sampler = GraphSampler(net, guidance_scale=2.0, uncond=uncond, backend="triton", log=lambda msg: None)
    got = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=3)
    ref = _reference(monkeypatch, net, latents, cond, uncond, 2.0, sigmas, g_prior, g_steps, 3, "triton")
    for name in ("xs", "vs", "x0"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-5)


def test_fallback_is_said_once_with_the_reason():
    net = TinyVelocity()
    latents, cond, _, sigmas, g_prior, g_steps = _inputs(P=1, T=2)
    sampler = GraphSampler(net, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=seed)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "CUDA" in messages[0] and "cpu" in messages[0], messages
    assert sampler.mode == "eager" and "CUDA" in sampler.fallback_reason and sampler.captures == 0

    said = []
    off = GraphSampler(net, backend="torch", graphs=False, log=said.append)
    for seed in range(2):
        off.sample(latents, cond, sigmas, g_prior, g_steps, seed=seed)
    assert len(said) == 1 and "graphs=False" in said[0]
    assert off.prepare(latents, cond, sigmas) == "eager" and len(said) == 1


def test_arguments_are_checked():
    net = TinyVelocity()
    with pytest.raises(ValueError, match="uncond"):
        GraphSampler(net, guidance_scale=4.0)
    latents, cond, _, sigmas, g_prior, g_steps = _inputs(P=2, T=2)
    with pytest.raises(ValueError, match="rows"):
        GraphSampler(net, backend="torch", log=lambda m: None).sample(latents, cond[:2], sigmas, g_prior, g_steps, 0)


def test_backend_is_chosen_per_sampler_and_passed_through_for_model():
    """GraphSampler's backend defaults to "auto", is checked up front, and for_model passes it on:
    the two backends draw different noise, so the sample says which one ran."""
    net = TinyVelocity()
    assert GraphSampler(net).backend == "auto"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        GraphSampler(net, backend="cuda")
    if not kernels.triton_interpreted():
        pytest.skip("the Triton kernels cannot run on CPU tensors here (no triton, or no TRITON_INTERPRET=1)")
    model = types.SimpleNamespace(inference_transformer=None, transformer=net,
                                  velocity=lambda x, sigma, cond, net: net(x, sigma, cond))
    seed = secrets.randbits(30)
    print(f"input seed: {seed}")
    latents, cond, _, sigmas, g_prior, g_steps = _inputs(P=1, T=2, seed=seed)
    x0 = {}
    for backend in ("torch", "triton"):
        direct = GraphSampler(net, backend=backend, log=lambda m: None)
        via_model = GraphSampler.for_model(model, backend=backend, log=lambda m: None)
        assert via_model.backend == backend and via_model.module is net
        x0[backend] = direct.sample(latents, cond, sigmas, g_prior, g_steps, seed=4).x0
        assert torch.equal(via_model.sample(latents, cond, sigmas, g_prior, g_steps, seed=4).x0, x0[backend])
    assert not torch.equal(x0["torch"], x0["triton"])


def test_weights_signature_follows_moved_parameters():
    net = TinyVelocity()
    sampler = GraphSampler(net, module=net)
    before = sampler._weights_signature()
    with torch.no_grad():
        net.out.weight.mul_(2.0)  # in place: the same addresses, a captured graph sees the new values
    assert sampler._weights_signature() == before
    net.out.weight.data = net.out.weight.data.clone()  # moved: graphs must be captured again
    assert sampler._weights_signature() != before


# --------------------------------------------------------------------------- CPU: GPU statistics


@pytest.fixture
def fresh_nvml(monkeypatch):
    monkeypatch.setattr(gpu_stats, "_nvml", None)
    monkeypatch.setattr(gpu_stats, "_nvml_reason", "")


def test_gpu_stats_empty_without_nvml_and_tried_once(fresh_nvml, monkeypatch):
    class NVMLError_LibraryNotFound(Exception):
        pass

    fake = types.ModuleType("pynvml")
    fake.calls = 0

    def nvmlInit():
        fake.calls += 1
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    fake.nvmlInit = nvmlInit
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for _ in range(3):
        stats = gpu_stats.GpuStats("cuda:0")
        stats.begin()
        assert stats.end() == {} and not stats.enabled
    assert fake.calls == 1
    assert "LibraryNotFound" in gpu_stats.nvml_unavailable_reason()
    assert gpu_stats.GpuStats("cpu").end() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this CPU machine's real pynvml, whose nvmlInit fails")
def test_gpu_stats_real_pynvml_without_a_driver(fresh_nvml):
    pytest.importorskip("pynvml")
    assert gpu_stats.nvml() is None and gpu_stats.nvml() is None
    stats = gpu_stats.GpuStats()
    stats.begin()
    assert stats.end() == {}


def test_gpu_stats_figures_from_nvml(fresh_nvml, monkeypatch):
    """With a (fake) NVML: utilisation from the samples taken since begin(), power from the energy counter."""
    fake = types.ModuleType("pynvml")
    fake.NVML_GPU_UTILIZATION_SAMPLES, fake.NVML_MEMORY_UTILIZATION_SAMPLES = 1, 2
    fake.energy_mj = 5_000_000
    fake.nvmlInit = lambda: None

    def no_bus_id(bus_id):
        raise RuntimeError("unknown bus id")

    def samples(handle, kind, since):
        values = {1: [90, 70], 2: [40, 20]}[kind]
        old = types.SimpleNamespace(timeStamp=since - 10, sampleValue=types.SimpleNamespace(uiVal=0))
        return 1, [old] + [types.SimpleNamespace(timeStamp=since + 1 + i, sampleValue=types.SimpleNamespace(uiVal=v))
                           for i, v in enumerate(values)]

    def energy(handle):
        fake.energy_mj += 300_000  # 300 J between the two reads
        return fake.energy_mj

    fake.nvmlDeviceGetHandleByPciBusId = no_bus_id
    fake.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    fake.nvmlDeviceGetSamples = samples
    fake.nvmlDeviceGetTotalEnergyConsumption = energy
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    stats = gpu_stats.GpuStats("cuda:0")
    assert stats.enabled and stats.handle == ("gpu", 0)
    stats.begin()
    out = stats.end()
    assert out["gpu/util_pct"] == 80.0 and out["gpu/mem_bw_util_pct"] == 30.0
    assert out["gpu/mem_used_gib"] == 3.0 and out["gpu/mem_total_gib"] == 80.0
    assert out["gpu/energy_kj"] == pytest.approx(0.3) and out["gpu/power_w"] > 0


# --------------------------------------------------------------------------- CPU: the benchmark script


def test_bench_sampling_tiny_on_cpu(tmp_path):
    out = tmp_path / "sampling.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # on a GPU: compiled, capturable Triton
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "benchmarks/bench_sampling.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    timed = [r for r in data["results"] if "images_per_s" in r]
    assert {(r["cfg"], r["rows"], r["variant"]) for r in timed} >= {
        (cfg, rows, v) for cfg in (False, True) for rows in (2, 4) for v in ("published", "eager")}
    assert all(r["images_per_s"] > 0 and r["flops_per_step"] > 0 and r["tflops"] > 0 for r in timed)
    if not torch.cuda.is_available():  # no peak for a CPU: no MFU claimed
        assert all(r["mfu"] is None and r["peak_tflops"] is None for r in timed)
    if not torch.cuda.is_available():
        assert all("CUDA" in r["skipped"] for r in data["results"] if r["variant"] == "graph")
        assert "skipped (CUDA graphs need a CUDA device)" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(" on    4")  # the table comes last


# --------------------------------------------------------------------------- GPU (in a subprocess)


def _gpu_setup(P=2, T=5, guidance=1.0, dtype=torch.float32, seed=0):
    net = TinyVelocity().cuda().to(dtype)
    latents, cond, uncond, sigmas, g_prior, g_steps = _inputs(P, T, device="cuda", seed=seed, side=8)
    cond = Conditioning(cond.embeds.to(dtype), cond.pooled.to(dtype))
    return net, latents, cond, uncond, sigmas, g_prior, g_steps


def _assert_same(a, b, what):
    for name in ("xs", "vs", "x0"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{what}: {name} differs, max |Δ| = {(x.float() - y.float()).abs().max()}"


def _check_replay_equals_eager():
    for guidance in (1.0, 4.5):
        for dtype, store in ((torch.float32, None), (torch.bfloat16, torch.bfloat16)):
            net, latents, cond, uncond, sigmas, g_prior, g_steps = _gpu_setup(guidance=guidance, dtype=dtype)
            graph = GraphSampler(net, guidance_scale=guidance, uncond=uncond, store_dtype=store, module=net)
            eager = GraphSampler(net, guidance_scale=guidance, uncond=uncond, store_dtype=store, graphs=False,
                                 log=lambda m: None)
            for seed in (11, 12):
                a = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=seed)
                b = eager.sample(latents, cond, sigmas, g_prior, g_steps, seed=seed)
                assert graph.mode == "graph", graph.fallback_reason
                _assert_same(a, b, f"guidance={guidance} dtype={dtype} seed={seed}")
            assert graph.captures == 1
            assert torch.isfinite(a.x0).all() and not torch.equal(a.x0[0::2], a.x0[1::2])


def _check_weight_update_seen():
    net, latents, cond, uncond, sigmas, g_prior, g_steps = _gpu_setup()
    graph = GraphSampler(net, module=net)
    eager = GraphSampler(net, graphs=False, log=lambda m: None)
    before = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=5)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)  # an optimizer step updates the weights in place
    loss = net(torch.randn(2, 4, 8, 8, device="cuda"), torch.rand(2, device="cuda"), cond[:2]).pow(2).mean()
    loss.backward()
    opt.step()
    after = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=5)
    assert graph.captures == 1 and graph.mode == "graph"
    assert not torch.equal(before.x0, after.x0), "the graph did not see the new weights"
    _assert_same(after, eager.sample(latents, cond, sigmas, g_prior, g_steps, seed=5), "after an optimizer step")
    with torch.no_grad():  # weights moved to new memory (as a ZeRO-3 gather does): captured again
        net.out.weight.data = net.out.weight.data * 1.5
    moved = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=5)
    assert graph.captures == 2
    _assert_same(moved, eager.sample(latents, cond, sigmas, g_prior, g_steps, seed=5), "after the weights moved")


def _check_pool_shared():
    net, latents, cond, uncond, sigmas, g_prior, g_steps = _gpu_setup(P=2)
    small = _gpu_setup(P=1, seed=1)[1:]
    graph = GraphSampler(net, module=net)
    eager = GraphSampler(net, graphs=False, log=lambda m: None)
    a = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=1)
    b = graph.sample(small[0], small[1], *small[3:], seed=2)
    graphs = list(graph._graphs.values())
    assert len(graphs) == 2 and graph.captures == 2
    assert graphs[0].pool() == graphs[1].pool() == graph.pool
    a2 = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=1)  # replays in another order than captured
    _assert_same(a, a2, "replayed after the other graph")
    _assert_same(a, eager.sample(latents, cond, sigmas, g_prior, g_steps, seed=1), "rows 4")
    _assert_same(b, eager.sample(small[0], small[1], *small[3:], seed=2), "rows 2")


def _check_sd3_replay_equals_eager():
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        sys.exit(77)
    from benchmarks.bench_sampling import build_model, velocity_fn

    model = build_model("tiny", 4, torch.device("cuda"), torch.bfloat16)
    net = model.transformer
    assert isinstance(net, SD3Transformer2DModel)
    forward = velocity_fn(model, net)
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, device="cuda", generator=g)
    cond = Conditioning(torch.randn(4, 8, 64, device="cuda", generator=g).bfloat16(),
                        torch.randn(4, 64, device="cuda", generator=g).bfloat16())
    uncond = Conditioning(torch.zeros(1, 8, 64, device="cuda").bfloat16(), torch.zeros(1, 64, device="cuda").bfloat16())
    sigmas = torch.linspace(1, 0, 5)
    g_prior, g_steps = churn_schedule("raw", 0.1, sigmas, 4)
    for guidance in (1.0, 4.5):
        graph = GraphSampler(forward, guidance_scale=guidance, uncond=uncond, module=net)
        eager = GraphSampler(forward, guidance_scale=guidance, uncond=uncond, graphs=False, log=lambda m: None)
        a = graph.sample(latents, cond, sigmas, g_prior, g_steps, seed=9)
        assert graph.mode == "graph", graph.fallback_reason
        _assert_same(a, eager.sample(latents, cond, sigmas, g_prior, g_steps, seed=9), f"SD3 guidance={guidance}")


GPU_CHECKS = {"replay_equals_eager": _check_replay_equals_eager, "weight_update_seen": _check_weight_update_seen,
              "pool_shared": _check_pool_shared, "sd3_replay_equals_eager": _check_sd3_replay_equals_eager}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA-graph capture and replay")
@pytest.mark.parametrize("check", sorted(GPU_CHECKS))
def test_graph_on_gpu(check):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton, capturable
    code = f"from tests.test_graphs import GPU_CHECKS; GPU_CHECKS[{check!r}]()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip("diffusers is not installed")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
