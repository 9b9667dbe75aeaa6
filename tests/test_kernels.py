"""Triton kernels (fdfo.kernels) against their PyTorch references and float64 gold, on CPU.

The kernels run in Triton's interpreter, which must be switched on before triton
is first imported: tests/conftest.py sets TRITON_INTERPRET=1 before any test
module is collected. Inputs are fresh random every run (the seed is
printed, so a failure can be replayed with FDFO_TEST_SEED=<seed>); every buffer a
kernel writes is filled with NaN first, so an element it skips fails the test.

Interpreter caveat: its fp32 → bf16 cast truncates (GPUs round to nearest even),
so bf16 outputs are compared with a tolerance of one or two bf16 ulps.
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import textwrap
import types

import pytest
import torch

if "triton" in sys.modules and type(sys.modules["triton"].language.randn).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before this module could set TRITON_INTERPRET=1; set it in "
                "tests/conftest.py (or the environment) so the kernels can run on CPU",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

import fdfo.kernels as K  # noqa: E402
from fdfo.kernels import launch  # noqa: E402
from fdfo.kernels.churn_step_triton import churn_noise as churn_noise_triton  # noqa: E402
from fdfo.kernels.churn_step_triton import churn_step as churn_step_triton  # noqa: E402
from fdfo.kernels.fd_loss_triton import FDLossFunction, fd_loss_forward  # noqa: E402
from fdfo.kernels.fd_loss_triton import fd_loss as fd_loss_triton  # noqa: E402
from fdfo.kernels.pair_delta_triton import pair_delta as pair_delta_triton  # noqa: E402
from fdfo.loss import fdfo_loss, pair_delta  # noqa: E402
from fdfo.sampling import churn_step, prior_churn  # noqa: E402
from tests.gold import fd_loss_gold  # noqa: E402

CLIP = 0.03
BF16_ULP = 2.0**-7  # relative spacing of bf16 values (8 significant bits)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


@pytest.fixture
def gen():
    """A generator with a fresh seed, printed so that a failure can be replayed."""
    seed = int(os.environ.get("FDFO_TEST_SEED", secrets.randbits(31)))
    print(f"random seed: {seed} (replay with FDFO_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- fd_loss


def _loss_inputs(gen, rows, shape, dtype, d_scale=0.3):
    v_ref = torch.randn(rows, *shape, generator=gen)
    d = torch.randn(rows, *shape, generator=gen) * d_scale
    dR = torch.randn(rows, generator=gen) * 0.1
    # Per-row distance from v_ref spread over decades, so that some rows leave the clip range.
    eps = 10 ** (torch.rand(rows, generator=gen) * 2.5 - 3.0)
    v = v_ref + eps.view(-1, *[1] * len(shape)) * torch.randn(rows, *shape, generator=gen)
    return v.to(dtype), v_ref.to(dtype), d.to(dtype), dR


# (rows, latent shape, block, max_chunks): one pair; N not a multiple of the block with several
# tiles per chunk; many rows with many chunks; the default launch configuration.
LOSS_CASES = [(2, (4, 5, 7), None, None), (6, (3, 11, 13), 64, 3), (26, (2, 6, 5), 16, None),
              (4, (16, 8, 8), None, None)]
TOL = {torch.float32: dict(loss=2e-5, grad=2e-4), torch.bfloat16: dict(loss=2e-5, grad=2.2 * BF16_ULP)}
# With ms given, a bf16 gradient is rounded twice (the direction, then the scaled value): up to one
# more ulp in the interpreter, whose casts truncate.
TOL_MS_GIVEN = TOL | {torch.bfloat16: dict(loss=2e-5, grad=3.2 * BF16_ULP)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,shape,block,max_chunks", LOSS_CASES)
def test_fd_loss_forward_and_gradient_match_reference_and_gold(gen, dtype, rows, shape, block, max_chunks):
    v, v_ref, d, dR = _loss_inputs(gen, rows, shape, dtype)
    scale = float(torch.rand((), generator=gen)) * 4 - 2  # grad_output ≠ 1 (and of either sign)
    tol = TOL[dtype]

    # Triton, with explicit launch configuration (chunks, tiles, tails).
    vk = v.clone().requires_grad_(True)
    loss, metrics, row_stats, grad = fd_loss_forward(vk, v_ref, d, dR, CLIP, block=block, max_chunks=max_chunks)
    loss_t, m_t = fd_loss_triton(vk, v_ref, d, dR, CLIP)
    (scale * loss_t).backward()

    gold, ratio, per_row = fd_loss_gold(v, v_ref, d, dR, CLIP)
    v64 = v.double().requires_grad_(True)
    fd_loss_gold(v64, v_ref, d, dR, CLIP)[0].mul(scale).backward()
    vr = v.clone().requires_grad_(True)
    loss_r, m_r = fdfo_loss(vr, v_ref, d, dR, CLIP)
    (scale * loss_r).backward()

    for lo in (loss, loss_t):
        _close(lo, gold, tol["loss"], 1e-7, "loss vs gold")
    _close(loss_t, loss_r, tol["loss"], 1e-7, "loss vs reference")
    _close(row_stats[0], per_row, tol["loss"], 1e-7, "per-row loss")
    _close(row_stats[1], ratio, 1e-5, 0, "per-row ratio")
    # Clip flags: exact except for rows within rounding distance of the clip boundary.
    clear = ((ratio - 1).abs() - CLIP).abs() > 1e-4
    assert torch.equal(row_stats[2].bool()[clear], ((ratio - 1).abs() > CLIP)[clear])
    _close(metrics[0], row_stats[2].mean(), 0, 0, "clipfrac vs per-row flags")
    _close(metrics[0], m_r["clipfrac"], 0, float((~clear).sum()) / rows, "clipfrac vs reference")
    _close(m_t["ratio"], ratio.mean(), 1e-5, 0, "mean ratio")
    _close(m_t["policy_loss"], m_r["policy_loss"], tol["loss"], 1e-7, "policy_loss")
    assert set(m_t) == set(m_r) and all(t.ndim == 0 for t in m_t.values())

    assert vk.grad.dtype == dtype and vk.grad.shape == v.shape
    gmax = float(v64.grad.abs().max())
    _close(vk.grad, v64.grad, tol["grad"], 1e-3 * gmax, "gradient vs gold")
    _close(vk.grad, vr.grad, tol["grad"], 1e-3 * gmax, "gradient vs reference")
    _close(grad * scale, vk.grad, tol["grad"], 1e-3 * gmax, "configured launch vs default launch")


def _fd_loss_run(v, v_ref, d, dR, ms, fn, scale, **kwargs):
    """(loss, mean ratio, clipfrac, ∂(scale·loss)/∂v) of one fd_loss implementation."""
    vk = v.clone().requires_grad_(True)
    loss, metrics = fn(vk, v_ref, d, dR, CLIP, ms, **kwargs)
    (scale * loss).backward()
    return loss.detach(), metrics["ratio"], metrics["clipfrac"], vk.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,shape,block,max_chunks", LOSS_CASES)
def test_fd_loss_with_pair_delta_ms_equals_the_path_that_sums_it(gen, dtype, rows, shape, block, max_chunks):
    """ms from pair_delta: the kernel takes the mean square as given (phase 1 writes the gradient
    direction, phase 2 rescales it) and gives what ms=None gives, and what the reference and the
    float64 gold give; for all rows and for ms[idx] of a micro-batch of rows (repeats allowed, as the
    trainer's (row, step) elements). A different ms gives the formula's result for that ms."""
    x0 = torch.randn(rows, *shape, generator=gen).to(dtype)
    d_all, dR_all, ms_all = pair_delta_triton(x0, torch.randn(rows, generator=gen) * 0.2)
    v_all, v_ref_all, _, _ = _loss_inputs(gen, rows, shape, dtype)
    scale = float(torch.rand((), generator=gen)) * 4 - 2
    tol = TOL_MS_GIVEN[dtype]
    micro = torch.randint(rows, (max(2, rows // 2) + 1,), generator=gen)
    for idx in (torch.arange(rows), micro):
        v, v_ref, d, dR, ms = v_all[idx], v_ref_all[idx], d_all[idx], dR_all[idx], ms_all[idx]
        kernel_sums = _fd_loss_run(v, v_ref, d, dR, None, fd_loss_triton, scale)
        kernel_given = _fd_loss_run(v, v_ref, d, dR, ms, fd_loss_triton, scale)
        reference = _fd_loss_run(v, v_ref, d, dR, ms, fdfo_loss, scale)
        v64 = v.double().requires_grad_(True)
        gold, ratio, _ = fd_loss_gold(v64, v_ref, d, dR, CLIP)
        (scale * gold).backward()
        gmax = float(v64.grad.abs().max())
        for other, what in ((kernel_sums, "ms=None"), (reference, "reference")):
            _close(kernel_given[0], other[0], tol["loss"], 1e-7, f"loss vs {what}")
            _close(kernel_given[1], other[1], 1e-5, 0, f"ratio vs {what}")
            _close(kernel_given[3], other[3], tol["grad"], 1e-3 * gmax, f"gradient vs {what}")
        assert kernel_given[3].dtype == dtype
        # pair_delta sums the squares over the same chunks, in the same order, as phase 1 does without ms:
        # the same ms, hence the same loss and metrics to the bit (and the same fp32 gradient; a bf16
        # one is rounded twice with ms given).
        for k in range(3 if dtype != torch.float32 else 4):
            assert torch.equal(kernel_given[k], kernel_sums[k]), ("loss", "ratio", "clipfrac", "gradient")[k]
        _close(kernel_given[0], gold, tol["loss"], 1e-7, "loss vs gold")
        _close(kernel_given[3], v64.grad, tol["grad"], 1e-3 * gmax, "gradient vs gold")
        # With write_grad off (one program per row in phase 2), and a launch configuration of its own.
        loss, metrics, row_stats, grad = fd_loss_forward(v, v_ref, d, dR, CLIP, ms, write_grad=False, block=block,
                                                         max_chunks=max_chunks)
        assert grad is None
        _close(loss, kernel_sums[0], tol["loss"], 1e-7, "loss without gradient")
        _close(row_stats[1], ratio, 1e-5, 0, "per-row ratio without gradient")
        _, _, _, grad = fd_loss_forward(v, v_ref, d, dR, CLIP, ms, block=block, max_chunks=max_chunks)
        _close(grad * scale, kernel_given[3], tol["grad"], 1e-3 * gmax, "configured launch vs default launch")

    # The given ms is the one used: scaled, the result follows the formula for the scaled value.
    other_ms = ms * (0.5 + float(torch.rand((), generator=gen)))
    loss, ratio_mean, _, grad = _fd_loss_run(v, v_ref, d, dR, other_ms, fd_loss_triton, scale)
    v64 = v.double().requires_grad_(True)
    gold, ratio, _ = fd_loss_gold(v64, v_ref, d, dR, CLIP, ms=other_ms)
    (scale * gold).backward()
    _close(loss, gold, tol["loss"], 1e-7, "loss for another ms")
    _close(ratio_mean, ratio.mean(), 1e-5, 0, "ratio for another ms")
    _close(grad, v64.grad, tol["grad"], 1e-3 * float(v64.grad.abs().max()), "gradient for another ms")


def test_fd_loss_with_ms_reads_the_inputs_once(gen, monkeypatch):
    """With ms given, phase 2 only rescales the direction phase 1 wrote: handing it NaN in place of
    v, v_ref and d changes nothing. (Without ms it reads them again: there the NaN shows.)"""
    from fdfo.kernels import fd_loss_triton as module

    rows, shape = 6, (3, 10, 9)
    x0 = torch.randn(rows, *shape, generator=gen)
    d, dR, ms = pair_delta_triton(x0, torch.randn(rows, generator=gen))
    v, v_ref, _, _ = _loss_inputs(gen, rows, shape, torch.float32)
    expected = fd_loss_forward(v, v_ref, d, dR, CLIP, ms, block=32)
    real = module._finish_kernel

    class NaNInputs:  # a stand-in for phase 2 that replaces its v, v_ref and d by NaN
        runs_on_cpu = True

        def __getitem__(self, grid):
            def launch(v2, vr2, d2, *args, **kwargs):
                real[grid](*(torch.full_like(a, math.nan) for a in (v2, vr2, d2)), *args, **kwargs)
            return launch

    monkeypatch.setattr(module, "_finish_kernel", NaNInputs())
    for a, b in zip(fd_loss_forward(v, v_ref, d, dR, CLIP, ms, block=32), expected):
        assert torch.equal(a, b)
    assert fd_loss_forward(v, v_ref, d, dR, CLIP, block=32)[3].isnan().all()


def test_fd_loss_rejects_an_ms_of_other_rows(gen):
    v, v_ref, d, dR = _loss_inputs(gen, 4, (2, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="one mean square per row"):
        fd_loss_forward(v, v_ref, d, dR, CLIP, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fd_loss_gradient_flows_into_both_cfg_halves(gen, dtype):
    rows, shape = 4, (3, 9, 7)
    v_c, v_ref, d, dR = _loss_inputs(gen, rows, shape, dtype)
    v_u = (v_c.float() + 0.05 * torch.randn(v_c.shape, generator=gen)).to(dtype)
    w = 1.5 + 3 * float(torch.rand((), generator=gen))
    grads = {}
    for name, fn in (("triton", fd_loss_triton), ("torch", fdfo_loss)):
        vu, vc = v_u.clone().requires_grad_(True), v_c.clone().requires_grad_(True)
        loss, _ = fn(vu + w * (vc - vu), v_ref, d, dR, CLIP)
        loss.backward()
        grads[name] = (vu.grad, vc.grad)
    for k, half in enumerate(("v_uncond", "v_cond")):
        g_t, g_r = grads["triton"][k], grads["torch"][k]
        assert g_t is not None and g_t.abs().sum() > 0, f"no gradient reached {half}"
        _close(g_t, g_r, TOL[dtype]["grad"], 1e-3 * float(g_r.abs().max()), half)


def test_fd_loss_at_v_ref_has_ratio_one_and_the_closed_form_gradient(gen):
    rows, shape = 6, (4, 6, 6)
    _, v_ref, d, dR = _loss_inputs(gen, rows, shape, torch.float32)
    v = v_ref.clone().requires_grad_(True)
    loss, metrics = fd_loss_triton(v, v_ref, d, dR, CLIP)
    loss.backward()
    assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["clipfrac"]) == 0.0
    assert float(loss.detach()) == pytest.approx(float(-dR.mean()), abs=1e-6)
    d64 = d.double()
    d_hat = d64 / ((d64**2).flatten(1).mean(1).view(-1, 1, 1, 1) + 1e-6)
    expected = 2 * dR.double().view(-1, 1, 1, 1) * d_hat / v[0].numel() / rows
    _close(v.grad, expected, 1e-4, 1e-9, "2·dR·d̂/N at ratio 1")


def test_fd_loss_is_stable_where_the_literal_formula_is_not(gen):
    """Tiny d: lp and lp_ref are ~1e5 each; the kernel's expanded form still gets the ratio right."""
    rows, shape = 4, (4, 8, 8)
    v_ref = torch.randn(rows, *shape, generator=gen)
    d = torch.randn(rows, *shape, generator=gen) * 0.003
    dR = torch.randn(rows, generator=gen) * 0.1
    v = v_ref + 1e-5 * torch.randn(rows, *shape, generator=gen)
    _, metrics = fd_loss_triton(v, v_ref, d, dR, CLIP)
    _, ratio, _ = fd_loss_gold(v, v_ref, d, dR, CLIP)
    assert float(metrics["ratio"]) == pytest.approx(float(ratio.mean()), abs=1e-5)


def test_fd_loss_reads_row_strided_inputs_in_place(gen):
    """v_ref and d as slices of stored trajectories ([rows, T, ...][:, k]), as the trainer passes them."""
    rows, T, shape = 4, 3, (2, 5, 7)
    v, _, _, dR = _loss_inputs(gen, rows, shape, torch.float32)
    vs = torch.randn(rows, T, *shape, generator=gen)
    ds = torch.randn(rows, T, *shape, generator=gen) * 0.2
    v_ref, d = vs[:, 1], ds[:, 2]
    v = (v_ref + 0.01 * torch.randn(v_ref.shape, generator=gen)).requires_grad_(True)
    loss, metrics = fd_loss_triton(v, v_ref, d, dR, CLIP)
    loss.backward()
    v64 = v.detach().double().requires_grad_(True)
    gold, ratio, _ = fd_loss_gold(v64, v_ref, d, dR, CLIP)
    gold.backward()
    _close(loss, gold, 2e-5, 1e-7, "loss")
    _close(v.grad, v64.grad, 2e-4, 1e-3 * float(v64.grad.abs().max()), "gradient")


def test_fd_loss_without_grad_writes_no_gradient(gen):
    v, v_ref, d, dR = _loss_inputs(gen, 4, (3, 6, 6), torch.float32)
    loss, metrics, row_stats, grad = fd_loss_forward(v, v_ref, d, dR, CLIP, write_grad=False)
    assert grad is None
    gold, ratio, per_row = fd_loss_gold(v, v_ref, d, dR, CLIP)
    _close(loss, gold, 2e-5, 1e-7, "loss")
    _close(row_stats[1], ratio, 1e-5, 0, "ratio")
    with torch.no_grad():
        loss2, _ = fd_loss_triton(v.clone().requires_grad_(True), v_ref, d, dR, CLIP)
    _close(loss2, gold, 2e-5, 1e-7, "loss under no_grad")


def test_fd_loss_second_backward_is_refused(gen):
    v, v_ref, d, dR = _loss_inputs(gen, 2, (2, 4, 4), torch.float32)
    v.requires_grad_(True)
    loss, _ = fd_loss_triton(v, v_ref, d, dR, CLIP)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


# --------------------------------------------------------------------------- pair_delta


# (pairs, latent shape, block, max_chunks): a single pair; odd N with tiles; many pairs; defaults.
PAIR_CASES = [(1, (3, 5, 7), None, None), (3, (5, 11, 13), 64, 4), (40, (2, 3, 5), 8, None),
              (2, (16, 8, 8), None, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pairs,shape,block,max_chunks", PAIR_CASES)
def test_pair_delta_matches_reference_and_gold(gen, dtype, pairs, shape, block, max_chunks):
    x0 = torch.randn(2 * pairs, *shape, generator=gen).to(dtype)
    rewards = torch.randn(2 * pairs, generator=gen)
    d, dR, ms = pair_delta_triton(x0, rewards, block=block, max_chunks=max_chunks)
    d_r, dR_r, ms_r = pair_delta(x0, rewards)
    assert d.dtype == d_r.dtype and dR.dtype == dR_r.dtype and ms.dtype == ms_r.dtype
    assert d.shape == x0.shape and dR.shape == ms.shape == (2 * pairs,)
    # The two rows of a pair are exact negatives; ms is shared.
    assert torch.equal(d[1::2], -d[0::2]) and torch.equal(dR[1::2], -dR[0::2]) and torch.equal(ms[1::2], ms[0::2])
    x64 = x0.double()
    d64 = (x64[0::2] - x64[1::2]) / 2
    rtol = 1e-6 if dtype == torch.float32 else 1.01 * BF16_ULP
    _close(d[0::2], d64, rtol, 1e-30, "d vs gold")
    _close(d, d_r, rtol, 1e-30, "d vs reference")
    _close(dR, dR_r, 0, 0, "dR")
    ms_rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
    _close(ms, (d64**2).flatten(1).mean(1).repeat_interleave(2), ms_rtol, 0, "ms vs gold")
    _close(ms, ms_r, ms_rtol, 0, "ms vs reference")


def test_pair_delta_rejects_unpaired_rows():
    with pytest.raises(ValueError, match="2P"):
        pair_delta_triton(torch.zeros(3, 4), torch.zeros(3))


# --------------------------------------------------------------------------- churn step


def _gold_churn(x, v, t, s, g, noise):
    """docs/algorithm.md §1.3 in float64 with per-row t, s, γ."""
    x, v, noise = x.double(), v.double(), noise.double()
    t, s, g = (a.double().view(-1, *[1] * (x.ndim - 1)) for a in (t, s, g))
    r = s / (1 + g - g * s)
    return (x + (r - t) * v) / (1 + g * r) + r * torch.sqrt((1 + g) ** 2 - 1) / (1 + g * r) * noise


def _churn_inputs(gen, rows, shape, dtype):
    x, v_u, v_c = (torch.randn(rows, *shape, generator=gen).to(dtype) for _ in range(3))
    t = torch.rand(rows, generator=gen) * 0.9 + 0.1
    s = t * torch.rand(rows, generator=gen)
    g = torch.rand(rows, generator=gen) * 0.3
    g[0] = 0.0  # a row without churn (the last step of a schedule)
    return x, v_u, v_c, t, s, g


CHURN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2.2 * BF16_ULP, atol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("rows,shape", [(2, (3, 5, 7)), (7, (4, 9, 9))])
def test_churn_step_matches_reference_given_its_noise(gen, dtype, cfg, rows, shape):
    x, v_u, v_c, t, s, g = _churn_inputs(gen, rows, shape, dtype)
    w = 1.0 + 4 * float(torch.rand((), generator=gen))
    seed, offset = int(torch.randint(2**40, (), generator=gen)), int(torch.randint(2**20, (), generator=gen))
    noise = churn_noise_triton(x.shape, seed, offset, device="cpu")
    v_used = v_u.float() + w * (v_c.float() - v_u.float()) if cfg else v_u.float()
    v_out = torch.empty(x.shape, dtype=torch.float32)
    kwargs = dict(v_cond=v_c, cfg_scale=w, v_out=v_out) if cfg else {}
    out = churn_step_triton(x, v_u, t, s, g, seed=seed, offset=offset, **kwargs)
    out_tensor_noise = churn_step_triton(x, v_u, t, s, g, noise, **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    gold = _gold_churn(x, v_used, t, s, g, noise)
    ref = churn_step(x.float(), v_used, t, s, g, noise)
    tol = CHURN_TOL[dtype]
    _close(out, gold, what="philox noise vs gold", **tol)
    _close(out, ref, what="philox noise vs reference", **tol)
    _close(out_tensor_noise, out, what="noise tensor vs philox", **tol)
    if cfg:
        _close(v_out, v_used, 1e-6, 1e-6, "v_out (the guided velocity)")


def test_churn_step_writes_into_stored_trajectory_slices(gen):
    """out = xs[:, k+1] and v_out = vs[:, k] of [rows, T, ...] buffers: only those slices change."""
    rows, T, shape, k = 4, 3, (2, 5, 7), 1
    x, v_u, v_c, t, s, g = _churn_inputs(gen, rows, shape, torch.float32)
    xs = torch.full((rows, T, *shape), float("nan"))
    vs = torch.full((rows, T, *shape), float("nan"))
    xs[:, k] = x
    churn_step_triton(xs[:, k], v_u, t, s, g, seed=3, offset=k, v_cond=v_c, cfg_scale=2.0,
                      out=xs[:, k + 1], v_out=vs[:, k])
    noise = churn_noise_triton(x.shape, 3, k, device="cpu")
    v_used = v_u + 2.0 * (v_c - v_u)
    _close(xs[:, k + 1], _gold_churn(x, v_used, t, s, g, noise), what="x'", **CHURN_TOL[torch.float32])
    _close(vs[:, k], v_used, 1e-6, 1e-6, "v_out")
    assert torch.equal(xs[:, k], x), "the input slice was modified"
    assert xs[:, 0].isnan().all() and vs[:, 0].isnan().all() and vs[:, 2].isnan().all()


def test_churn_step_in_place_and_euler_without_noise(gen):
    x, v, _, t, s, _ = _churn_inputs(gen, 3, (2, 7, 7), torch.float32)
    expected = x.double() + (s - t).double().view(-1, 1, 1, 1) * v.double()
    y = x.clone()
    churn_step_triton(y, v, t, s, 0.0, out=y)  # γ = 0: plain Euler, no noise drawn, in place
    _close(y, expected, 1e-6, 1e-6, "Euler step")


def test_prior_churn_matches_reference(gen):
    x = torch.randn(6, 3, 7, 5, generator=gen)
    g = torch.rand(6, generator=gen) * 0.1
    out = K.prior_churn(x, g, seed=11, offset=0, backend="triton")
    noise = churn_noise_triton(x.shape, 11, 0, device="cpu")
    _close(out, prior_churn(x.double(), g.double(), noise.double()), 1e-5, 1e-6, "prior churn")


def test_philox_noise_is_standard_normal_and_independent_across_rows():
    rows, n = 8, 8192
    seed = secrets.randbits(62)
    print(f"philox seed: {seed}")
    eps = churn_noise_triton((rows, n), seed, 0, device="cpu").double()
    total = eps.numel()
    assert eps.isfinite().all()
    assert abs(float(eps.mean())) < 5 / total**0.5
    assert abs(float(eps.var()) - 1) < 5 * (2 / total) ** 0.5
    # Kolmogorov–Smirnov distance to N(0, 1) (P(D > 2.5/√n) ≈ 1e-5).
    z = eps.flatten().sort().values
    cdf = torch.special.ndtr(z)
    grid = torch.arange(1, total + 1, dtype=torch.float64) / total
    assert float(torch.maximum(grid - cdf, cdf - (grid - 1 / total)).abs().max()) < 2.5 / total**0.5
    # Rows (both branches of every pair) and the four quarters of a row (one Philox call each) uncorrelated.
    corr = torch.corrcoef(eps)
    assert float((corr - torch.eye(rows, dtype=torch.float64)).abs().max()) < 5 / n**0.5
    quarters = torch.corrcoef(eps.view(rows, 4, n // 4).transpose(0, 1).reshape(4, -1))
    assert float((quarters - torch.eye(4, dtype=torch.float64)).abs().max()) < 5 / (total / 4) ** 0.5


def test_philox_noise_is_reproducible_and_keyed_by_seed_and_offset():
    shape = (4, 3, 7, 9)
    seed, offset = secrets.randbits(40), secrets.randbits(31)
    a = churn_noise_triton(shape, seed, offset, device="cpu")
    # Same (seed, offset): identical, whatever the launch configuration or how they are passed.
    assert torch.equal(a, churn_noise_triton(shape, seed, offset, device="cpu"))
    assert torch.equal(a, churn_noise_triton(shape, seed, offset, device="cpu", block=16))
    assert torch.equal(a, churn_noise_triton(shape, torch.tensor(seed), torch.tensor([offset]), device="cpu"))
    # Different offset (low or high word) or seed (low or high word): different noise.
    for other in ((seed, offset + 1), (seed, offset + 2**32), (seed + 1, offset), (seed ^ 2**35, offset)):
        b = churn_noise_triton(shape, *other, device="cpu")
        assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]).__abs__() < 0.2, other


@pytest.mark.parametrize("seed", [1234, 2**31 + 1234, 2**40 + 1234], ids=["int32", "uint32", "int64"])
def test_churn_step_with_device_tensor_seed_equals_int_seed(gen, seed):
    """Every width an integer seed takes as a kernel argument (Triton types it int32, uint32 or
    int64) gives the noise of the same seed read from an int64 device tensor."""
    x, v, _, t, s, g = _churn_inputs(gen, 3, (2, 5, 5), torch.float32)
    a = churn_step_triton(x, v, t, s, g, seed=seed, offset=7)
    b = churn_step_triton(x, v, t, s, g, seed=torch.tensor([seed]), offset=torch.tensor(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, churn_step_triton(x, v, t, s, g, seed=seed, offset=8))


# --------------------------------------------------------------------------- dispatch


def test_auto_backend_uses_the_reference_on_cpu(gen):
    """backend="auto" is every function's default: on CPU tensors it takes the PyTorch references."""
    v, v_ref, d, dR = _loss_inputs(gen, 4, (2, 4, 4), torch.float32)
    for kwargs in ({}, {"backend": "auto"}):
        loss, metrics = K.fd_loss(v, v_ref, d, dR, CLIP, **kwargs)
        loss_r, metrics_r = fdfo_loss(v, v_ref, d, dR, CLIP)
        assert torch.equal(loss, loss_r) and all(torch.equal(metrics[k], metrics_r[k]) for k in metrics_r)
        x0, R = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, generator=gen)
        assert all(torch.equal(a, b) for a, b in zip(K.pair_delta(x0, R, **kwargs), pair_delta(x0, R)))
        x, v_u, _, t, s, g = _churn_inputs(gen, 4, (2, 3, 3), torch.float32)
        noise = K.churn_noise(x.shape, 5, 2, device="cpu", **kwargs)
        out = K.churn_step(x, v_u, t, s, g, seed=5, offset=2, **kwargs)
        assert torch.equal(out, churn_step(x, v_u, t, s, g, noise))
        assert torch.equal(out, K.churn_step(x, v_u, t, s, g, seed=5, offset=2, backend="torch"))
    assert K.resolve_backend("auto", x) == "torch" and K.resolve_backend("triton", x) == "triton"
    assert K.resolve_backend("torch", device="cpu") == "torch"


def test_forced_backends_agree_call_by_call(gen):
    """The backend is an argument of each call: calls with different backends interleave freely."""
    v, v_ref, d, dR = _loss_inputs(gen, 4, (2, 4, 4), torch.float32)
    x0, R = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, generator=gen)
    ms = d.double().pow(2).flatten(1).mean(1).float()
    results = {"torch": [], "triton": []}
    for _ in range(2):
        for mode in ("torch", "triton"):
            results[mode].append((K.fd_loss(v, v_ref, d, dR, CLIP, backend=mode)[0],
                                  K.fd_loss(v, v_ref, d, dR, CLIP, ms=ms, backend=mode)[0],
                                  *K.pair_delta(x0, R, backend=mode)))
    for mode in results:  # the same call gives the same result whatever ran in between
        assert all(torch.equal(a, b) for a, b in zip(*results[mode]))
    for a, b in zip(results["torch"][0], results["triton"][0]):
        _close(a, b, 2e-5, 1e-7, "torch vs triton backend")
    for bad in ("fast", None):
        with pytest.raises(ValueError, match="unknown kernel backend"):
            K.fd_loss(v, v_ref, d, dR, CLIP, backend=bad)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        K.resolve_backend("cuda", v)


def test_import_without_triton_and_the_error_without_the_interpreter():
    """In a fresh process: no triton → auto falls back to torch, 'triton' raises; triton without
    TRITON_INTERPRET → 'triton' on CPU tensors raises an error that names the fix."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import fdfo.kernels as K
        assert not K.triton_available()
        x = torch.randn(2, 3, 4)
        loss, _ = K.fd_loss(x, x, x, torch.ones(2), 0.03)
        try:
            K.fd_loss(x, x, x, torch.ones(2), 0.03, backend="triton")
        except RuntimeError as e:
            assert "not installed" in str(e), e
        else:
            raise AssertionError("no error without triton")
        del sys.modules["triton"]
        assert K.triton_available()
        try:
            K.fd_loss(x, x, x, torch.ones(2), 0.03, backend="triton")
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
        else:
            raise AssertionError("no error for CPU tensors without the interpreter")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_cpu_tensors_are_accepted_by_interpreted_kernels_and_declared_stand_ins():
    """launch.runs_on_cpu: a kernel decorated for the interpreter, or any object that declares
    ``runs_on_cpu = True`` (the hook a tool that only records launches uses), takes CPU tensors."""
    from fdfo.kernels.churn_step_triton import _churn_step_kernel

    x = torch.zeros(2, 3)
    assert K.triton_interpreted() and launch.interpreted(_churn_step_kernel)
    assert launch.check_device(_churn_step_kernel, x) == torch.device("cpu")

    class StandIn:
        runs_on_cpu = True

    class Undeclared:
        pass

    assert launch.check_device(StandIn(), x) == torch.device("cpu") and not launch.interpreted(StandIn())
    for kernel in (Undeclared(), types.SimpleNamespace(runs_on_cpu="yes")):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            launch.check_device(kernel, x)


def test_fd_loss_function_is_a_public_autograd_function(gen):
    v, v_ref, d, dR = _loss_inputs(gen, 2, (2, 4, 4), torch.float32)
    v.requires_grad_(True)
    loss, metrics, row_stats = FDLossFunction.apply(v, v_ref, d, dR, CLIP)  # ms is optional
    assert loss.requires_grad and not metrics.requires_grad and not row_stats.requires_grad
    assert row_stats.shape == (3, 2) and metrics.shape == (2,)
    loss.backward()
    v2 = v.detach().clone().requires_grad_(True)
    fdfo_loss(v2, v_ref, d, dR, CLIP)[0].backward()
    _close(v.grad, v2.grad, 2e-4, 1e-3 * float(v2.grad.abs().max()), "gradient")


def test_dispatch_functions_are_not_shadowed_by_the_kernel_modules():
    """Importing a kernel module binds its name on the package: the files must not be named like the functions."""
    for name in ("fd_loss", "pair_delta", "churn_step", "prior_churn", "churn_noise"):
        assert callable(getattr(K, name)) and getattr(K, name).__module__ == "fdfo.kernels", name
