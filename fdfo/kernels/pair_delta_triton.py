"""Pair half-differences (docs/algorithm.md §2): d, dR and the per-row mean square of d in one read of x₀.

Reference: ``fdfo.loss.pair_delta`` (same arguments, same ``(d, dR, ms)``).

Pair p owns rows 2p (a) and 2p+1 (b):

    d_a = (x₀_a − x₀_b)/2,  d_b = −d_a,   dR_a = (R_a − R_b)/2,  dR_b = −dR_a
    ms_a = ms_b = mean(d_a²)               (of d as stored, i.e. after rounding to x₀'s dtype)

A program reads one chunk of both rows of its pair and writes both rows of d,
so x₀ is read once and d written once. The mean square needs the whole row:
each program writes its chunk's Σ d² to a [pairs, chunks] buffer, and a second,
tiny launch (one program per pair, reading only that buffer) sums the chunks in
a fixed order and writes ms to both rows. That keeps the result deterministic
(no float atomics) at the cost of one small launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import FLOAT_TYPES, check_device, empty, launch_config, next_pow2, rows_view


@triton.jit
def _pair_delta_kernel(
    x_ptr, r_ptr, d_ptr, dR_ptr, part_ptr,
    N, C, x_stride, d_stride,
    TILES: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    pair = tl.program_id(1)
    row_a = (2 * pair).to(tl.int64)
    xa_row = x_ptr + row_a * x_stride
    xb_row = xa_row + x_stride
    da_row = d_ptr + row_a * d_stride
    db_row = da_row + d_stride
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(TILES):
        offs = (chunk * TILES + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        xa = tl.load(xa_row + offs, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(xb_row + offs, mask=mask, other=0.0).to(tl.float32)
        # Round to the stored dtype first, then negate in fp32: d_b = −d_a exactly, and
        # the mean square is that of d as stored (no arithmetic on bf16 values).
        da = ((xa - xb) * 0.5).to(d_ptr.dtype.element_ty).to(tl.float32)
        tl.store(da_row + offs, da.to(d_ptr.dtype.element_ty), mask=mask)
        tl.store(db_row + offs, (-da).to(d_ptr.dtype.element_ty), mask=mask)
        acc += da * da
    tl.store(part_ptr + pair * C + chunk, tl.sum(acc, axis=0))
    if chunk == 0:
        ra = tl.load(r_ptr + 2 * pair).to(tl.float64)
        rb = tl.load(r_ptr + 2 * pair + 1).to(tl.float64)
        dRa = ((ra - rb) * 0.5).to(dR_ptr.dtype.element_ty)
        tl.store(dR_ptr + 2 * pair, dRa)
        tl.store(dR_ptr + 2 * pair + 1, -dRa)


@triton.jit
def _pair_ms_kernel(part_ptr, ms_ptr, C, inv_n, C_BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    c = tl.arange(0, C_BLOCK)
    ms = tl.sum(tl.load(part_ptr + pair * C + c, mask=c < C, other=0.0), axis=0) * inv_n
    tl.store(ms_ptr + 2 * pair, ms)
    tl.store(ms_ptr + 2 * pair + 1, ms)


def pair_delta(x0: torch.Tensor, rewards: torch.Tensor, block: int | None = None,
               max_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d [2P, ...] (x₀'s dtype), dR [2P] (rewards' dtype), ms [2P] fp32, via the Triton kernels."""
    if x0.shape[0] % 2 or rewards.shape != x0.shape[:1]:
        raise ValueError(f"pair_delta needs [2P, ...] latents and [2P] rewards, got {tuple(x0.shape)} "
                         f"and {tuple(rewards.shape)}")
    if x0.dtype not in FLOAT_TYPES:
        raise TypeError(f"pair_delta kernel: x0 has dtype {x0.dtype}; supported: {FLOAT_TYPES}")
    device = check_device(_pair_delta_kernel, x0, rewards)
    rows = x0.shape[0]
    pairs = rows // 2
    n = x0[0].numel()
    x2 = rows_view(x0, rows)
    r1 = rewards.contiguous()
    BLOCK, tiles, C = launch_config(n, block, max_chunks)

    d = empty((rows, n), x0.dtype, device)
    dR = empty((rows,), rewards.dtype, device)
    ms = empty((rows,), torch.float32, device)
    part = empty((pairs, C), torch.float32, device)
    _pair_delta_kernel[(C, pairs)](x2, r1, d, dR, part, n, C, x2.stride(0), d.stride(0),
                                   TILES=tiles, BLOCK=BLOCK)
    _pair_ms_kernel[(pairs,)](part, ms, C, 1.0 / n, C_BLOCK=next_pow2(C))
    return d.view(x0.shape), dR, ms
