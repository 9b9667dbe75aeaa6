"""Flow-GRPO, the per-step policy-gradient baseline (ALGORITHM.md §6), in the same trainer.

The deterministic flow sampler becomes a reverse SDE with noise level ``a``;
each denoising step is a Gaussian policy action with a closed-form
log-probability, and the PPO-clipped objective reinforces the steps of
trajectories whose reward beats their group's mean:

    σ_t  = a·sqrt(σ/(1 − σ))          (at σ = 1 the next grid value is used)
    mean = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²(1 − σ)/(2σ))·dt,   dt = s − σ < 0
    x'   = mean + σ_t·sqrt(−dt)·ε
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_coefficients(sigma: float, s: float, noise_level: float) -> tuple[float, float, float, float]:
    """Per-step constants (x weight, v weight, step std, σ_t) of the reverse SDE step from σ to s."""
    dt = s - sigma
    sig_noise = s if sigma >= 1.0 else sigma  # σ/(1 − σ) is infinite at σ = 1: use the next grid value
    sigma_t = noise_level * math.sqrt(sig_noise / (1 - sig_noise)) if sig_noise < 1 else 0.0
    x_w = 1 + sigma_t**2 * dt / (2 * sigma)
    v_w = (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return x_w, v_w, sigma_t * math.sqrt(-dt), sigma_t


def sde_mean(x: torch.Tensor, v: torch.Tensor, sigma: float, s: float, noise_level: float) -> torch.Tensor:
    x_w, v_w, _, _ = sde_coefficients(sigma, s, noise_level)
    return x * x_w + v * v_w


def gaussian_logp(x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x_next; mean, std²) averaged over the dimensions of each row: [B]."""
    std = std if isinstance(std, torch.Tensor) else torch.tensor(std, dtype=torch.float32, device=mean.device)
    std = std.view(-1, *([1] * (mean.ndim - 1))) if std.ndim == 1 else std
    logp = -((x_next.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return logp.flatten(1).mean(1)


@dataclass
class SDETrajectories:
    xs: torch.Tensor  # [B, T + 1, C, H, W] every state, the final sample last
    logps: torch.Tensor  # [B, T] log-probability of each step under the sampling policy


@torch.no_grad()
def sample_sde(velocity, latents: torch.Tensor, sigmas: torch.Tensor, noise_level: float,
               generator: torch.Generator | None) -> SDETrajectories:
    """Independent SDE trajectories from latents [B, C, H, W] (one row per image)."""
    B, T = latents.shape[0], sigmas.numel() - 1
    sig = [float(v) for v in sigmas]
    xs = torch.empty(B, T + 1, *latents.shape[1:], dtype=latents.dtype, device=latents.device)
    logps = torch.empty(B, T, dtype=torch.float32, device=latents.device)
    x = latents
    for k in range(T):
        xs[:, k] = x
        v = velocity(x, torch.full((B,), sig[k], device=x.device)).to(x.dtype)
        mean = sde_mean(x, v, sig[k], sig[k + 1], noise_level)
        std = sde_coefficients(sig[k], sig[k + 1], noise_level)[2]
        x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        logps[:, k] = gaussian_logp(x, mean, std)
    xs[:, T] = x
    return SDETrajectories(xs=xs, logps=logps)


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: float, clip: float = 5.0) -> torch.Tensor:
    """(R − group mean)/global std, clipped to ±clip; rewards [G·n] stored group after group."""
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(1, keepdim=True)) / (global_std + 1e-8)
    return adv.flatten().clamp(-clip, clip)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate over (row, step) elements: mean(max(−A·r, −A·clip(r, 1 ± ε)))."""
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {"policy_loss": loss.detach(), "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
                   "ratio": ratio.mean()}
    return loss, metrics
