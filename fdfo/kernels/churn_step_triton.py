"""Fused churn step (docs/algorithm.md §1.3): CFG combination, overshoot Euler, rescale and fresh noise.

Reference: ``fdfo.sampling.churn_step`` / ``prior_churn`` given the same noise tensor
(``churn_noise`` materialises the kernel's noise for exactly that comparison).

Per row (t, s, γ are per-row; the step is elementwise):

    v   = v_u + w·(v_c − v_u)                      (only with CFG; written to v_out if asked)
    r   = s / (1 + γ − γ·s)
    x'  = (x + (r − t)·v) / (1 + γ·r) + r·sqrt(γ(2 + γ))/(1 + γ·r) · ε

(sqrt(γ(2+γ)) = sqrt((1+γ)² − 1) without the cancellation at small γ.) The prior
churn is the same step without v and with t = s = 1: x' = (x + sqrt(γ(2+γ))·ε)/(1 + γ).

One read of x and v (or v_u and v_c), one write of x' (and of v): the noise never
touches memory. It comes from Philox-4x32-10 (``tl.philox``), keyed by the 64-bit
seed, with a 128-bit counter (c, row, offset_lo, offset_hi):

  - one Philox call gives four normals (two Box–Muller pairs), used for the
    elements c, c + Q, c + 2Q, c + 3Q of the row, Q = ceil(N/4): a fixed layout,
    independent of the block size, so the noise of an element depends only on
    (seed, offset, row, N, element);
  - rows are separate counters, hence independent streams;
  - ``offset`` selects the call: pass the step index (0, 1, 2, …), not an element
    count. Same (seed, offset) → the same noise on every call and every launch
    configuration.

seed and offset are Python ints or integer tensors on the kernel's device (read
inside the kernel): with tensors, a captured CUDA graph replays with whatever the
tensors hold (e.g. ``offset_t += 1`` captured after each step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FLOAT_TYPES, check_device, empty, out_view, rows_view

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _rng_state(seed_ptr, offset_ptr, seed, offset, SEED_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr):
    """(seed as uint64, offset low word, offset high word) from arguments or device tensors."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    if OFFSET_FROM_PTR:
        offset = tl.load(offset_ptr)
    # A value cast: seeds are non-negative, so int64 -> uint64 keeps the bits, and a seed in
    # [2**31, 2**32) (which Triton types uint32) is zero-extended (the interpreter mishandles a
    # uint32 -> int64 -> uint64 bitcast chain).
    seed = seed.to(tl.uint64)
    off = offset.to(tl.int64)
    off_lo = (off & 0xFFFFFFFF).to(tl.uint32)
    off_hi = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return seed, off_lo, off_hi


@triton.jit
def _normal4(seed, c, row, off_lo, off_hi):
    """Four blocks of N(0, 1) from one Philox call per counter (c, row, offset_lo, offset_hi)."""
    c = c.to(tl.uint32, bitcast=True)
    zero = c * 0
    i0, i1, i2, i3 = tl.philox(seed, c, zero + row.to(tl.uint32, bitcast=True), zero + off_lo, zero + off_hi)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3))
    return n0, n1, n2, n3


@triton.jit
def _update(
    x_row, v_row, vc_row, noise_row, out_row, vout_row, e, mask,
    step, inv, noise_std, cfg_scale, eps,
    HAS_V: tl.constexpr, CFG: tl.constexpr, WRITE_V: tl.constexpr, NOISE: tl.constexpr,
):
    """x' at elements e of one row (eps: this quarter's in-kernel noise, used when NOISE is Philox)."""
    x = tl.load(x_row + e, mask=mask, other=0.0).to(tl.float32)
    if HAS_V:
        v = tl.load(v_row + e, mask=mask, other=0.0).to(tl.float32)
        if CFG:
            vc = tl.load(vc_row + e, mask=mask, other=0.0).to(tl.float32)
            v = v + cfg_scale * (vc - v)
        if WRITE_V:
            tl.store(vout_row + e, v.to(vout_row.dtype.element_ty), mask=mask)
        x = x + step * v
    if NOISE == 1:
        eps = tl.load(noise_row + e, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 0:
        x = x * inv
    else:
        x = x * inv + noise_std * eps
    tl.store(out_row + e, x.to(out_row.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _churn_step_kernel(
    x_ptr, v_ptr, vc_ptr, noise_ptr, out_ptr, vout_ptr,
    t_ptr, s_ptr, g_ptr, seed_ptr, offset_ptr, seed, offset, cfg_scale,
    N, Q,
    x_stride, v_stride, vc_stride, noise_stride, out_stride, vout_stride, t_stride, s_stride, g_stride,
    HAS_V: tl.constexpr, CFG: tl.constexpr, WRITE_V: tl.constexpr, NOISE: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(Q, BLOCK), rows); program handles elements c, c+Q, c+2Q, c+3Q of its row."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    t = tl.load(t_ptr + row * t_stride).to(tl.float32)
    s = tl.load(s_ptr + row * s_stride).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    r = s / (1.0 + g - g * s)
    inv = 1.0 / (1.0 + g * r)
    step = r - t
    noise_std = r * tl.sqrt(g * (2.0 + g)) * inv

    c = pid * BLOCK + tl.arange(0, BLOCK)
    cmask = c < Q
    if NOISE == 2:
        seed_u, off_lo, off_hi = _rng_state(seed_ptr, offset_ptr, seed, offset, SEED_FROM_PTR, OFFSET_FROM_PTR)
        n0, n1, n2, n3 = _normal4(seed_u, c, row, off_lo, off_hi)
    else:
        n0 = tl.zeros([BLOCK], dtype=tl.float32)
        n1 = n0
        n2 = n0
        n3 = n0

    x_row = x_ptr + row64 * x_stride
    v_row = v_ptr + row64 * v_stride
    vc_row = vc_ptr + row64 * vc_stride
    noise_row = noise_ptr + row64 * noise_stride
    out_row = out_ptr + row64 * out_stride
    vout_row = vout_ptr + row64 * vout_stride
    _update(x_row, v_row, vc_row, noise_row, out_row, vout_row, c, cmask & (c < N),
            step, inv, noise_std, cfg_scale, n0, HAS_V, CFG, WRITE_V, NOISE)
    _update(x_row, v_row, vc_row, noise_row, out_row, vout_row, Q + c, cmask & (Q + c < N),
            step, inv, noise_std, cfg_scale, n1, HAS_V, CFG, WRITE_V, NOISE)
    _update(x_row, v_row, vc_row, noise_row, out_row, vout_row, 2 * Q + c, cmask & (2 * Q + c < N),
            step, inv, noise_std, cfg_scale, n2, HAS_V, CFG, WRITE_V, NOISE)
    _update(x_row, v_row, vc_row, noise_row, out_row, vout_row, 3 * Q + c, cmask & (3 * Q + c < N),
            step, inv, noise_std, cfg_scale, n3, HAS_V, CFG, WRITE_V, NOISE)


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_noise_kernel(
    out_ptr, seed_ptr, offset_ptr, seed, offset, N, Q, out_stride,
    SEED_FROM_PTR: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    """The noise ε that ``_churn_step_kernel`` draws for (seed, offset), written out (same layout)."""
    pid = tl.program_id(0)
    row = tl.program_id(1)
    c = pid * BLOCK + tl.arange(0, BLOCK)
    cmask = c < Q
    seed_u, off_lo, off_hi = _rng_state(seed_ptr, offset_ptr, seed, offset, SEED_FROM_PTR, OFFSET_FROM_PTR)
    n0, n1, n2, n3 = _normal4(seed_u, c, row, off_lo, off_hi)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    ty = out_ptr.dtype.element_ty
    tl.store(out_row + c, n0.to(ty), mask=cmask & (c < N))
    tl.store(out_row + Q + c, n1.to(ty), mask=cmask & (Q + c < N))
    tl.store(out_row + 2 * Q + c, n2.to(ty), mask=cmask & (2 * Q + c < N))
    tl.store(out_row + 3 * Q + c, n3.to(ty), mask=cmask & (3 * Q + c < N))


# --------------------------------------------------------------------------- launchers


def _row_param(a, rows: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """A per-row scalar (float, 0-d, [1] or [rows] tensor, expanded views included) as (fp32 tensor, stride)."""
    if not isinstance(a, torch.Tensor):
        return torch.full((1,), float(a), dtype=torch.float32, device=device), 0
    a = a.reshape(-1)
    if a.numel() not in (1, rows):
        raise ValueError(f"per-row parameter has {a.numel()} values for {rows} rows")
    if a.dtype != torch.float32:
        a = a.float()
    return a, (0 if a.numel() == 1 else a.stride(0))


def _rng_arg(a, name: str, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """(tensor or None, int value): an integer tensor is read inside the kernel, an int is passed by value."""
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point or a.numel() != 1:
            raise ValueError(f"{name} tensor must hold one integer, got {a.dtype} {tuple(a.shape)}")
        if a.device != device:
            raise ValueError(f"{name} tensor is on {a.device}, the kernel runs on {device}")
        return a.reshape(1), 0
    a = int(a)
    if not 0 <= a < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {a}")
    return None, a


def _block(q: int, block: int | None) -> int:
    return block or min(1024, triton.next_power_of_2(max(1, q)))


def churn_step(
    x: torch.Tensor, v: torch.Tensor | None, t, s, gamma, noise: torch.Tensor | None = None, *,
    v_cond: torch.Tensor | None = None, cfg_scale: float | None = None,
    seed=None, offset=0, out: torch.Tensor | None = None, v_out: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """x' for all rows in one launch. See the module docstring for the maths.

    x:      [rows, ...] state at σ = t (fp32, bf16 or fp16; x' has its dtype)
    v:      [rows, ...] velocity; with ``v_cond``, the unconditional one (v = v + cfg_scale·(v_cond − v));
            None for the prior churn (then t = s = 1 is implied by the caller, see ``prior_churn``).
    t, s, gamma: per-row floats or tensors ([rows], [1], 0-d, or expanded views).
    noise:  [rows, ...] ε to use, or None to draw it in-kernel from (seed, offset).
    out:    optional [rows, ...] buffer for x' (may be x itself, or a row-strided view like xs[:, k+1]).
    v_out:  optional buffer that receives the velocity used (e.g. vs[:, k]).
    With gamma a Python 0.0 and no noise, no noise is drawn (plain Euler).
    """
    rows = x.shape[0]
    n = x[0].numel()
    device = check_device(_churn_step_kernel, x, v, v_cond, noise, out, v_out)
    for name, a in (("x", x), ("v", v), ("v_cond", v_cond), ("noise", noise)):
        if a is not None and (a.shape != x.shape or a.dtype not in FLOAT_TYPES):
            raise ValueError(f"churn_step kernel: {name} must match x's shape {tuple(x.shape)} with a float "
                             f"dtype in {FLOAT_TYPES}, got {tuple(a.shape)} {a.dtype}")
    if v_cond is not None and (v is None or cfg_scale is None):
        raise ValueError("churn_step: CFG needs v (unconditional), v_cond and cfg_scale")
    if noise is not None:
        noise_mode = NOISE_TENSOR
    elif not isinstance(gamma, torch.Tensor) and float(gamma) == 0.0:
        noise_mode = NOISE_NONE
    elif seed is None:
        raise ValueError("churn_step: pass a noise tensor or a seed for the in-kernel Philox noise")
    else:
        noise_mode = NOISE_PHILOX

    x2 = rows_view(x, rows)
    v2 = rows_view(v, rows) if v is not None else x2
    vc2 = rows_view(v_cond, rows) if v_cond is not None else v2
    nz2 = rows_view(noise, rows) if noise is not None else x2
    if out is None:
        out = empty(x.shape, x.dtype, device)
    o2 = out_view(out, rows, n, "out")
    vo2 = out_view(v_out, rows, n, "v_out") if v_out is not None else o2
    tt, t_stride = _row_param(t, rows, device)
    ss, s_stride = _row_param(s, rows, device)
    gg, g_stride = _row_param(gamma, rows, device)
    seed_t, seed_i = _rng_arg(seed if seed is not None else 0, "seed", device)
    off_t, off_i = _rng_arg(offset, "offset", device)

    q = triton.cdiv(n, 4)
    BLOCK = _block(q, block)
    _churn_step_kernel[(triton.cdiv(q, BLOCK), rows)](
        x2, v2, vc2, nz2, o2, vo2, tt, ss, gg,
        seed_t if seed_t is not None else tt, off_t if off_t is not None else tt, seed_i, off_i,
        float(cfg_scale) if cfg_scale is not None else 1.0,
        n, q,
        x2.stride(0), v2.stride(0), vc2.stride(0), nz2.stride(0), o2.stride(0), vo2.stride(0),
        t_stride, s_stride, g_stride,
        HAS_V=v is not None, CFG=v_cond is not None, WRITE_V=v_out is not None, NOISE=noise_mode,
        SEED_FROM_PTR=seed_t is not None, OFFSET_FROM_PTR=off_t is not None, BLOCK=BLOCK,
    )
    return out


def prior_churn(x: torch.Tensor, gamma, noise: torch.Tensor | None = None, *, seed=None, offset=0,
                out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """x/(1+γ₀) + sqrt((1+γ₀)² − 1)/(1+γ₀)·ε: ``churn_step`` without v at t = s = 1."""
    return churn_step(x, None, 1.0, 1.0, gamma, noise, seed=seed, offset=offset, out=out, block=block)


def churn_noise(shape, seed, offset=0, *, device, dtype: torch.dtype = torch.float32,
                block: int | None = None) -> torch.Tensor:
    """The ε [rows, ...] that ``churn_step(..., seed=seed, offset=offset)`` draws for tensors of ``shape``."""
    shape = tuple(shape)
    rows = shape[0]
    n = 1
    for k in shape[1:]:
        n *= k
    device = torch.device(device)
    if device.type != "cuda":
        check_device(_philox_noise_kernel, torch.empty(0, device=device))
    out = empty((rows, n), dtype, device)
    seed_t, seed_i = _rng_arg(seed, "seed", device)
    off_t, off_i = _rng_arg(offset, "offset", device)
    q = triton.cdiv(n, 4)
    BLOCK = _block(q, block)
    dummy = out
    _philox_noise_kernel[(triton.cdiv(q, BLOCK), rows)](
        out, seed_t if seed_t is not None else dummy, off_t if off_t is not None else dummy, seed_i, off_i,
        n, q, out.stride(0),
        SEED_FROM_PTR=seed_t is not None, OFFSET_FROM_PTR=off_t is not None, BLOCK=BLOCK,
    )
    return out.view(shape)
