"""The training loop: one readable epoch, for any algorithm of ``fdfo.algorithms``.

    sample ─► reward ─► skip non-finite ─► training elements ─► global shuffle ─► optimize ─► log

The algorithm (``train.algorithm``) samples the batch and turns it and its rewards into
training elements with a micro-batch loss; the trainer rewards, shuffles the elements
over all ranks, runs the optimizer steps, evaluates, logs and checkpoints. All
randomness of an epoch is drawn from generators seeded by (seed, epoch, global
index), so a resumed run repeats the uninterrupted run's epochs exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fdfo import adapters, algorithms, distributed, progress, run_dir, settings, tasks, tuning
from fdfo.algorithms.base import Policy
from fdfo.checkpoint import CheckpointManager
from fdfo.context import RunContext, Stream, global_rng
from fdfo.engine import Engine
from fdfo import failures
from fdfo.errors import ConfigError, RewardFailed, TrainingError
from fdfo.gpu_stats import GpuStats
from fdfo.models import family_for, load_flow_model
from fdfo.prompts import load_prompts
from fdfo.report import RunReport
from fdfo.resume_guard import ResumeGuard
from fdfo.rewards import build_reward, build_weighted_reward
from fdfo.sampling import sample_deterministic
from fdfo.scoring import Scorer
from fdfo.settings import RunConfig

DIVERSITY_SIDE = 64  # eval/pixel_diversity compares images area-downsampled to at most this many pixels a side


def pixel_diversity(count: torch.Tensor, sum_x: torch.Tensor, sum_sq: torch.Tensor) -> float | None:
    """The mean over prompts with at least 2 images of the RMS pairwise distance per pixel value,
    sqrt(mean over pairs i≠j of mean over pixels of (x_i − x_j)²), from per-prompt sums.

    ``count`` [P] images per prompt, ``sum_x`` [P, D] the sum of their flattened images, ``sum_sq``
    [P] the sum of their squared norms. For n images, the mean over ordered pairs i≠j of
    ‖x_i − x_j‖² is 2n/(n−1)·(mean ‖x‖² − ‖mean x‖²). None when no prompt has 2 images.
    """
    count, sum_x, sum_sq = count.double(), sum_x.double(), sum_sq.double()
    keep = count >= 2
    if not bool(keep.any()):
        return None
    n, sx, sq = count[keep], sum_x[keep], sum_sq[keep]
    mean = sx / n[:, None]
    spread = (sq / n - mean.pow(2).sum(1)).clamp(min=0)  # mean ‖x‖² − ‖mean x‖²
    per_pixel = 2 * n / (n - 1) * spread / sum_x.shape[1]
    return float(per_pixel.sqrt().mean())


def _diversity_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] -> [B, C·h·w] float64, area-downsampled to at most DIVERSITY_SIDE pixels a side
    (the per-prompt sums then stay small for any resolution)."""
    h, w = min(images.shape[-2], DIVERSITY_SIDE), min(images.shape[-1], DIVERSITY_SIDE)
    if (h, w) != tuple(images.shape[-2:]):
        images = F.interpolate(images.float(), size=(h, w), mode="area")
    return images.flatten(1).double()


def settle_model_settings(cfg: RunConfig) -> tuple[RunConfig, Path | None, type]:
    """Before anything is written: the model family's checks (its own section, the attention backend; only
    model_index.json is read), and the adapted modules made explicit (the starting adapter's, else the
    family's default) so that the saved config and the resume checks hold what is trained. Returns the
    settled config, the local directory of ``lora.init_adapter`` (fetched from the hub if it names a
    repository subfolder) or None, and the model family."""
    family = family_for(cfg.model)
    settings.check_family(cfg, family)
    path, lora = None, {}
    if cfg.lora.init_adapter:
        path = adapters.locate(cfg.lora.init_adapter)
        if not adapters.is_peft_adapter(path):
            raise ConfigError(f"lora.init_adapter '{cfg.lora.init_adapter}' is not a peft adapter directory "
                              f"({adapters.CONFIG_FILE} and {adapters.WEIGHTS_FILE}); give one, e.g. a "
                              "checkpoint's adapter/ folder or a published adapter's folder")
        peft_cfg = adapters.read_config(path)
        targets = peft_cfg.target_modules  # a list (peft may hold a set), or a regular expression
        if not isinstance(targets, (list, set, tuple)):
            raise ConfigError(f"lora.init_adapter '{cfg.lora.init_adapter}' names its target modules by a regular "
                              f"expression ({targets!r}); fdfo records an adapter's modules as a list: save the "
                              "adapter with target_modules as a list of module names")
        lora = {"rank": int(peft_cfg.r), "alpha": float(peft_cfg.lora_alpha), "target_modules": sorted(targets)}
        for key, value in lora.items():
            if getattr(cfg.lora, key) not in (None, value):
                distributed.print0(f"lora.{key}: {getattr(cfg.lora, key)!r} -> {value!r}, the starting adapter's")
    if cfg.lora.target_modules is None and "target_modules" not in lora:
        lora["target_modules"] = list(family.LORA_TARGETS)
    return (settings.with_overrides(cfg, {"lora": lora}) if lora else cfg), path, family


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None, overwrite: bool = False):
        """``resume``: None, "auto" or a checkpoint / run directory; ``overwrite``: move an existing run
        in log.out_dir aside (``fdfo.run_dir``). Everything a user can get wrong is checked before
        any model is loaded, and before DeepSpeed starts (whose first start builds an op for a while)."""
        self.cfg = cfg
        algorithm = algorithms.get(cfg.train.algorithm)
        self.layout = algorithm.layout_for(cfg, distributed.launched_world_size())
        self.prompts = load_prompts(cfg.data.prompts)
        self.eval_prompts = load_prompts(cfg.data.eval_prompts or cfg.data.prompts)
        cfg, init_adapter, family = settle_model_settings(cfg)
        self.cfg = cfg
        tasks.check_build(cfg.model.path, cfg.model.cache_dir)
        plan = run_dir.plan(cfg, resume, overwrite)
        device = distributed.init()
        self.ctx = RunContext(rank=distributed.rank(), world_size=distributed.world_size(), device=device,
                              progress=cfg.log.progress and distributed.rank() == 0, seed=cfg.train.seed)
        self.rank, self.world_size, self.device, self.progress = (self.ctx.rank, self.ctx.world_size, device,
                                                                  self.ctx.progress)
        if self.world_size != distributed.launched_world_size():  # a launcher that set no WORLD_SIZE
            self.layout = algorithm.layout_for(cfg, self.world_size)
        start = run_dir.prepare(plan)
        self.out_dir = start.out_dir

        progress.quiet_libraries()  # (in a log file: no loading bars of the libraries either)
        # Built-in models and reward weights are created once, by rank 0; the other ranks then load them.
        with distributed.rank0_first():
            self.model = load_flow_model(cfg.model, self.device, options=settings.family_options(cfg, family),
                                         shift=cfg.sampling.shift, progress=self.progress)
            reward_device = torch.device(cfg.reward.device) if cfg.reward.device else self.device
            load_hint = "check reward.weights, reward.paths and model.cache_dir (or the network, for hub models)"
            with self._part(f"loading the reward model(s) {', '.join(map(repr, cfg.reward.weights))}", load_hint):
                self.reward = build_weighted_reward(cfg.reward.weights, cfg.reward.paths, reward_device,
                                                    cfg.model.cache_dir,
                                                    {name: {"batch_size": cfg.reward.batch_size} for name in
                                                     cfg.reward.weights})
            with self._part(f"loading the evaluation metric(s) {', '.join(map(repr, cfg.eval.metrics))}", load_hint):
                self.eval_metrics = {name: build_reward(name, cfg.reward.paths.get(name), reward_device,
                                                        cfg.model.cache_dir, batch_size=cfg.reward.batch_size)
                                     for name in cfg.eval.metrics}
        if cfg.lora.enabled:
            if init_adapter is not None:
                self.model.load_adapter(init_adapter, trainable=True, lora_dtype=cfg.lora.dtype)
            else:
                # peft draws the new adapter from torch's global generator: seeded from the adapter's
                # stream inside a fork, so the caller's generator is left as it was.
                with global_rng(self.ctx.seed_of(Stream.ADAPTER), self.device):
                    self.model.add_lora(cfg.lora)
        else:
            self.model.enable_full_finetune()
        if cfg.train.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        # The "auto" micro-batches and text-encoder placement, measured on the device (fdfo.tuning).
        self.tuned = tuning.tune(cfg, self.model, self.layout.elements_per_step, self.layout.rows_per_rank // 2,
                                 self.layout.micro_batch_rows, self._trajectory_bytes(), distributed.print0)
        self.layout = dataclasses.replace(self.layout, micro_batch_rows=self.tuned.train_rows)
        self.engine = Engine(cfg, self.model, self.layout, self.ctx)
        self.policy = Policy(cfg, self.model, self.engine, self.ctx, sample_pairs=self.tuned.sample_pairs)
        self.algorithm = algorithm(cfg, self.policy, self.prompts, self.layout)
        self.gpu_stats = GpuStats(self.device)

        self.epoch, self.global_step = 0, 0
        self._compile_s_seen = 0.0
        self.checkpoints = CheckpointManager(self.out_dir, cfg.checkpoint, self.engine)
        self.report = RunReport(self.out_dir, cfg, enabled=self.rank == 0, resumed=start.checkpoint is not None)
        self.guard = None
        if start.checkpoint is not None:
            state = self.checkpoints.load(start.checkpoint)
            self.guard = ResumeGuard(start.checkpoint, state["history"], cfg.checkpoint.resume_guard)
            self.engine.set_hyperparameters(cfg.train)  # the run config's, not the ones saved with the state
            self.epoch, self.global_step = state["epoch"], state["global_step"]
            self.report.resume(state["history"], self.epoch, self.global_step)
            distributed.print0(f"resumed from {start.checkpoint} at epoch {self.epoch} (learning rate "
                               f"{cfg.train.learning_rate:g})")

    def _trajectory_bytes(self) -> int:
        """Device bytes of an epoch's stored trajectories (states and velocities at every step; none on the
        device with train.trajectory_device host): what training holds beside its micro-batch."""
        if self.cfg.train.trajectory_device != "device":
            return 0
        per_state = math.prod(self.model.latent_shape) * self.model.dtype.itemsize
        return 2 * (self.cfg.sampling.steps + 1) * self.layout.rows_per_rank * per_state

    # ------------------------------------------------------------------ the epoch

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        t_start = time.time()
        self.gpu_stats.begin()
        # Each sampled micro-batch is decoded and rewarded while the next one samples (reward.overlap).
        with Scorer(self.policy.decode, self.reward, chunk=cfg.reward.batch_size,
                    overlap=cfg.reward.overlap) as scorer:
            batch = self.algorithm.sample(epoch, scorer)
        R, parts = batch.rewards.to(self.device), batch.parts
        t_sampled = time.time()
        record, r_std, bad = self._reward_record(epoch, R, parts)
        if bad:
            # Every rank skips together (the count is global), so the collectives stay in step.
            bad_prompts = sorted({batch.prompts[i] for i in (~torch.isfinite(R)).nonzero().flatten().tolist()})
            warnings.warn(f"epoch {epoch + 1}: {bad} non-finite reward(s) (prompts: {bad_prompts[:5]}); "
                          "the epoch's batch is skipped, not trained on")
            record.update(skipped=True, nonfinite_rewards=bad, epoch_s=time.time() - t_start)
            self.report.log("epoch", record, self.global_step)
            return record

        if self.tuned.offload_text_encoders:
            self.model.move_text_encoders("cpu")
        micro_loss = self.algorithm.elements(batch, R, r_std, self.my_elements(epoch))
        batch.data.clear()  # the elements hold what they fetched: the rank's own trajectories go before training
        record.update(self.optimize(epoch, micro_loss), trajectory_mib=self.algorithm.held_bytes / 2**20,
                      trajectory_device_mib=self.algorithm.device_held_bytes / 2**20)
        t_done = time.time()
        rows = R.numel() * self.world_size
        record.update(skipped=False, sample_s=t_sampled - t_start, train_s=t_done - t_sampled,
                      epoch_s=t_done - t_start, images_per_s=rows / (t_done - t_start),
                      **self.algorithm.throughput(rows, t_done - t_start))
        record.update(self.gpu_stats.end())  # GPU utilisation, memory, power (nothing on CPU)
        record.update(self._compile_record())
        self.report.log("epoch", record, self.global_step)
        last = epoch + 1 == cfg.train.epochs  # (the last epoch's grid even in a run shorter than plot_every)
        if self.rank == 0 and cfg.log.plot_every and ((epoch + 1) % cfg.log.plot_every == 0 or last):
            grid_dir = self.out_dir / "samples"
            grid_dir.mkdir(parents=True, exist_ok=True)
            self.report.save_grid(batch.images, R, batch.prompts, grid_dir / f"epoch_{epoch + 1:04d}.png",
                                  cfg.log.grid_pairs, self.algorithm.grid_group, step=self.global_step)
        return record

    def _compile_record(self) -> dict:
        """``compiled`` and this epoch's ``compile_s`` (seconds of the calls that compiled, part of
        ``epoch_s``), so that compilation reads apart from steady-state time; empty when nothing compiles."""
        stats = self.model.compile_stats()
        if not stats:
            return {}
        total = stats["compile_s"]
        stats["compile_s"], self._compile_s_seen = total - self._compile_s_seen, total
        return stats

    def _reward_record(self, epoch: int, R: torch.Tensor, parts: dict) -> tuple[dict, float, int]:
        """The epoch's reward statistics over all ranks: (record, std of the finite rewards, non-finite count)."""
        bad = ~torch.isfinite(R)
        n_bad, r_sum, r_sq = distributed.sum_over_ranks(
            [float(bad.sum()), float(R[~bad].sum()), float(R[~bad].pow(2).sum())])
        n_rows = R.numel() * self.world_size
        n_ok = max(n_rows - n_bad, 1)
        r_std = math.sqrt(max(r_sq / n_ok - (r_sum / n_ok) ** 2, 0.0))
        record = {"epoch": epoch + 1, "reward_mean": r_sum / n_ok, "reward_std": r_std,
                  "images_sampled": (epoch + 1) * n_rows}
        record.update(distributed.mean_over_ranks(
            {f"reward/{name}": float(values[torch.isfinite(values)].mean()) for name, values in parts.items()}))
        return record, r_std, int(n_bad)

    def my_elements(self, epoch: int) -> torch.Tensor:
        """This rank's slice of the epoch's global permutation of training elements, in training order."""
        E = self.layout.elements_per_rank
        perm = torch.randperm(E * self.world_size, generator=self.ctx.generator(Stream.SHUFFLE, epoch))
        # Guard: every rank must draw the same permutation, or elements would be trained twice or never.
        checksum = float((perm[:4096].double() * torch.arange(min(4096, perm.numel()))).sum())
        if abs(distributed.sum_over_ranks([checksum])[0] / self.world_size - checksum) > 0.5:
            raise RuntimeError("the global shuffle differs between ranks (check that every rank runs the same config)")
        return perm[self.rank * E:(self.rank + 1) * E]

    def optimize(self, epoch: int, micro_loss) -> dict:
        """The epoch's optimizer steps over this rank's elements (``micro_loss(positions)``, in order).

        Nothing inside the micro-batch loop waits for the device: the loss's finiteness and the metrics
        accumulate in device tensors and are read once per optimizer step, before that step's update
        (a non-finite micro-batch stops the run there, the weights not updated)."""
        E = self.layout.elements_per_rank
        mb, steps, accum = self.layout.micro_batch_rows, self.layout.optimizer_steps, self.layout.grad_accum
        sums: dict[str, float] = {}
        bar = progress.bar(total=E // mb, desc=f"epoch {epoch + 1} train", enabled=self.progress)
        for s in range(steps):
            finite = torch.ones((), dtype=torch.bool, device=self.device)
            acc: dict[str, torch.Tensor] = {}
            for m in range(accum):
                start = (s * accum + m) * mb
                loss, metrics = micro_loss(slice(start, start + mb))
                finite = finite & torch.isfinite(loss.detach())
                metrics["loss"] = loss.detach()
                self.engine.backward(loss)
                for key, value in metrics.items():
                    value = value.detach().float() / accum
                    acc[key] = acc[key] + value if key in acc else value
                if m < accum - 1:
                    self.engine.step()  # (DeepSpeed counts the micro-batch; no update before the boundary)
                bar.update(1)
            names = list(acc)
            values = torch.stack([finite.float(), *(acc[k] for k in names)]).tolist()  # the step's one read
            if values[0] != 1.0:
                raise FloatingPointError(
                    f"the loss became non-finite at epoch {epoch + 1}, step {s + 1}; the weights were not "
                    "updated and the last checkpoint is intact: lower train.learning_rate and resume")
            self.engine.step()  # the update, at the accumulation boundary
            self.global_step += 1
            step = distributed.mean_over_ranks(dict(zip(names, values[1:])))
            step["grad_norm"] = self.engine.grad_norm()
            self.report.log("step", {"epoch": epoch + 1, "step": self.global_step, **step}, self.global_step)
            for key, value in step.items():
                if value is not None:
                    sums[key] = sums.get(key, 0.0) + value / steps
        bar.close()
        return sums

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Deterministic (no churn) samples for a fixed prompt list and fixed seeds; mean of each metric,
        and ``eval/pixel_diversity``: for each prompt with at least 2 of the images, the RMS pairwise
        distance per pixel value between its images (values in [0, 1], images area-downsampled to at
        most 64×64 pixels), averaged over those prompts; absent when no prompt has 2 images. A reward
        can be bought by drawing one image per prompt: this says whether the images still differ.
        Rank 0 saves a grid of the first prompts' images, whichever rank drew them
        (``samples/eval_epoch_XXXX.png``, fdfo.report.EvalGrid)."""
        cfg = self.cfg.eval
        n = cfg.num_images
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        gen = torch.Generator().manual_seed(cfg.seed)
        latents = torch.randn(n, *self.model.latent_shape, generator=gen)  # same noise whatever the world size
        per_rank = math.ceil(n / self.world_size)  # equal work on every rank; the padding is masked out
        idx = [(self.rank * per_rank + j) % n for j in range(per_rank)]
        is_valid = [self.rank * per_rank + j < n for j in range(per_rank)]
        valid = torch.tensor(is_valid, device=self.device)
        grid = self.report.eval_grid(prompts)  # each rank adds the images it draws; rank 0 saves them all
        # Per-prompt sums for the diversity, over the prompts drawn at least twice (the same on every rank).
        counts: dict[str, int] = {}
        for q in prompts:
            counts[q] = counts.get(q, 0) + 1
        slot = {q: k for k, q in enumerate(q for q, c in counts.items() if c >= 2)}
        div_count = div_sq = div_x = None
        if slot:
            div_count = torch.zeros(len(slot), dtype=torch.float64, device=self.device)
            div_sq = torch.zeros_like(div_count)
        t0 = time.time()
        sums = {name: 0.0 for name in ["reward", *self.eval_metrics]}
        mb = self.policy.forward_rows
        with self.policy.sampling():
            for i in range(0, len(idx), mb):
                chunk = idx[i:i + mb]
                p = [prompts[j] for j in chunk]
                x0 = sample_deterministic(self.policy.velocity_fn(self.model.encode(p)),
                                          latents[chunk].to(self.device), self.policy.sigmas)
                images = self.model.decode(x0)
                mask = valid[i:i + mb].float()
                rewards = self.reward(p, images)[0]
                sums["reward"] += float((rewards * mask).sum())
                if grid is not None:
                    drawn = [k for k in range(len(chunk)) if is_valid[i + k]]  # (not the padding's repeats)
                    grid.add([chunk[k] for k in drawn], images[drawn], rewards[drawn])
                for name, metric in self.eval_metrics.items():
                    sums[name] += float((metric(p, images).float() * mask).sum())
                if slot:
                    x = _diversity_pixels(images)
                    if div_x is None:  # (every rank samples at least one chunk, so every rank gets here)
                        div_x = torch.zeros(len(slot), x.shape[1], dtype=torch.float64, device=self.device)
                    rows = [r for r, q in enumerate(p) if q in slot and is_valid[i + r]]
                    k = torch.tensor([slot[p[r]] for r in rows], dtype=torch.long, device=self.device)
                    x = x[rows]
                    div_count.index_add_(0, k, torch.ones(len(rows), dtype=torch.float64, device=self.device))
                    div_sq.index_add_(0, k, x.pow(2).sum(1))
                    div_x.index_add_(0, k, x)
        totals = distributed.sum_over_ranks(list(sums.values()))
        record = {"epoch": epoch, **{f"eval/{k}": v / n for k, v in zip(sums, totals)}}
        if slot:  # one reduction of the per-prompt sums: no images cross ranks
            P, D = div_x.shape
            total = distributed.sum_over_ranks(torch.cat([div_count, div_sq, div_x.flatten()]))
            value = pixel_diversity(total[:P], total[2 * P:].view(P, D), total[P:2 * P])
            if value is not None:
                record["eval/pixel_diversity"] = value
        record["seconds"] = time.time() - t0
        self.report.log("eval", record, self.global_step)
        if grid is not None:
            self.report.save_eval_grid(grid, epoch, self.global_step)
        return record

    # ------------------------------------------------------------------ the run

    def save_checkpoint(self) -> Path:
        for p in self.model.trainable_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError("refusing to write a checkpoint with non-finite weights")
        path = self.checkpoints.save(self.epoch, {"epoch": self.epoch, "global_step": self.global_step,
                                                  "zero_stage": self.engine.zero_stage,
                                                  "history": self.report.history, "config": self.cfg.to_dict()})
        distributed.print0(f"checkpoint written: {path}")
        return path

    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.epoch == 0 and cfg.eval.every:
            distributed.print0("base model: " + self._summary(self.evaluate(0)))
        trained, first, t_run = 0, self.epoch, time.time()
        for epoch in range(self.epoch, cfg.train.epochs):
            with self._part(f"epoch {epoch + 1}"):
                rec = self.train_epoch(epoch)
            if self.guard is not None:
                self.guard.check(rec)  # the first trained epoch after a resume: stops before anything is written
            trained += not rec["skipped"]
            self.epoch = epoch + 1
            last = self.epoch == cfg.train.epochs
            left = progress.eta(time.time() - t_run, self.epoch - first, cfg.train.epochs - first)
            distributed.print0(self._summary(rec) + (f" | about {left} left" if left and not last else ""))
            if cfg.eval.every and (self.epoch % cfg.eval.every == 0 or last):
                with self._part(f"the evaluation after epoch {self.epoch}"):
                    distributed.print0(self._summary(self.evaluate(self.epoch)))
            if cfg.log.plot_every and (self.epoch % cfg.log.plot_every == 0 or last):
                self.report.plot_curves()
            if self.checkpoints.due(self.epoch, last):
                self.save_checkpoint()
        self.report.close()
        if not trained:
            raise TrainingError(f"every epoch of this run ({self.epoch} of train.epochs={cfg.train.epochs}) was "
                                "skipped for non-finite rewards: nothing was trained. The warnings above name the "
                                "reward and prompts; check reward.weights and the reward models")
        return self.report.history

    @contextlib.contextmanager
    def _part(self, what: str, load_hint: str = ""):
        """Turns the failure of a part the run depends on into one line (fdfo.failures): a reward that raised
        or miscounted, an out-of-memory error (with the settings that lower memory), and, given ``load_hint``,
        a model that could not be built. Raised before anything of the failed part is written; other errors
        (a config error, a missing file named as such) pass unchanged."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            tuned = getattr(self, "tuned", None)
            hint = failures.memory_hint(self.cfg, tuned.train_rows if tuned else self.layout.micro_batch_rows,
                                        tuned.sample_pairs if tuned else self.cfg.sampling.micro_batch_pairs)
            raise failures.part_failed(f"{what} ran out of memory", exc, self.out_dir, hint) from exc
        except RewardFailed as exc:
            raise failures.part_failed(f"{what}: the reward failed", exc, self.out_dir,
                                       "check reward.weights, reward.paths and the reward models") from exc
        except (ConfigError, FileNotFoundError, TrainingError):
            raise
        except (OSError, RuntimeError, ValueError, ImportError) as exc:
            if not load_hint:
                raise
            raise failures.part_failed(f"{what} failed", exc, self.out_dir, load_hint) from exc

    def _summary(self, record: dict) -> str:
        """One line per epoch or evaluation: the reward, the algorithm's own metrics, times, eval metrics."""
        keys = ["epoch", "reward_mean", "reward_std", *self.algorithm.summary, "epoch_s"]
        keys += [k for k in record if k.startswith("eval/")]
        parts = []
        for k in keys:
            v = record.get(k)
            if v is None:
                continue
            if k == "epoch":
                v = f"{v}/{self.cfg.train.epochs}"
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        if record.get("skipped"):
            parts.append("SKIPPED (non-finite rewards)")
        return " ".join(parts)
