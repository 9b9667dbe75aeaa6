"""Flow-GRPO, the per-step policy-gradient baseline (docs/algorithm.md §6), as an algorithm of the trainer.

The deterministic flow sampler becomes a reverse SDE with noise level ``a``;
each denoising step is a Gaussian policy action with a closed-form
log-probability, and the PPO-clipped objective reinforces the steps of
trajectories whose reward beats their group's mean:

    σ_t  = a·sqrt(σ/(1 − σ))          (at σ = 1 the next grid value is used)
    mean = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²(1 − σ)/(2σ))·dt,   dt = s − σ < 0
    x'   = mean + σ_t·sqrt(−dt)·ε

An epoch samples groups of G independent SDE trajectories per prompt; its training
elements are the (row, step) pairs of the first ``flow_grpo.train_steps`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fdfo import progress, tuning
from fdfo.algorithms.base import Algorithm, Batch, Layout, fetch, valid_values
from fdfo.context import Stream
from fdfo.config import above, at_least, check, optional
from fdfo.errors import ConfigError
from fdfo.models import Conditioning
from fdfo.scoring import Scorer
from fdfo.trajectories import nbytes

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_coefficients(sigma: float, s: float, noise_level: float) -> tuple[float, float, float, float]:
    """Per-step constants (x weight, v weight, step std, σ_t) of the reverse SDE step from σ to s."""
    dt = s - sigma
    sig_noise = s if sigma >= 1.0 else sigma  # σ/(1 − σ) is infinite at σ = 1: use the next grid value
    sigma_t = noise_level * math.sqrt(sig_noise / (1 - sig_noise)) if sig_noise < 1 else 0.0
    x_w = 1 + sigma_t**2 * dt / (2 * sigma)
    v_w = (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return x_w, v_w, sigma_t * math.sqrt(-dt), sigma_t


def sde_mean(x: torch.Tensor, v: torch.Tensor, x_weight, v_weight) -> torch.Tensor:
    """The SDE step's mean x·x_w + v·v_w; the weights are floats or per-row tensors [B]."""
    if isinstance(x_weight, torch.Tensor):
        shape = (-1, *([1] * (x.ndim - 1)))
        x_weight, v_weight = x_weight.view(shape), v_weight.view(shape)
    return x * x_weight + v * v_weight


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
        x_w, v_w, std, _ = sde_coefficients(sig[k], sig[k + 1], noise_level)
        mean = sde_mean(x, v, x_w, v_w)
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


@dataclass(frozen=True)
class FlowGRPOSettings:
    """The Flow-GRPO baseline's settings (train.algorithm: flow_grpo), as its public code configures it."""

    noise_level: float = field(default=0.7, metadata=check(above(0)))  # a in σ_t = a·sqrt(σ/(1−σ))
    group_size: int = field(default=24, metadata=check(at_least(2)))  # images per prompt
    groups_per_epoch: int = field(default=48, metadata=check(at_least(1)))  # prompts per epoch, over all ranks
    clip_range: float = field(default=1e-4, metadata=check(above(0)))  # PPO clip
    kl_beta: float = field(default=0.01, metadata=check(at_least(0)))  # β·‖μ_θ − μ_ref‖²/(2σ_t²); 0 = no KL
    adv_clip: float = field(default=5.0, metadata=check(above(0)))  # advantages are clipped to ±adv_clip
    # Leading SDE steps trained per trajectory; null = all but the last.
    train_steps: int | None = field(default=None, metadata=check(optional(at_least(1))))
    optimizer_steps_per_epoch: int = field(default=2, metadata=check(at_least(1)))  # optimizer steps per epoch


def train_steps(cfg) -> int:
    """Leading SDE steps trained per trajectory (flow_grpo.train_steps; default all but the last)."""
    T = cfg.sampling.steps
    n = cfg.flow_grpo.train_steps if cfg.flow_grpo.train_steps is not None else max(T - 1, 1)
    if not 1 <= n <= T:
        raise ConfigError(f"flow_grpo.train_steps={n} must lie in 1..sampling.steps ({T})")
    return n


class FlowGRPO(Algorithm):
    name = "flow_grpo"
    Settings = FlowGRPOSettings
    kl_key = "kl_beta"

    @classmethod
    def layout_for(cls, cfg, world_size: int) -> Layout:
        g = cls.settings_of(cfg)
        if g.groups_per_epoch % world_size:
            raise ConfigError(f"flow_grpo.groups_per_epoch={g.groups_per_epoch} must be divisible by the world size "
                              f"{world_size}")
        images = g.groups_per_epoch // world_size * g.group_size
        elements = images * train_steps(cfg)
        if elements % g.optimizer_steps_per_epoch:
            raise ConfigError(f"{elements} Flow-GRPO training elements per rank (images x flow_grpo.train_steps) must "
                              f"split into flow_grpo.optimizer_steps_per_epoch={g.optimizer_steps_per_epoch} equal "
                              f"steps; "
                              f"{valid_values(elements, g.optimizer_steps_per_epoch)}")
        mb = tuning.given_or_default(cfg.train.micro_batch_rows, elements // g.optimizer_steps_per_epoch,
                                     tuning.CPU_TRAIN_ROWS)
        if (elements // g.optimizer_steps_per_epoch) % mb:
            raise ConfigError(f"train.micro_batch_rows={mb} must divide the {elements // g.optimizer_steps_per_epoch} "
                              f"Flow-GRPO training elements of each optimizer step per rank; "
                              f"{valid_values(elements // g.optimizer_steps_per_epoch, mb)}")
        return Layout(rows_per_rank=images, elements_per_rank=elements, optimizer_steps=g.optimizer_steps_per_epoch,
                      micro_batch_rows=mb)

    @property
    def grid_group(self) -> int:
        return self.settings.group_size

    def sample(self, epoch: int, scorer: Scorer | None = None) -> Batch:
        """Groups of G independent SDE trajectories per prompt, with per-step log-probabilities."""
        pol, G = self.policy, self.settings.group_size
        rows = self.layout.rows_per_rank
        groups = rows // G
        # The epoch's prompts are drawn for all ranks at once and each rank takes its groups: the same
        # prompts, in the same groups, on any number of ranks.
        ctx = pol.ctx
        gen = ctx.generator(Stream.GROUP_PROMPTS, epoch, 0)
        everyone = torch.randint(len(self.prompts), (groups * ctx.world_size,), generator=gen)
        prompts = [self.prompts[i] for i in everyone[ctx.rank * groups:][:groups].tolist()]
        mb = pol.forward_rows
        self.store.new_epoch()
        xs, logps = self.store.buffer(rows), []
        scorer = scorer or Scorer(pol.decode)
        with pol.sampling():
            cond = pol.encode(prompts)  # [groups, ...]
            for b in progress.bar(pol.micro_batches(epoch, rows, mb), desc=f"epoch {epoch + 1} sample",
                                  enabled=pol.progress):
                r = torch.arange(b.start, b.start + b.size)
                latents = torch.randn(b.size, *pol.model.latent_shape, generator=b.gen_dev, device=pol.device)
                traj = sample_sde(pol.velocity_fn(cond[r // G]), latents, pol.sigmas, self.settings.noise_level,
                                  b.gen_dev)
                self.store.keep((xs, traj.xs))  # on the device or in host memory
                logps.append(traj.logps)
                scorer.submit([prompts[i] for i in (r // G).tolist()], traj.xs[:, -1])
                del traj  # (its device tensors go before the next micro-batch samples)
        scored = scorer.result()
        return Batch(prompts=[p for p in prompts for _ in range(G)], images=scored.images, rewards=scored.rewards,
                     parts=scored.parts, data=dict(cond=cond, xs=xs.tensor(), logps=torch.cat(logps)))

    def elements(self, batch: Batch, rewards: torch.Tensor, reward_std: float, order: torch.Tensor):
        """Element (row, step k < train_steps) -> the PPO-clipped loss of the SDE step k of that row; only
        what this rank's elements reference is fetched from the ranks that sampled it."""
        cfg, pol, G = self.cfg, self.policy, self.settings.group_size
        K = train_steps(cfg)
        adv = group_advantages(rewards, G, reward_std, self.settings.adv_clip)  # needs this rank's whole groups
        xs, logps = batch.data["xs"], batch.data["logps"]  # [rows, T + 1, ...], [rows, T]
        rows, k = order // K, order % K
        at = rows * xs.shape[1] + k  # the element's state in this rank's flattened [rows · (T + 1)]
        (states,) = self.store.fetch(torch.cat([at, at + 1]), xs.flatten(0, 1))  # one exchange for both states
        x_now, x_next = states.chunk(2)
        serve = self.store.server(x_now, x_next)
        (logp_old,) = fetch(rows * logps.shape[1] + k, logps.flatten(0, 1))
        self.held_bytes = nbytes(xs, x_now, x_next)
        uniq, slot = torch.unique(rows, return_inverse=True)
        (adv,) = fetch(uniq, adv)
        groups, group_slot = torch.unique(rows // G, return_inverse=True)
        embeds, pooled = fetch(groups, batch.data["cond"].embeds, batch.data["cond"].pooled)
        sig = [float(v) for v in pol.sigmas]
        coef = torch.tensor([sde_coefficients(sig[i], sig[i + 1], self.settings.noise_level)
                             for i in range(len(sig) - 1)],
                            device=pol.device)  # [T, 4]: x weight, v weight, step std, σ_t
        dev = pol.device
        k, slot, group_slot = k.to(dev), slot.to(dev), group_slot.to(dev)
        sigmas = pol.sigmas.to(dev)

        def micro_loss(p: slice):
            (x, x_next_p), c = serve(p), Conditioning(embeds[group_slot[p]], pooled[group_slot[p]])
            kp = k[p]
            x_w, v_w, std, sigma_t = coef[kp].T  # each [mb]
            v = pol.train_velocity(x, sigmas[kp], c)
            mean = sde_mean(x.float(), v, x_w, v_w)
            loss, metrics = grpo_loss(gaussian_logp(x_next_p, mean, std), logp_old[p], adv[slot[p]],
                                      self.settings.clip_range)
            if self.settings.kl_beta > 0:
                mean_ref = sde_mean(x.float(), pol.base_velocity(x, sigmas[kp], c), x_w, v_w)
                kl = ((mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * sigma_t ** 2)).mean()
                loss = loss + self.settings.kl_beta * kl
                metrics["kl"] = kl.detach()
            return loss, metrics

        return micro_loss
