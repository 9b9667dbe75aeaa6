"""Paired sampling with churn (docs/algorithm.md §1).

A batch of P prompts gives 2P trajectories stored interleaved (pair i owns rows
2i and 2i+1). Both rows of a pair start from the same Gaussian latent; a small
amount of fresh noise ("churn") at the prior and at every step makes them drift
apart, so that their endpoints differ by a small, reward-relevant amount.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from fdfo.config import above, at_least, check, choices

Scalar = Union[float, torch.Tensor]  # a Python float or a per-row tensor [rows]


def _per_row(a: Scalar, x: torch.Tensor) -> Scalar:
    """Broadcast a per-row tensor [rows] against x [rows, ...]; floats pass through."""
    if isinstance(a, torch.Tensor):
        return a.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return a


def _sqrt(a: Scalar) -> Scalar:
    return a.sqrt() if isinstance(a, torch.Tensor) else math.sqrt(a)


def prior_churn(x: torch.Tensor, gamma: Scalar, noise: torch.Tensor) -> torch.Tensor:
    """x/(1+γ₀) + sqrt((1+γ₀)² − 1)/(1+γ₀)·ε: keeps unit variance, decorrelates the pair slightly."""
    g = _per_row(gamma, x)
    return (x + _sqrt((1 + g) ** 2 - 1) * noise) / (1 + g)


def churn_step(x: torch.Tensor, v: torch.Tensor, t: Scalar, s: Scalar, gamma: Scalar,
               noise: torch.Tensor) -> torch.Tensor:
    """One overshoot-Euler step from σ=t to σ=s with churn γ, then fresh noise.

        r   = s / (1 + γ − γ·s)                       (overshoot time, r ≤ s)
        x_r = x + (r − t)·v
        x'  = x_r/(1 + γ·r) + r·sqrt((1+γ)² − 1)/(1 + γ·r)·ε

    lands on the σ=s marginal: data weight (1 − s), noise std s. γ=0 is Euler.
    Pure and free of host synchronisation (t, s, γ are floats or per-row tensors).
    """
    t, s, g = _per_row(t, x), _per_row(s, x), _per_row(gamma, x)
    r = s / (1 + g - g * s)
    x_r = x + (r - t) * v
    return (x_r + r * _sqrt((1 + g) ** 2 - 1) * noise) / (1 + g * r)


# --------------------------------------------------------------------------- churn schedules

@dataclass(frozen=True)
class RawChurn:
    """raw: the same γ at the prior and at every step but the last."""

    weight: float = field(default=0.0025, metadata=check(at_least(0)))  # γ (the published default)


@dataclass(frozen=True)
class PriorChurn:
    """prior: churn at the prior only, γ₀ = exp(w) − 1 with w = weight·exp(weight_sigma·z), z ~ N(0, 1)
    drawn per pair."""

    weight: float = field(default=0.1, metadata=check(at_least(0)))  # the median of w
    # The spread of log w across pairs; 0 = the same w for every pair.
    weight_sigma: float = field(default=1.0, metadata=check(at_least(0)))


@dataclass(frozen=True)
class IntervalChurn:
    """interval: churn around one time per pair, a logit-normal bump over the σ grid scaled so that
    log(1 + γ) sums to w = weight·exp(weight_sigma·z) over the grid."""

    mu: float = 1.0  # the mean of the bump's centre, logit(σ) (1.0: σ ≈ 0.73)
    # The std of the centre across pairs, in logit space; 0 = a fixed centre.
    sigma: float = field(default=1.5, metadata=check(at_least(0)))
    weight: float = field(default=1.0, metadata=check(at_least(0)))  # the median of w, the total log(1 + γ)
    # The spread of log w across pairs; 0 = the same w for every pair.
    weight_sigma: float = field(default=0.0, metadata=check(at_least(0)))
    soft_sigma: float = field(default=0.25, metadata=check(above(0)))  # the bump's width, the logit-normal scale


# name -> its parameters; the churn section has one subsection of each.
SCHEDULES: dict[str, type] = {"raw": RawChurn, "prior": PriorChurn, "interval": IntervalChurn}
CHURN_SCHEDULES = tuple(SCHEDULES)


@dataclass(frozen=True)
class ChurnConfig:
    """Fresh noise ("churn") that makes the two rows of a pair drift apart (docs/algorithm.md §1.4): the
    schedule, and each schedule's parameters (only the chosen schedule's are read)."""

    # The schedule: raw, prior or interval (the subsection of that name holds its parameters).
    schedule: str = field(default="raw", metadata=choices(*SCHEDULES, replaced={
        "first": "the published 'prior' schedule (churn at the prior only, churn.prior.*)",
        "logit_normal": "the published 'interval' schedule (churn around one random time per pair, churn.interval.*)"}))
    raw: RawChurn = field(default_factory=RawChurn)
    prior: PriorChurn = field(default_factory=PriorChurn)
    interval: IntervalChurn = field(default_factory=IntervalChurn)

    def amounts(self, sigmas: torch.Tensor, rows: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen schedule's per-row churn amounts (``churn_schedule``)."""
        params = dataclasses.asdict(getattr(self, self.schedule))
        return churn_schedule(self.schedule, sigmas=sigmas, rows=rows, generator=generator, **params)


def _pair_draws(pairs: int, mean: float, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """mean + std·z, z ~ N(0, 1), one draw per pair, float64 [pairs]."""
    return mean + std * torch.randn(pairs, generator=generator, dtype=torch.float64)


def churn_schedule(name: str, weight: float, sigmas: torch.Tensor, rows: int,
                   generator: torch.Generator | None = None, *, weight_sigma: float = 0.0, mu: float = 0.0,
                   sigma: float = 0.0, soft_sigma: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row churn amounts (docs/algorithm.md §1.4): (γ_prior [rows], γ_steps [T, rows]), float64 on the CPU.

    The schedule lives on the σ grid σ_0 = 1 > … > σ_T = 0: the prior takes its value at σ_0, step k
    (σ_k → σ_{k+1}) the value at σ_{k+1}, and the last step always 0. Rows 2i and 2i+1 (one pair) get
    the same amounts; the random draws are one per pair, from ``generator`` (raw draws nothing; interval
    draws the centres, then the weights).

    raw:      γ = weight at the prior and every step but the last (the published default, 0.0025).
    prior:    churn at the prior only: w = weight·exp(weight_sigma·z), z ~ N(0, 1), γ₀ = exp(w) − 1.
    interval: churn around one random time: a centre c ~ N(mu, sigma) in logit space and w as in
              ``prior``; the logit-normal density (location c, scale soft_sigma) on the grid, 0 at
              σ = 0 and σ = 1, normalised to sum 1 over the grid, times w, gives γ = exp(value) − 1.
              (The prior gets none, as σ_0 = 1.)
    """
    T = sigmas.numel() - 1
    pairs = (rows + 1) // 2
    steps = torch.zeros(T, rows, dtype=torch.float64)
    prior = torch.zeros(rows, dtype=torch.float64)
    if name == "raw":
        steps[:] = weight
        prior[:] = weight
    elif name == "prior":
        w = weight * torch.exp(_pair_draws(pairs, 0.0, weight_sigma, generator))
        prior[:] = torch.expm1(w).repeat_interleave(2)[:rows]
    elif name == "interval":
        c = _pair_draws(pairs, mu, sigma, generator)  # [pairs] centres in logit space
        w = weight * torch.exp(_pair_draws(pairs, 0.0, weight_sigma, generator))  # [pairs]
        sig = sigmas.detach().to("cpu", torch.float64).view(-1, 1)  # [T + 1, 1]
        inside = (sig > 0) & (sig < 1)
        s = sig.clamp(1e-300, 1 - 1e-16)
        logit = torch.log(s) - torch.log1p(-s)
        # log of the logit-normal density up to a constant (the constant cancels in the normalisation),
        # -inf at σ = 0 and σ = 1; normalising in log space keeps a far-off centre from underflowing to 0/0.
        log_p = -torch.log(s) - torch.log1p(-s) - (logit - c.view(1, -1)) ** 2 / (2 * soft_sigma**2)
        log_p = torch.where(inside, log_p, torch.tensor(-math.inf, dtype=torch.float64))  # [T + 1, pairs]
        if bool(inside.any()):
            value = torch.exp(log_p - torch.logsumexp(log_p, dim=0, keepdim=True)) * w.view(1, -1)
        else:  # no grid point inside (0, 1): nothing to churn
            value = torch.zeros_like(log_p)
        gamma = torch.expm1(value).repeat_interleave(2, dim=1)[:, :rows]  # [T + 1, rows]
        prior[:] = gamma[0]
        steps[:] = gamma[1:]
    else:
        raise ValueError(f"unknown churn schedule '{name}'; valid: {', '.join(CHURN_SCHEDULES)}")
    if T >= 1:
        steps[-1] = 0.0
    return prior, steps


# --------------------------------------------------------------------------- the sampler


@dataclass
class Trajectories:
    """Everything training needs from one micro-batch of paired samples."""

    xs: torch.Tensor  # [2P, T, C, H, W] state entering each step
    vs: torch.Tensor  # [2P, T, C, H, W] velocity used at each step
    x0: torch.Tensor  # [2P, C, H, W] final state


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,...], σ [B]) -> v


@torch.no_grad()
def sample_pairs(
    velocity: VelocityFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    gamma_prior: torch.Tensor,
    gamma_steps: torch.Tensor,
    generator: torch.Generator | None,
    store_dtype: torch.dtype | None = None,
) -> Trajectories:
    """Paired trajectories from one Gaussian latent per pair.

    velocity: closure (x, σ) -> v for the 2P rows (conditioning and CFG are bound in it).
    latents:  [P, C, H, W] one Gaussian latent per pair.
    sigmas:   [T + 1] σ grid; gamma_prior [2P] and gamma_steps [T, 2P] from ``churn_schedule``.
    """
    x = latents.repeat_interleave(2, dim=0)  # [2P, C, H, W], both branches identical
    rows, T = x.shape[0], sigmas.numel() - 1
    store_dtype = store_dtype or x.dtype
    xs = torch.empty(rows, T, *x.shape[1:], dtype=store_dtype, device=x.device)
    vs = torch.empty_like(xs)
    # Per-step coefficients precomputed on the device: nothing in the loop reads back to the host.
    sig = sigmas.to(device=x.device, dtype=torch.float32)
    g_prior = gamma_prior.to(device=x.device, dtype=torch.float32)
    g_steps = gamma_steps.to(device=x.device, dtype=torch.float32)

    def noise() -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    x = prior_churn(x, g_prior, noise())
    for k in range(T):
        t = sig[k].expand(rows)
        xs[:, k] = x
        v = velocity(x, t)
        vs[:, k] = v
        x = churn_step(x, v.to(x.dtype), t, sig[k + 1].expand(rows), g_steps[k], noise())
    return Trajectories(xs=xs, vs=vs, x0=x)


@torch.no_grad()
def sample_deterministic(velocity: VelocityFn, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Plain Euler (γ = 0 everywhere) from latents [B, C, H, W]: the evaluation sampler."""
    x = latents
    sig = sigmas.to(device=x.device, dtype=torch.float32)
    rows = x.shape[0]
    zero = torch.zeros_like(x)
    for k in range(sig.numel() - 1):
        t = sig[k].expand(rows)
        x = churn_step(x, velocity(x, t).to(x.dtype), t, sig[k + 1].expand(rows), 0.0, zero)
    return x
