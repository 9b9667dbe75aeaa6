"""The finite-difference flow loss (docs/algorithm.md §3): the PyTorch reference.

This is the ground truth that the fused Triton kernel (``fdfo.kernels.fd_loss``)
is tested against; both take the same arguments and return ``(loss, metrics)``.
"""

from __future__ import annotations

import torch

MS_EPS = 1e-6  # d̂ = d / (mean(d²) + MS_EPS)


def pair_delta(x0: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half-differences within each pair of interleaved rows (rows 2i and 2i+1).

    x0: [2P, ...] final latents, rewards: [2P].
    Returns d [2P, ...] with d_i = (x0_i − x0_j)/2, dR [2P] with dR_i = (R_i − R_j)/2,
    and the per-row mean square of d [2P].
    """
    if x0.shape[0] % 2 or rewards.shape != x0.shape[:1]:
        raise ValueError(f"pair_delta needs [2P, ...] latents and [2P] rewards, got {tuple(x0.shape)} "
                         f"and {tuple(rewards.shape)}")
    partner = torch.arange(x0.shape[0], device=x0.device) ^ 1  # 2i <-> 2i+1
    d = (x0 - x0[partner]) / 2
    dR = (rewards - rewards[partner]) / 2
    ms = d.float().pow(2).flatten(1).mean(1)
    return d, dR, ms


def fdfo_loss(
    v: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor, clip_range: float,
    ms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPO-style surrogate of the finite-difference objective, averaged over rows.

    v:     [rows, ...] current velocity prediction (carries the gradient)
    v_ref: [rows, ...] velocity used while sampling
    d:     [rows, ...] raw pair half-difference of the final latents
    dR:    [rows]      pair half-difference of rewards
    ms:    [rows]      mean(d²) of each row, as ``pair_delta`` returns it (indexed like d), or
                       None to compute it here; sampled data, it gets no gradient

        d̂      = d / (mean(d²) + 1e-6)
        log r  = lp − lp_ref = −mean((v − v_ref + d̂)²) + mean(d̂²)
               = −mean(δ·(δ + 2d̂)),  δ = v − v_ref
        loss_i = −dR·r + |dR|/(2·clip)·(r − 1)²

    The log-ratio is computed in the second (expanded) form: lp and lp_ref are
    each about −1/mean(d²), which can be 1e4 in size, and subtracting them in
    fp32 would lose the small difference that the ratio is made of.
    """
    dims = tuple(range(1, v.ndim))
    d32 = d.float()
    if ms is None:
        ms = d32.pow(2).mean(dims, keepdim=True)
    elif ms.numel() != v.shape[0]:
        raise ValueError(f"fdfo_loss: ms must hold one mean square per row ({v.shape[0]}), got {tuple(ms.shape)}")
    else:
        ms = ms.detach().float().reshape(-1, *[1] * (v.ndim - 1))
    d_hat = d32 / (ms + MS_EPS)
    delta = v.float() - v_ref.float()
    log_ratio = -(delta * (delta + 2 * d_hat)).mean(dims)  # [rows]
    ratio = log_ratio.exp()
    dR = dR.float()
    per_row = -dR * ratio + dR.abs() / (2 * clip_range) * (ratio - 1).pow(2)
    loss = per_row.mean()
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
            "ratio": ratio.mean(),
        }
    return loss, metrics
