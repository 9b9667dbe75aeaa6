"""Independent float64 references the tests compare the product against."""

import torch


def fd_loss_gold(v, v_ref, d, dR, clip, ms=None):
    """docs/algorithm.md §3 written literally (lp and lp_ref separately) in float64.

    ms: the rows' mean(d²), or None to compute it from d. Returns (loss, per-row ratio, per-row loss).
    """
    v, v_ref, d, dR = (a.double() for a in (v, v_ref, d, dR))
    dims = tuple(range(1, v.ndim))
    ms = (d**2).mean(dims, keepdim=True) if ms is None else ms.double().view(-1, *[1] * len(dims))
    d_hat = d / (ms + 1e-6)
    v_tgt = v_ref - d_hat
    lp = -((v - v_tgt) ** 2).mean(dims)
    lp_ref = -(d_hat**2).mean(dims)
    ratio = torch.exp(lp - lp_ref)
    per_row = -dR * ratio + dR.abs() / (2 * clip) * (ratio - 1) ** 2
    return per_row.mean(), ratio, per_row
