"""FDFO (docs/algorithm.md §1-4): paired trajectories with churn, and the finite-difference velocity loss.

    prompts ─► paired sampler (2 rows per pair, churn) ─► xs [2P, T], vs [2P, T], x0 [2P]
    (x0, R) ─► pair_delta ─► d, dR, mean(d²) per row
    element (row, step k) ─► v = velocity(xs[row, k], σ_k) ─► fd_loss(v, vs[row, k], d, dR)

On CUDA the sampler runs as a captured CUDA graph (fused churn kernel, in-kernel
Philox noise); elsewhere the eager sampler of fdfo.sampling runs the same maths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fdfo import distributed, kernels, progress, tuning
from fdfo.context import Stream
from fdfo.config import Rule, above, at_least, check
from fdfo.algorithms.base import Algorithm, Batch, Layout, Policy, fetch, valid_values
from fdfo.errors import ConfigError
from fdfo.models import Conditioning
from fdfo.sampling import sample_pairs
from fdfo.scoring import Scorer
from fdfo.trajectories import nbytes


@dataclass(frozen=True)
class FDFOSettings:
    """FDFO's own settings (train.algorithm: fdfo), the published recipe's values (docs/algorithm.md §4-5)."""

    pairs_per_epoch: int = field(default=432, metadata=check(above(0)))  # pairs sampled per epoch, over all ranks
    optimizer_steps_per_epoch: int = field(default=4, metadata=check(above(0)))  # optimizer steps per epoch
    # The trust region: the clip range of the finite-difference loss (docs/algorithm.md §3).
    clip_range: float = field(default=0.03, metadata=check(above(0)))
    # Weight of the KL term to the frozen base model's velocity; 0 = none (needs LoRA: the base is the
    # model with its adapter disabled).
    kl_weight: float = field(default=0.0, metadata=check(at_least(0)))
    # The fraction of each trajectory's stored steps trained on per epoch (1.0 = all, as published);
    # each row's steps are drawn uniformly without replacement per epoch (an unbiased estimate of the loss).
    timestep_fraction: float = field(default=1.0, metadata=check(Rule(lambda v: 0 < v <= 1, "in (0, 1]")))


def trained_steps(cfg, settings: FDFOSettings | None = None) -> int:
    """Stored steps per trajectory trained on each epoch: sampling.steps × timestep_fraction (of ``settings``,
    by default ``cfg.fdfo``), at least 1."""
    return max(1, round(cfg.sampling.steps * (settings or cfg.fdfo).timestep_fraction))


class FDFO(Algorithm):
    name = "fdfo"
    Settings = FDFOSettings
    summary = ("policy_loss", "clipfrac", "grad_norm", "pairs_per_s")
    kl_key = "kl_weight"

    def __init__(self, cfg, policy: Policy, prompts: list[str], layout: Layout):
        super().__init__(cfg, policy, prompts, layout)
        self.graph_sampler = None
        if policy.device.type == "cuda":
            from fdfo.graphs import GraphSampler

            self.graph_sampler = GraphSampler.for_model(policy.model, guidance_scale=policy.guidance,
                                                        uncond=policy.uncond, graphs=cfg.sampling.cuda_graphs,
                                                        backend=policy.kernels,
                                                        log=distributed.print0)

    @classmethod
    def layout_for(cls, cfg, world_size: int) -> Layout:
        t = cls.settings_of(cfg)
        if t.pairs_per_epoch % world_size:
            raise ConfigError(f"{cls.name}.pairs_per_epoch={t.pairs_per_epoch} must be divisible by the "
                              f"world size {world_size}")
        pairs_per_rank = t.pairs_per_epoch // world_size
        trained = trained_steps(cfg, t)
        elements = 2 * pairs_per_rank * trained
        if elements % t.optimizer_steps_per_epoch:
            raise ConfigError(f"2 x pairs per rank ({pairs_per_rank}) x trained steps per trajectory ({trained}: "
                              f"sampling.steps x {cls.name}.timestep_fraction) = {elements} training elements must "
                              f"divide into {cls.name}.optimizer_steps_per_epoch={t.optimizer_steps_per_epoch}")
        per_step = elements // t.optimizer_steps_per_epoch
        mb = tuning.given_or_default(cfg.train.micro_batch_rows, per_step, tuning.CPU_TRAIN_ROWS)
        if per_step % mb:
            raise ConfigError(f"train.micro_batch_rows={mb} must divide the {per_step} elements "
                              f"of each optimizer step per rank; {valid_values(per_step, mb)}")
        return Layout(rows_per_rank=2 * pairs_per_rank, elements_per_rank=elements,
                      optimizer_steps=t.optimizer_steps_per_epoch, micro_batch_rows=mb)

    def sample(self, epoch: int, scorer: Scorer | None = None) -> Batch:
        """Paired trajectories for this rank's pairs of the epoch."""
        cfg, pol, P = self.cfg.sampling, self.policy, self.layout.rows_per_rank // 2
        batches = pol.micro_batches(epoch, P, pol.sample_pairs)
        # Each micro-batch's CPU generator draws its prompts first, then its churn and graph seed below.
        prompts = [self.prompts[j] for b in batches
                   for j in torch.randint(len(self.prompts), (b.size,), generator=b.gen_cpu).tolist()]
        self.store.new_epoch()
        xs, vs, x0 = self.store.buffer(2 * P), self.store.buffer(2 * P), []
        scorer = scorer or Scorer(pol.decode)
        with pol.sampling():
            cond = pol.encode(prompts)  # [P, ...]
            for b in progress.bar(batches, desc=f"epoch {epoch + 1} sample", enabled=pol.progress):
                latents = torch.randn(b.size, *pol.model.latent_shape, generator=b.gen_dev, device=pol.device)
                g_prior, g_steps = self.cfg.churn.amounts(pol.sigmas, 2 * b.size, b.gen_cpu)
                rows_cond = cond[b.start:b.start + b.size].repeat_rows(2)
                if self.graph_sampler is not None:
                    seed = int(torch.randint(2**62, (), generator=b.gen_cpu))
                    traj = self.graph_sampler.sample(latents, rows_cond, pol.sigmas, g_prior, g_steps, seed)
                else:
                    traj = sample_pairs(pol.velocity_fn(rows_cond), latents, pol.sigmas, g_prior, g_steps,
                                        b.gen_dev)
                self.store.keep((xs, traj.xs), (vs, traj.vs))  # on the device or in host memory
                x0.append(traj.x0)
                scorer.submit([p for p in prompts[b.start:b.start + b.size] for _ in range(2)], traj.x0)
                del traj  # (its device tensors go before the next micro-batch samples)
        scored = scorer.result()
        x0 = torch.cat(x0)  # [2P, C, H, W]
        return Batch(prompts=[p for p in prompts for _ in range(2)], images=scored.images, rewards=scored.rewards,
                     parts=scored.parts,
                     data=dict(cond=cond, xs=xs.tensor(), vs=vs.tensor(), x0=x0, steps=self._steps(epoch)))

    def _steps(self, epoch: int) -> torch.Tensor | None:
        """The steps each row of the epoch trains on, [rows over all ranks, K] (the same on every rank),
        K = trained_steps; None when every step is trained (the published default)."""
        T, K = self.cfg.sampling.steps, trained_steps(self.cfg, self.settings)
        if K == T:
            return None
        rows = 2 * self.settings.pairs_per_epoch
        gen = self.policy.ctx.generator(Stream.TRAINED_STEPS, epoch)
        return torch.rand(rows, T, generator=gen).argsort(dim=1)[:, :K].sort(dim=1).values

    def elements(self, batch: Batch, rewards: torch.Tensor, reward_std: float, order: torch.Tensor):
        """Element (row, j) -> the FD loss; j is the row's j-th trained step (every step, or the epoch's
        drawn subset under fdfo.timestep_fraction). Only the states, velocities, pair differences and
        prompt embeddings of this rank's elements are fetched from the ranks that sampled them."""
        pol, T = self.policy, self.cfg.sampling.steps
        d, dR, ms = kernels.pair_delta(batch.data["x0"], rewards, backend=pol.kernels)  # this rank's rows
        steps = batch.data["steps"]
        K = T if steps is None else steps.shape[1]
        rows, k = order // K, order % K
        if steps is not None:
            k = steps[rows, k]
        xs, vs = self.store.fetch(rows * T + k, batch.data["xs"].flatten(0, 1), batch.data["vs"].flatten(0, 1))
        self.held_bytes = nbytes(batch.data["xs"], batch.data["vs"], xs, vs)
        serve = self.store.server(xs, vs)
        uniq, slot = torch.unique(rows, return_inverse=True)  # per-row values travel once per row
        d, dR, ms = fetch(uniq, d, dR, ms)
        pairs, pair_slot = torch.unique(rows // 2, return_inverse=True)
        embeds, pooled = fetch(pairs, batch.data["cond"].embeds, batch.data["cond"].pooled)
        dev = pol.device
        sigma, slot, pair_slot = pol.sigmas.to(dev)[k.to(dev)], slot.to(dev), pair_slot.to(dev)

        def micro_loss(p: slice):
            (x, v_ref), r, c = serve(p), slot[p], Conditioning(embeds[pair_slot[p]], pooled[pair_slot[p]])
            v = pol.train_velocity(x, sigma[p], c)
            loss, metrics = kernels.fd_loss(v, v_ref, d[r], dR[r], self.settings.clip_range, ms=ms[r],
                                            backend=pol.kernels)
            if self.settings.kl_weight > 0:
                kl = (v - pol.base_velocity(x, sigma[p], c)).pow(2).mean()
                loss = loss + self.settings.kl_weight * kl
                metrics["kl"] = kl.detach()
            return loss, metrics

        return micro_loss

    def throughput(self, rows: int, seconds: float) -> dict[str, float]:
        return {"pairs_per_s": rows / 2 / seconds}
