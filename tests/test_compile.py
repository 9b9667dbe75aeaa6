"""model.compile: one transformer compiled in place (fdfo.compilation) for sampling and training.

On CPU: the compiled tiny SD3 transformer with LoRA gives eager's velocity and LoRA gradients (inductor,
compiled once: forward and backward in the same call); a compiler failure falls back to eager with one
line; other errors propagate; "auto" is on for CUDA only; the engine compiles the transformer the
sampler and the DeepSpeed engine call. On a GPU (skipped elsewhere): the sampler's CUDA graph captures
the compiled transformer and agrees with eager, and the same module then trains.
"""

from __future__ import annotations

import pytest
import torch

from fdfo import compilation
from fdfo.compilation import Compiled
from fdfo.config import LoraConfig
from fdfo.models import Conditioning, flavours

# fp32 on CPU: inductor reorders and fuses reductions, so results agree to a few fp32 ulps of the largest
# value; the tolerance leaves two orders of magnitude above what is seen (about 1e-6 relative).
RTOL, ATOL_REL = 1e-4, 1e-4


def tiny_model(seed: int = 0):
    """The tiny SD3 transformer (fdfo.models.flavours) in fp32 with a rank-4 LoRA whose B is non-zero (so the
    adapter changes the velocity and both A and B get gradients)."""
    torch.manual_seed(seed)
    model = flavours.flow_model("tiny", torch.device("cpu"), torch.float32)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def inputs(rows: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g),
            Conditioning(torch.randn(rows, 8, 64, generator=g), torch.randn(rows, 64, generator=g)))


def velocity_and_grads(model):
    x, sigma, cond = inputs()
    v = model.velocity(x, sigma, cond)
    v.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None}
    model.transformer.zero_grad(set_to_none=True)
    return v.detach(), grads


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL_REL * float(b.abs().max()))


def test_auto_is_on_for_cuda_only():
    assert not compilation.wanted("auto", torch.device("cpu"))
    assert compilation.wanted("auto", torch.device("cuda", 0)) and compilation.wanted("auto", "cuda")
    assert compilation.wanted(True, "cpu") and not compilation.wanted(False, "cuda")


def test_compiled_transformer_gives_eager_velocity_and_lora_gradients():
    """Inductor on the tiny transformer with LoRA, compiled once (forward and backward in the first call)."""
    model = tiny_model()
    v_eager, g_eager = velocity_and_grads(model)
    lines = []
    compiled = model.compile(log=lines.append)
    assert model.compiled is compiled and model.transformer._compiled_call_impl is not None
    v, grads = velocity_and_grads(model)
    if not compiled.compiled:  # inductor could not build here (no C++ compiler, ...): the fallback ran
        pytest.skip(f"inductor cannot compile on this machine: {compiled.failure}")
    assert lines == [] and compiled.compilations == 1 and compiled.compile_s > 0
    assert_close(v, v_eager)
    assert sorted(grads) == sorted(g_eager) and any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name in g_eager:
        assert_close(grads[name], g_eager[name])
    spent = compiled.compile_s
    v2, _ = velocity_and_grads(model)  # the same shapes: no new compilation, the same numbers
    assert compiled.compilations == 1 and compiled.compile_s == spent and torch.equal(v2, v)
    assert model.compile_stats() == {"compiled": True, "compile_s": spent}


def failing_backend(gm, example_inputs):
    raise RuntimeError("the backend broke")


def test_a_compiler_failure_falls_back_to_eager_once():
    model = tiny_model()
    x, sigma, cond = inputs()
    with torch.no_grad():
        v_eager = model.velocity(x, sigma, cond)
    lines = []
    compiled = Compiled(model.transformer, lines.append, backend=failing_backend)
    model.compiled = compiled
    with torch.no_grad():
        v = model.velocity(x, sigma, cond)
        v_again = model.velocity(x[:1], sigma[:1], cond[:1])  # eager for good: no second try, no second line
    assert torch.equal(v, v_eager)
    assert_close(v_again, v_eager[:1])  # (one row: another BLAS blocking, not bit-equal)
    assert len(lines) == 1 and lines[0].startswith("torch.compile failed (BackendCompilerFailed")
    assert "the backend broke" in lines[0] and "model.compile false" in lines[0]
    assert not compiled.compiled and model.transformer._compiled_call_impl is None
    assert model.compile_stats()["compiled"] is False
    v_train, grads = velocity_and_grads(model)  # training runs eagerly too
    assert grads and torch.isfinite(v_train).all()


def test_errors_of_the_caller_propagate_and_keep_the_compiled_module():
    """A failing backend, but the eager re-run fails too (a shape error): the caller's error, nothing switched
    off; an out-of-memory error raised while compiling is never taken for a compiler failure."""
    model = tiny_model()
    x, sigma, cond = inputs()
    lines = []
    compiled = Compiled(model.transformer, lines.append, backend=failing_backend)
    with torch.no_grad(), pytest.raises(RuntimeError) as info:
        model.velocity(x[:, :3], sigma, cond)  # 3 channels where the transformer takes 4
    assert not isinstance(info.value, torch._dynamo.exc.TorchDynamoException)
    assert compiled.compiled and lines == [] and model.transformer._compiled_call_impl is not None

    def out_of_memory(gm, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")

    model = tiny_model()
    compiled = Compiled(model.transformer, lines.append, backend=out_of_memory)
    with torch.no_grad(), pytest.raises(Exception) as info:
        model.velocity(x, sigma, cond)
    assert "out of memory" in str(info.value) and compiled.compiled and lines == []


def test_the_engine_compiles_the_transformer_that_samples_and_trains(monkeypatch):
    """model.compile true at stage 0: the engine compiles the transformer in place once; the sampler's forward
    and the DeepSpeed engine's forward both run it (dynamo with its eager backend here: tracing, no inductor)."""
    from fdfo import distributed
    from fdfo.algorithms.base import Layout
    from fdfo.context import RunContext
    from fdfo.engine import Engine
    from fdfo.graphs import GraphSampler
    from fdfo.settings import build_config

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    distributed.init()
    cfg = build_config({"model": {"compile": True}, "lora": {"rank": 4, "alpha": 8.0},
                        "train": {"micro_batch_rows": 2}, "sampling": {"steps": 2},
                        "fdfo": {"pairs_per_epoch": 2, "optimizer_steps_per_epoch": 1}})
    model = tiny_model()
    engine = Engine(cfg, model, Layout(rows_per_rank=4, elements_per_rank=2, optimizer_steps=1, micro_batch_rows=2),
                    RunContext.local())
    compiled = model.compiled
    assert compiled is not None and compiled.module is model.transformer is engine.module.module
    x, sigma, cond = inputs()
    v = model.velocity(x, sigma, cond, net=engine.module)  # the training forward, through DeepSpeed
    engine.backward(v.square().mean())
    engine.step()
    assert compiled.compilations == 1 and compiled.compiled
    sampler = GraphSampler.for_model(model, log=lambda msg: None)  # eager on CPU: the same compiled module
    traj = sampler.sample(x[:1], cond, torch.tensor([1.0, 0.5, 0.0]), torch.zeros(2),
                          torch.zeros(2, 2), seed=0)
    assert torch.isfinite(traj.x0).all() and compiled.compilations == 2  # no-grad: a graph of its own
    assert model.compile_stats()["compiled"] is True


def _check_cuda_graph_over_the_compiled_transformer():
    """On a GPU: the sampler's CUDA graph captures the compiled transformer (compiled by the warm-up steps on
    the side stream), its trajectories agree with the eager transformer's within bf16 rounding, and the same
    compiled module then trains (forward and backward with gradients)."""
    from benchmarks.bench_sampling import build_model
    from fdfo.graphs import GraphSampler
    from fdfo.sampling import churn_schedule

    cuda = torch.device("cuda")
    model = build_model("tiny", 4, cuda, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    g = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, device=cuda, generator=g)
    cond = Conditioning(torch.randn(4, 8, 64, device=cuda, generator=g).bfloat16(),
                        torch.randn(4, 64, device=cuda, generator=g).bfloat16())
    sigmas = torch.linspace(1, 0, 5)
    g_prior, g_steps = churn_schedule("raw", 0.1, sigmas, 4)
    eager = GraphSampler.for_model(model, graphs=False, log=lambda m: None).sample(latents, cond, sigmas, g_prior,
                                                                                  g_steps, seed=3)
    lines = []
    compiled = model.compile(log=lines.append)
    sampler = GraphSampler.for_model(model, log=lines.append)
    traj = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=3)
    assert sampler.mode == "graph" and compiled.compiled and compiled.compilations >= 1, lines
    # bf16 weights and states: the compiled kernels round differently (a few bf16 ulps per step, 4 steps)
    torch.testing.assert_close(traj.x0.float(), eager.x0.float(), rtol=0, atol=0.05 * float(eager.x0.abs().max()))
    v = model.velocity(traj.x0[:2].detach(), sigmas[1:3].to(cuda), cond[:2])
    v.square().mean().backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads) and compiled.compiled, lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a CUDA graph over the compiled transformer")
def test_cuda_graph_over_the_compiled_transformer():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton, capturable
    code = "from tests.test_compile import _check_cuda_graph_over_the_compiled_transformer as c; c()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
