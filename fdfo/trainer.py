"""The FDFO training loop (ALGORITHM.md §4): one readable epoch.

    prompts ─► text encoders ─► paired sampler (churn) ─► xs, vs, x0
    x0 ─► decode ─► rewards R ─► pair differences d, dR
    (xs, vs, t, d, dR) ─► global (trajectory, timestep) shuffle ─► 4 optimizer steps

All randomness of an epoch is drawn from generators seeded by (seed, epoch,
rank), so a resumed run repeats the uninterrupted run's epochs exactly.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fdfo.config import RunConfig, epoch_layout, grpo_train_steps
from fdfo.engine import Engine, find_checkpoint, setup_distributed
from fdfo.gpu_stats import GpuStats
from fdfo.flow_grpo import gaussian_logp, group_advantages, grpo_loss, sample_sde, sde_coefficients
from fdfo import kernels
from fdfo.models import Conditioning, load_flow_model, resolve_model_path
from fdfo.prompts import load_prompts
from fdfo.report import RunReport
from fdfo.rewards import build_reward, build_weighted_reward
from fdfo.sampling import churn_schedule, sample_deterministic, sample_pairs


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, stream): stable across runs and resumes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & ((1 << 64) - 1)
    return h >> 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor [n, ...] over ranks -> [world·n, ...] (rank order)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.cfg = cfg
        self.rank, self.world_size, _, self.device = setup_distributed()
        self.layout = epoch_layout(cfg, self.world_size)
        self.out_dir = Path(cfg.log.out_dir)
        self.progress = cfg.log.progress and self.rank == 0
        torch.manual_seed(cfg.train.seed)
        kernels.set_backend(cfg.train.kernels)  # auto: fused Triton kernels on CUDA, PyTorch references elsewhere

        # Built-in models are created once by rank 0; the others wait and then load them.
        if self.rank == 0:
            resolve_model_path(cfg.model.path, cfg.model.cache_dir, progress=self.progress)
        dist.barrier()
        self.model = load_flow_model(cfg.model, self.device, shift=cfg.sampling.shift, progress=self.progress)
        self.prompts = load_prompts(cfg.data.prompts)
        self.eval_prompts = load_prompts(cfg.data.eval_prompts or cfg.data.prompts)
        # Built-in reward models are trained once by rank 0; the others wait and then load them.
        reward_device = torch.device(cfg.reward.device) if cfg.reward.device else self.device
        options = {name: {"batch_size": cfg.reward.batch_size} for name in cfg.reward.weights}
        if self.rank == 0:
            self.reward = build_weighted_reward(cfg.reward.weights, cfg.reward.paths, reward_device,
                                                cfg.model.cache_dir, options)
        dist.barrier()
        if self.rank != 0:
            self.reward = build_weighted_reward(cfg.reward.weights, cfg.reward.paths, reward_device,
                                                cfg.model.cache_dir, options)
        self.eval_metrics = {name: build_reward(name, cfg.reward.paths.get(name), reward_device, cfg.model.cache_dir,
                                                batch_size=cfg.reward.batch_size)
                             for name in cfg.eval.metrics}
        if cfg.lora.enabled:
            self.model.add_lora(cfg.lora)
        else:
            self.model.enable_full_finetune()
        self.engine = Engine(cfg, self.model, self.layout, self.rank, self.world_size)
        self.sigmas = self.model.sigmas(cfg.sampling.steps)  # [T + 1]
        self.guidance = cfg.sampling.guidance_scale
        self.uncond = self.model.encode([cfg.sampling.negative_prompt]) if self.guidance != 1.0 else None
        # On CUDA the paired sampler runs as a captured CUDA graph (fused churn kernel, in-kernel Philox
        # noise); elsewhere the eager sampler of fdfo.sampling runs the same maths.
        self.graph_sampler = None
        if self.device.type == "cuda" and cfg.train.algorithm == "fdfo":
            from fdfo.graphs import GraphSampler

            self.graph_sampler = GraphSampler.for_model(self.model, guidance_scale=self.guidance, uncond=self.uncond,
                                                        graphs=cfg.sampling.cuda_graphs,
                                                        compile=cfg.sampling.compile, log=self._say)
        self.gpu_stats = GpuStats(self.device)

        self.epoch, self.global_step = 0, 0
        checkpoint = find_checkpoint(self.out_dir, resume) if resume else None
        self.report = RunReport(self.out_dir, cfg, enabled=self.rank == 0, resumed=checkpoint is not None)
        if checkpoint is not None:
            state = self.engine.load(checkpoint)
            self.epoch, self.global_step = state["epoch"], state["global_step"]
            self.report.history = state["history"]
            self._truncate_log(self.epoch)
            self._say(f"resumed from {checkpoint} at epoch {self.epoch}")

    # ------------------------------------------------------------------ helpers

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(f"[fdfo] {msg}")

    def _truncate_log(self, epoch: int) -> None:
        """Drop metrics.jsonl lines of epochs after the checkpoint, so a resumed log has no duplicates."""
        if self.rank != 0:
            return
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        keep = [line for line in lines if line and json.loads(line).get("epoch", 0) <= epoch]
        self.report._file.seek(0)
        self.report._file.truncate()
        self.report._file.write("".join(line + "\n" for line in keep))
        self.report._file.flush()

    def _velocity_fn(self, cond: Conditioning, net=None):
        return lambda x, t: self.model.velocity(x, t, cond, self.guidance, self.uncond, net=net)

    def _encode(self, prompts: list[str]) -> Conditioning:
        mb = self.cfg.sampling.micro_batch_pairs
        return Conditioning.cat([self.model.encode(prompts[i:i + mb]) for i in range(0, len(prompts), mb)])

    # ------------------------------------------------------------------ the epoch

    def _micro_batches(self, epoch: int, n: int, size: int):
        """Split this rank's n items into micro-batches, each with generators seeded by its *global* index.

        Seeding by (seed, epoch, global micro-batch) rather than by rank makes the epoch's samples the
        same on any number of ranks (when n is a multiple of size), so runs compare across world sizes.
        """
        per_rank = math.ceil(n / size)
        for i in range(per_rank):
            g = self.rank * per_rank + i
            gen_cpu = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, epoch, g, 0))
            gen_dev = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.train.seed, epoch, g, 1))
            yield i * size, min(size, n - i * size), gen_cpu, gen_dev

    def sample_epoch(self, epoch: int) -> dict:
        """Paired trajectories and rewards for this rank's pairs of the epoch."""
        cfg, P = self.cfg, self.layout["pairs_per_rank"]
        batches = list(self._micro_batches(epoch, P, cfg.sampling.micro_batch_pairs))
        prompts = [self.prompts[j] for _, p, g, _ in batches
                   for j in torch.randint(len(self.prompts), (p,), generator=g).tolist()]
        self.model.offload_text_encoders(self.device)
        cond = self._encode(prompts)  # [P, ...]
        xs, vs, x0 = [], [], []
        with self.engine.inference_weights():
            for i, p, gen_cpu, gen_dev in tqdm(batches, desc=f"epoch {epoch + 1} sample", disable=not self.progress,
                                               leave=False):
                latents = torch.randn(p, *self.model.latent_shape, generator=gen_dev, device=self.device)
                g_prior, g_steps = churn_schedule(cfg.sampling.churn_schedule, cfg.sampling.churn_weight,
                                                  self.sigmas, 2 * p, gen_cpu, cfg.sampling.churn_logit_mean,
                                                  cfg.sampling.churn_logit_std)
                if self.graph_sampler is not None:
                    seed = int(torch.randint(2**62, (), generator=gen_cpu))
                    traj = self.graph_sampler.sample(latents, cond[i:i + p].repeat_rows(2), self.sigmas, g_prior,
                                                     g_steps, seed)
                else:
                    traj = sample_pairs(self._velocity_fn(cond[i:i + p].repeat_rows(2)), latents, self.sigmas,
                                        g_prior, g_steps, gen_dev)
                xs.append(traj.xs), vs.append(traj.vs), x0.append(traj.x0)
        x0 = torch.cat(x0)  # [2P, C, H, W]
        row_prompts = [p for p in prompts for _ in range(2)]
        mb = 2 * cfg.sampling.micro_batch_pairs
        images = torch.cat([self.model.decode(x0[i:i + mb]) for i in range(0, 2 * P, mb)])
        rewards, parts = self.reward(row_prompts, images)
        return dict(prompts=prompts, row_prompts=row_prompts, cond=cond, xs=torch.cat(xs), vs=torch.cat(vs),
                    x0=x0, images=images, rewards=rewards.to(self.device), reward_parts=parts)

    def sample_epoch_grpo(self, epoch: int) -> dict:
        """Flow-GRPO: groups of G independent SDE trajectories per prompt, with per-step log-probabilities."""
        cfg, G = self.cfg, self.cfg.grpo.group_size
        n_groups = self.layout["groups_per_rank"]
        gen_cpu = torch.Generator().manual_seed(derive_seed(cfg.train.seed, epoch, self.rank, 0))
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (n_groups,), generator=gen_cpu).tolist()]
        self.model.offload_text_encoders(self.device)
        cond = self._encode(prompts)  # [groups, ...]
        row_prompts = [p for p in prompts for _ in range(G)]
        rows, mb = len(row_prompts), 2 * cfg.sampling.micro_batch_pairs
        xs, logps = [], []
        with self.engine.inference_weights():
            for i, n, _, gen_dev in tqdm(list(self._micro_batches(epoch, rows, mb)), desc=f"epoch {epoch + 1} sample",
                                         disable=not self.progress, leave=False):
                r = torch.arange(i, i + n)
                latents = torch.randn(n, *self.model.latent_shape, generator=gen_dev, device=self.device)
                traj = sample_sde(self._velocity_fn(cond[r // G]), latents, self.sigmas, cfg.grpo.noise_level,
                                  gen_dev)
                xs.append(traj.xs), logps.append(traj.logps)
        xs = torch.cat(xs)  # [rows, T + 1, C, H, W]
        images = torch.cat([self.model.decode(xs[i:i + mb, -1]) for i in range(0, rows, mb)])
        rewards, parts = self.reward(row_prompts, images)
        return dict(prompts=prompts, row_prompts=row_prompts, cond=cond, xs=xs, logps=torch.cat(logps),
                    images=images, rewards=rewards.to(self.device), reward_parts=parts)

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        grpo = cfg.train.algorithm == "flow_grpo"
        t_start = time.time()
        self.gpu_stats.begin()
        batch = self.sample_epoch_grpo(epoch) if grpo else self.sample_epoch(epoch)
        t_sampled = time.time()
        R = batch["rewards"]
        bad = ~torch.isfinite(R)
        n_bad = int(all_reduce_sum([float(bad.sum())], self.device)[0])
        n_rows = R.numel() * self.world_size
        r_sum, r_sq = all_reduce_sum([float(R[~bad].sum()), float(R[~bad].pow(2).sum())], self.device)
        n_ok = max(n_rows - n_bad, 1)
        r_std = math.sqrt(max(r_sq / n_ok - (r_sum / n_ok) ** 2, 0.0))
        record = {"epoch": epoch + 1, "reward_mean": r_sum / n_ok, "reward_std": r_std,
                  "images_sampled": (epoch + 1) * n_rows}
        for name, values in batch["reward_parts"].items():
            record[f"reward/{name}"] = all_reduce_sum([float(values[torch.isfinite(values)].mean())],
                                                      self.device)[0] / self.world_size
        if n_bad:
            # Every rank skips together (n_bad is global), so the collectives stay in step.
            bad_prompts = sorted({batch["row_prompts"][i] for i in bad.nonzero().flatten().tolist()})
            warnings.warn(f"epoch {epoch + 1}: {n_bad} non-finite reward(s) (prompts: {bad_prompts[:5]}); "
                          "the epoch's batch is skipped, not trained on")
            record.update(skipped=True, nonfinite_rewards=n_bad, epoch_s=time.time() - t_start)
            self.report.log("epoch", record, self.global_step)
            return record

        if self.device.type == "cuda" and cfg.train.offload_text_encoders:
            self.model.offload_text_encoders("cpu")
        if grpo:
            adv = group_advantages(R, cfg.grpo.group_size, r_std, cfg.grpo.adv_clip)
            micro_loss = self._grpo_micro_loss(batch, adv)
        else:
            d, dR, _ = kernels.pair_delta(batch["x0"], R)
            micro_loss = self._fdfo_micro_loss(batch, d, dR)
        stats = self.optimize(epoch, micro_loss)
        t_done = time.time()
        record.update(stats)
        record.update(skipped=False, sample_s=t_sampled - t_start, train_s=t_done - t_sampled,
                      epoch_s=t_done - t_start, images_per_s=n_rows / (t_done - t_start))
        if not grpo:
            record["pairs_per_s"] = n_rows / 2 / (t_done - t_start)
        record.update(self.gpu_stats.end())  # GPU utilisation, memory, power (nothing on CPU)
        self.report.log("epoch", record, self.global_step)
        if self.rank == 0 and cfg.log.plot_every and (epoch + 1) % cfg.log.plot_every == 0:
            grid_dir = self.out_dir / "samples"
            grid_dir.mkdir(parents=True, exist_ok=True)
            self.report.save_grid(batch["images"], R, batch["row_prompts"], grid_dir / f"epoch_{epoch + 1:04d}.png",
                                  cfg.log.grid_pairs)
        return record

    def _fdfo_micro_loss(self, batch: dict, d: torch.Tensor, dR: torch.Tensor):
        """Element e = (row, step) of the global list -> the FD loss of a micro-batch of elements."""
        T, cfg = self.cfg.sampling.steps, self.cfg
        # Every rank holds the same global lists (rank-major) and takes its slice of one shared permutation.
        xs, vs = all_gather_rows(batch["xs"]), all_gather_rows(batch["vs"])  # [2P·world, T, C, H, W]
        d, dR = all_gather_rows(d), all_gather_rows(dR)
        cond = Conditioning(all_gather_rows(batch["cond"].embeds), all_gather_rows(batch["cond"].pooled))
        sigmas = self.sigmas.to(self.device)

        def micro_loss(idx: torch.Tensor):
            rows, k = idx // T, idx % T
            x, v_ref, c = xs[rows, k], vs[rows, k], cond[rows // 2]  # [mb, C, H, W]
            v = self.model.velocity(x, sigmas[k], c, self.guidance, self.uncond, net=self.engine.engine)
            loss, metrics = kernels.fd_loss(v, v_ref, d[rows], dR[rows], cfg.train.clip_range)
            if cfg.train.kl_weight > 0:
                kl = (v - self._base_velocity(x, sigmas[k], c)).pow(2).mean()
                loss = loss + cfg.train.kl_weight * kl
                metrics["kl"] = kl.detach()
            return loss, metrics

        return micro_loss

    def _grpo_micro_loss(self, batch: dict, adv: torch.Tensor):
        """Element e = (row, step k < train_steps) -> the PPO-clipped loss of the SDE step k of that row."""
        cfg, G = self.cfg, self.cfg.grpo.group_size
        K = grpo_train_steps(cfg)
        xs, logps, adv = all_gather_rows(batch["xs"]), all_gather_rows(batch["logps"]), all_gather_rows(adv)
        cond = Conditioning(all_gather_rows(batch["cond"].embeds), all_gather_rows(batch["cond"].pooled))
        sig = [float(v) for v in self.sigmas]
        coef = torch.tensor([sde_coefficients(sig[k], sig[k + 1], cfg.grpo.noise_level) for k in range(len(sig) - 1)],
                            device=self.device)  # [T, 4]: x weight, v weight, step std, σ_t
        sigmas = self.sigmas.to(self.device)

        def micro_loss(idx: torch.Tensor):
            rows, k = idx // K, idx % K
            x, x_next, c = xs[rows, k], xs[rows, k + 1], cond[rows // G]
            v = self.model.velocity(x, sigmas[k], c, self.guidance, self.uncond, net=self.engine.engine)
            w = coef[k].T.reshape(4, -1, *([1] * (x.ndim - 1)))  # [4, mb, 1, 1, 1]
            mean = x.float() * w[0] + v * w[1]
            logp = gaussian_logp(x_next, mean, coef[k, 2])
            loss, metrics = grpo_loss(logp, logps[rows, k], adv[rows], cfg.grpo.clip_range)
            if cfg.grpo.kl_beta > 0:
                v_ref = self._base_velocity(x, sigmas[k], c)
                mean_ref = x.float() * w[0] + v_ref * w[1]
                kl = ((mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * coef[k, 3] ** 2)).mean()
                loss = loss + cfg.grpo.kl_beta * kl
                metrics["kl"] = kl.detach()
            return loss, metrics

        return micro_loss

    def optimize(self, epoch: int, micro_loss) -> dict:
        """The epoch's optimizer steps over the globally shuffled training elements."""
        cfg = self.cfg
        E = self.layout["elements_per_rank"]
        perm = torch.randperm(E * self.world_size,
                              generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, epoch, 7)))
        # Guard: every rank must draw the same permutation, or elements would be trained twice or never.
        checksum = float((perm[:4096].double() * torch.arange(min(4096, perm.numel()))).sum())
        lo, hi = all_reduce_sum([checksum], self.device)[0] / self.world_size, checksum
        if abs(lo - hi) > 0.5:
            raise RuntimeError("the global shuffle differs between ranks (check that every rank runs the same config)")
        mine = perm[self.rank * E:(self.rank + 1) * E].to(self.device)
        mb, steps, accum = cfg.train.micro_batch_rows, self.layout["optimizer_steps"], self.layout["grad_accum"]
        sums: dict[str, float] = {}
        bar = tqdm(total=E // mb, desc=f"epoch {epoch + 1} train", disable=not self.progress, leave=False)
        for s in range(steps):
            acc: dict[str, float] = {}
            for m in range(accum):
                loss, metrics = micro_loss(mine[(s * accum + m) * mb:][:mb])
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became non-finite at epoch {epoch + 1}, step {s + 1}; the weights were not "
                        "updated and the last checkpoint is intact: lower train.learning_rate and resume")
                metrics["loss"] = loss.detach()
                self.engine.backward(loss)
                self.engine.step()
                for key, value in metrics.items():
                    acc[key] = acc.get(key, 0.0) + float(value) / accum
                bar.update(1)
            self.global_step += 1
            reduced = all_reduce_sum(list(acc.values()), self.device)
            acc = {k: v / self.world_size for k, v in zip(acc, reduced)}
            acc["grad_norm"] = self.engine.grad_norm()
            self.report.log("step", {"epoch": epoch + 1, "step": self.global_step, **acc}, self.global_step)
            for key, value in acc.items():
                if value is not None:
                    sums[key] = sums.get(key, 0.0) + value / steps
        bar.close()
        return sums

    @torch.no_grad()
    def _base_velocity(self, x, sigma, cond) -> torch.Tensor:
        """The frozen base model's velocity (LoRA adapter disabled), for the optional KL term."""
        if not self.cfg.lora.enabled:
            raise ValueError("a KL term (train.kl_weight, grpo.kl_beta) needs LoRA: the base is the model with the "
                             "adapter disabled")
        # Under ZeRO-3 the persistent inference copy holds the frozen base exactly (synced once, never
        # trained): with its adapter disabled it gives the base velocity without gathering any weight.
        copy = self.model.inference_transformer
        net = copy if copy is not None else self.model.transformer
        net.disable_adapters()
        try:
            return self.model.velocity(x, sigma, cond, self.guidance, self.uncond, net=net)
        finally:
            net.enable_adapters()
            if copy is not None:
                copy.requires_grad_(False)  # (peft's enable_adapters marks the adapter trainable again)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Deterministic (no churn) samples for a fixed prompt list and fixed seeds; mean of each metric."""
        cfg = self.cfg.eval
        n = cfg.num_images
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        gen = torch.Generator().manual_seed(cfg.seed)
        latents = torch.randn(n, *self.model.latent_shape, generator=gen)  # same noise whatever the world size
        per_rank = math.ceil(n / self.world_size)  # equal work on every rank; the padding is masked out
        idx = [(self.rank * per_rank + j) % n for j in range(per_rank)]
        valid = torch.tensor([self.rank * per_rank + j < n for j in range(per_rank)], device=self.device)
        t0 = time.time()
        self.model.offload_text_encoders(self.device)
        sums = {name: 0.0 for name in ["reward", *self.eval_metrics]}
        mb = 2 * self.cfg.sampling.micro_batch_pairs
        with self.engine.inference_weights():
            sums = self._evaluate_shard(idx, valid, prompts, latents, mb, sums)
        totals = all_reduce_sum(list(sums.values()), self.device)
        record = {"epoch": epoch, **{f"eval/{k}": v / n for k, v in zip(sums, totals)},
                  "seconds": time.time() - t0}
        self.report.log("eval", record, self.global_step)
        return record

    def _evaluate_shard(self, idx, valid, prompts, latents, mb, sums):
        for i in range(0, len(idx), mb):
            chunk = idx[i:i + mb]
            p = [prompts[j] for j in chunk]
            x0 = sample_deterministic(self._velocity_fn(self.model.encode(p)), latents[chunk].to(self.device),
                                      self.sigmas)
            images = self.model.decode(x0)
            mask = valid[i:i + mb].float()
            sums["reward"] += float((self.reward(p, images)[0] * mask).sum())
            for name, metric in self.eval_metrics.items():
                sums[name] += float((metric(p, images).float() * mask).sum())
        return sums

    # ------------------------------------------------------------------ the run

    def save_checkpoint(self) -> Path:
        for p in self.model.trainable_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError("refusing to write a checkpoint with non-finite weights")
        path = self.out_dir / "checkpoints" / f"epoch_{self.epoch:04d}"
        self.engine.save(path, {"epoch": self.epoch, "global_step": self.global_step,
                                "history": self.report.history, "config": self.cfg.to_dict()})
        self._say(f"checkpoint written: {path}")
        return path

    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.epoch == 0 and cfg.eval.every:
            rec = self.evaluate(0)
            self._say("base model: " + _fmt(rec))
        for epoch in range(self.epoch, cfg.train.epochs):
            rec = self.train_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == cfg.train.epochs
            self._say(_fmt(rec))
            if cfg.eval.every and (self.epoch % cfg.eval.every == 0 or last):
                self._say(_fmt(self.evaluate(self.epoch)))
            if cfg.log.plot_every and (self.epoch % cfg.log.plot_every == 0 or last):
                self.report.plot_curves()
            if cfg.checkpoint.every and (self.epoch % cfg.checkpoint.every == 0 or last):
                self.save_checkpoint()
        self.report.close()
        return self.report.history


def _fmt(record: dict) -> str:
    keys = ["epoch", "reward_mean", "reward_std", "policy_loss", "clipfrac", "grad_norm", "epoch_s", "pairs_per_s"]
    keys += [k for k in record if k.startswith("eval/")]
    parts = []
    for k in keys:
        v = record.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite rewards)")
    return " ".join(parts)
