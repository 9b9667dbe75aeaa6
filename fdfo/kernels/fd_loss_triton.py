"""Fused finite-difference loss (docs/algorithm.md §3): loss, metrics and ∂loss/∂v from one read of the inputs.

Reference: ``fdfo.loss.fdfo_loss`` (same arguments, same ``(loss, metrics)``).

Per row i of a micro-batch (v, v_ref, d flattened to N elements, δ = v − v_ref):

    ms      = Σ d² / N,             s  = 1/(ms + 1e-6)          (d̂ = s·d)
    log r   = −mean(δ·(δ + 2d̂)) = −(Σ δ² + 2s·Σ δd) / N         (expanded form: no lp − lp_ref)
    loss_i  = −dR·r + |dR|/(2·clip)·(r − 1)²
    ∂loss/∂v_i = (1/rows)·(∂loss_i/∂r)·r·(−2/N)·(δ + s·d),   ∂loss_i/∂r = −dR + |dR|/clip·(r − 1)

Everything a row needs reduces to three sums, Σd², Σδ², Σδd; the gradient is then
an elementwise function of δ and d scaled by two per-row numbers. The gradient
cannot be written before all three sums of its row are complete, and a row is
too long for one program (65 536 elements at 512², 262 144 at 1024², three
inputs), while a micro-batch has too few rows (2–26) to fill a GPU with one
program per row. So the row is split over chunks and the work runs in two phases:

  phase 1  grid (chunks, rows): each program reads its chunk of v, v_ref, d once
           and writes the three partial sums to a [3, rows, chunks] fp32 buffer
           (a few KB).
  phase 2  grid (chunks, rows): each program re-reduces its row's partials (a
           [chunks] load, ≤ 256 values), derives s, r, loss_i and the gradient
           coefficient, and writes ∂loss/∂v for its chunk. Chunk 0 of each row
           writes the row's loss, ratio and clip flag; program (0, 0) also
           reduces all rows to the scalar loss, clip fraction and mean ratio, so
           no PyTorch reduction (and no host synchronisation) follows.

Phase 2 reads v, v_ref and d again. At training shapes the three inputs of a
micro-batch (12 rows × 65 536 × 2 B × 3 = 4.7 MB in bf16 at 512²) sit in the
GPU's L2 cache (50 MB on H100) when phase 2 starts, so DRAM traffic stays close
to the minimum: three reads and one write. A single-launch alternative (a grid-
wide barrier after phase 1) needs a cooperative launch or spinning on atomics,
deadlocks in the interpreter, and saves only one launch. The per-row
finalisation is folded into phase 2 instead of a launch of its own: every
program recomputes it from the partials, which costs less than a launch.

With ``ms`` given. Phase 2 needs the inputs again only because the gradient
needs s, and s needs the whole row's Σ d². The caller usually has it: ``pair_delta``
writes ms = mean(d²) beside d. Given ms [rows] (indexed like d), s is known before
any sum and the work is rearranged:

  phase 1  sums Σ δ², Σ δd only, and also writes the gradient's direction
           u = δ + s·d of its chunk into the gradient buffer;
  phase 2  reads u alone and scales it in place by the row's coefficient:
           v, v_ref and d are not read again.

Per element that is three reads and a write of u, then a read and a write of u,
instead of three reads, then three reads and a write: with fp32 throughout 24
bytes instead of 28, with bf16 throughout 12 instead of 14, with fp32 velocities
against bf16 v_ref and d the same 20. It counts where the inputs no longer fit in
L2 between the phases (26 rows at 1024²: 82 MB in fp32). ``pair_delta`` sums the
squares over the same chunks in the same order as phase 1, so with its ms the
results are those of ms=None, except that a bf16 gradient is rounded twice (u,
then coef·u): up to one more ulp.

Sums are accumulated in fp32 whatever the input dtype (loads are cast to fp32,
the gradient is cast to v's dtype on store). ``FDLossFunction`` stores the
gradient written in the forward; its backward only scales it by grad_output
(in place: peak extra memory is one gradient-sized tensor). With
``v.requires_grad`` false, phase 2 runs one program per row and writes no
gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fdfo.loss import MS_EPS

from .launch import FLOAT_TYPES, check_device, empty, launch_config, next_pow2, rows_view


@triton.jit
def _load_tile(v_row, vref_row, d_row, offs, mask):
    """δ = v − v_ref and d over one tile of a row, in fp32 (masked-off lanes are 0)."""
    v = tl.load(v_row + offs, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(vref_row + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_row + offs, mask=mask, other=0.0).to(tl.float32)
    return v - vr, d


@triton.jit
def _partial_sums_kernel(
    v_ptr, vref_ptr, d_ptr, ms_ptr, dir_ptr, part_ptr,
    N, rows, C, v_stride, vref_stride, d_stride, dir_stride, eps,
    MS_GIVEN: tl.constexpr, WRITE_DIR: tl.constexpr, TILES: tl.constexpr, BLOCK: tl.constexpr,
):
    """Phase 1: part[:, row, chunk] = (Σ d², Σ δ², Σ δ·d) over the chunk.

    MS_GIVEN: the row's mean(d²) is read from ms (Σ d² is not summed, part[0] is left unwritten);
    with WRITE_DIR the chunk's gradient direction δ + d/(ms + eps) is written to dir.
    """
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    v_row = v_ptr + row64 * v_stride
    vref_row = vref_ptr + row64 * vref_stride
    d_row = d_ptr + row64 * d_stride
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_xx = tl.zeros([BLOCK], dtype=tl.float32)
    acc_xd = tl.zeros([BLOCK], dtype=tl.float32)
    if MS_GIVEN:
        inv_ms = 1.0 / (tl.load(ms_ptr + row).to(tl.float32) + eps)
    for i in tl.static_range(TILES):
        offs = (chunk * TILES + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        delta, d = _load_tile(v_row, vref_row, d_row, offs, mask)
        if not MS_GIVEN:
            acc_dd += d * d
        acc_xx += delta * delta
        acc_xd += delta * d
        if WRITE_DIR:
            dir_row = dir_ptr + row64 * dir_stride
            tl.store(dir_row + offs, (delta + inv_ms * d).to(dir_ptr.dtype.element_ty), mask=mask)
    out = part_ptr + row * C + chunk
    if not MS_GIVEN:
        tl.store(out, tl.sum(acc_dd, axis=0))
    tl.store(out + rows * C, tl.sum(acc_xx, axis=0))
    tl.store(out + 2 * rows * C, tl.sum(acc_xd, axis=0))


@triton.jit
def _row_terms(ms, s_xx, s_xd, dR, inv_n, inv_rows, clip, eps):
    """Per-row scalars from mean(d²) and the two sums (elementwise: works on one row or a block of rows)."""
    inv_ms = 1.0 / (ms + eps)  # d̂ = inv_ms·d
    ratio = tl.exp(-(s_xx + 2.0 * inv_ms * s_xd) * inv_n)
    loss = -dR * ratio + tl.abs(dR) / (2.0 * clip) * (ratio - 1.0) * (ratio - 1.0)
    dloss_dratio = -dR + tl.abs(dR) / clip * (ratio - 1.0)
    coef = dloss_dratio * ratio * (-2.0 * inv_n) * inv_rows  # ∂loss/∂v = coef·(δ + inv_ms·d)
    return inv_ms, ratio, loss, coef


@triton.jit
def _finish_kernel(
    v_ptr, vref_ptr, d_ptr, ms_ptr, dR_ptr, part_ptr, grad_ptr, row_ptr, loss_ptr, metric_ptr,
    N, rows, C, inv_n, inv_rows, clip, eps,
    v_stride, vref_stride, d_stride, grad_stride,
    MS_GIVEN: tl.constexpr, WRITE_GRAD: tl.constexpr, TILES: tl.constexpr, BLOCK: tl.constexpr,
    C_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
):
    """Phase 2: row scalars from the partials, then ∂loss/∂v for this chunk; chunk 0 writes the metrics.

    MS_GIVEN: mean(d²) comes from ms, and grad already holds the direction δ + d̂ (phase 1 wrote it),
    which is scaled in place: v, v_ref and d are not read.
    """
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    c = tl.arange(0, C_BLOCK)
    cmask = c < C
    part_row = part_ptr + row * C
    if MS_GIVEN:
        ms = tl.load(ms_ptr + row).to(tl.float32)
    else:
        ms = tl.sum(tl.load(part_row + c, mask=cmask, other=0.0), axis=0) * inv_n
    s_xx = tl.sum(tl.load(part_row + rows * C + c, mask=cmask, other=0.0), axis=0)
    s_xd = tl.sum(tl.load(part_row + 2 * rows * C + c, mask=cmask, other=0.0), axis=0)
    dR = tl.load(dR_ptr + row).to(tl.float32)
    inv_ms, ratio, loss, coef = _row_terms(ms, s_xx, s_xd, dR, inv_n, inv_rows, clip, eps)

    if WRITE_GRAD:
        row64 = row.to(tl.int64)
        g_row = grad_ptr + row64 * grad_stride
        if MS_GIVEN:
            for i in tl.static_range(TILES):
                offs = (chunk * TILES + i) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < N
                u = tl.load(g_row + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(g_row + offs, (coef * u).to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            v_row = v_ptr + row64 * v_stride
            vref_row = vref_ptr + row64 * vref_stride
            d_row = d_ptr + row64 * d_stride
            for i in tl.static_range(TILES):
                offs = (chunk * TILES + i) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < N
                delta, d = _load_tile(v_row, vref_row, d_row, offs, mask)
                g = coef * (delta + inv_ms * d)
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

    if chunk == 0:
        tl.store(row_ptr + row, loss)
        tl.store(row_ptr + rows + row, ratio)
        tl.store(row_ptr + 2 * rows + row, tl.where(tl.abs(ratio - 1.0) > clip, 1.0, 0.0))
        if row == 0:
            # All rows at once (a [R_BLOCK, C_BLOCK] tile of partials): the batch means.
            r = tl.arange(0, R_BLOCK)
            rmask = r < rows
            m2 = rmask[:, None] & cmask[None, :]
            idx = r[:, None] * C + c[None, :]
            if MS_GIVEN:
                MS = tl.load(ms_ptr + r, mask=rmask, other=0.0).to(tl.float32)
            else:
                MS = tl.sum(tl.load(part_ptr + idx, mask=m2, other=0.0), axis=1) * inv_n
            S_xx = tl.sum(tl.load(part_ptr + rows * C + idx, mask=m2, other=0.0), axis=1)
            S_xd = tl.sum(tl.load(part_ptr + 2 * rows * C + idx, mask=m2, other=0.0), axis=1)
            dRs = tl.load(dR_ptr + r, mask=rmask, other=0.0).to(tl.float32)
            _, ratios, losses, _ = _row_terms(MS, S_xx, S_xd, dRs, inv_n, inv_rows, clip, eps)
            clipped = rmask & (tl.abs(ratios - 1.0) > clip)
            # Divided by rows (not multiplied by 1/rows): rounded like the reference's mean.
            tl.store(loss_ptr, tl.sum(tl.where(rmask, losses, 0.0), axis=0) / rows)
            tl.store(metric_ptr, tl.sum(tl.where(clipped, 1.0, 0.0), axis=0) / rows)
            tl.store(metric_ptr + 1, tl.sum(tl.where(rmask, ratios, 0.0), axis=0) / rows)


def fd_loss_forward(
    v: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor, clip_range: float,
    ms: torch.Tensor | None = None, write_grad: bool = True, block: int | None = None,
    max_chunks: int | None = None,
):
    """Launch both phases. Returns loss [] fp32, metrics [2] fp32 (clipfrac, mean ratio),
    row stats [3, rows] fp32 (loss_i, ratio_i, clip flag_i) and ∂loss/∂v (v's shape and dtype) or None.

    ms: per-row mean(d²) [rows] as ``pair_delta`` returns it (indexed like d), or None to sum it here.
    """
    if v.shape != v_ref.shape or v.shape != d.shape or dR.numel() != v.shape[0]:
        raise ValueError(f"fd_loss needs v, v_ref, d of one shape [rows, ...] and dR [rows]; got "
                         f"{tuple(v.shape)}, {tuple(v_ref.shape)}, {tuple(d.shape)}, {tuple(dR.shape)}")
    if ms is not None and ms.numel() != v.shape[0]:
        raise ValueError(f"fd_loss: ms must hold one mean square per row ({v.shape[0]}), got {tuple(ms.shape)}")
    for name, a in (("v", v), ("v_ref", v_ref), ("d", d)):
        if a.dtype not in FLOAT_TYPES:
            raise TypeError(f"fd_loss kernel: {name} has dtype {a.dtype}; supported: {FLOAT_TYPES}")
    device = check_device(_finish_kernel, v, v_ref, d, dR, ms)
    rows = v.shape[0]
    n = v[0].numel()
    v2, vr2, d2 = (rows_view(a, rows) for a in (v, v_ref, d))
    dR1 = dR.reshape(rows).contiguous()
    ms1 = ms.detach().reshape(rows).contiguous() if ms is not None else dR1  # (unused pointer without ms)
    BLOCK, TILES, C = launch_config(n, block, max_chunks)

    f32 = torch.float32
    part = empty((3, rows, C), f32, device)
    row_stats = empty((3, rows), f32, device)
    loss = empty((), f32, device)
    metrics = empty((2,), f32, device)
    grad = empty((rows, n), v.dtype, device) if write_grad else None

    g = grad if write_grad else v2  # unused pointer when no gradient is written
    _partial_sums_kernel[(C, rows)](
        v2, vr2, d2, ms1, g, part, n, rows, C, v2.stride(0), vr2.stride(0), d2.stride(0), g.stride(0), MS_EPS,
        MS_GIVEN=ms is not None, WRITE_DIR=write_grad and ms is not None, TILES=TILES, BLOCK=BLOCK,
    )
    _finish_kernel[(C if write_grad else 1, rows)](
        v2, vr2, d2, ms1, dR1, part, g, row_stats, loss, metrics,
        n, rows, C, 1.0 / n, 1.0 / rows, float(clip_range), MS_EPS,
        v2.stride(0), vr2.stride(0), d2.stride(0), g.stride(0),
        MS_GIVEN=ms is not None, WRITE_GRAD=write_grad, TILES=TILES, BLOCK=BLOCK,
        C_BLOCK=next_pow2(C), R_BLOCK=next_pow2(rows),
    )
    return loss, metrics, row_stats, (grad.view(v.shape) if write_grad else None)


class FDLossFunction(torch.autograd.Function):
    """loss, metrics [2], row_stats [3, rows] = FDLossFunction.apply(v, v_ref, d, dR, clip_range[, ms]).

    The forward writes ∂loss/∂v; the backward scales it by grad_output (in place) and
    returns it. v_ref, d, dR and ms are sampled data: they get no gradient. The stored
    gradient is consumed by the first backward (retain_graph cannot replay it).
    """

    @staticmethod
    def forward(ctx, v, v_ref, d, dR, clip_range, ms=None):
        loss, metrics, row_stats, grad = fd_loss_forward(v, v_ref, d, dR, clip_range, ms,
                                                         write_grad=ctx.needs_input_grad[0])
        ctx.grad_v = grad
        ctx.mark_non_differentiable(metrics, row_stats)
        return loss, metrics, row_stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_metrics, _grad_rows):
        grad = ctx.grad_v
        if grad is None:
            raise RuntimeError("FDLossFunction: the gradient stored by the forward was already used "
                               "(a second backward through the same graph is not supported)")
        ctx.grad_v = None
        return grad.mul_(grad_loss), None, None, None, None, None


def fd_loss(
    v: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor, clip_range: float,
    ms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drop-in for ``fdfo.loss.fdfo_loss``: (loss, {policy_loss, clipfrac, ratio}), via the Triton kernels."""
    loss, metrics, _ = FDLossFunction.apply(v, v_ref, d, dR, float(clip_range), ms)
    return loss, {"policy_loss": loss.detach(), "clipfrac": metrics[0], "ratio": metrics[1]}
