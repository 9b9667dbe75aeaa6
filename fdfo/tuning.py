"""Sizes and placements chosen for the device: the "auto" values of ``train.micro_batch_rows``,
``sampling.micro_batch_pairs`` and ``train.offload_text_encoders``.

A micro-batch's rows must divide what it splits (an optimizer step's elements, a rank's pairs),
so "auto" takes the largest divisor that fits. On the CPU nothing is measured: the published
sizes (6 training rows, 3 pairs per sampling forward) or the nearest divisor below them. On
CUDA, once the model, its adapter and the rewards are on the device, a probe runs the
transformer at two micro-batch sizes and reads the peak memory of each; the difference gives
the bytes per row and the rest the fixed cost, so

    rows = the largest divisor with  fixed + rows · per_row + reserved  ≤  FREE_FRACTION · free memory

where ``reserved`` is what the epoch will hold beside the micro-batch and the probe did not see
(the epoch's trajectories, the optimizer's state and gradients). The text encoders stay on the
GPU when the training micro-batch chosen with them moved off still fits with them on; otherwise
they wait in pinned host memory while the run trains. Every chosen value is logged; an integer in
the config is used as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fdfo.config import AUTO
from fdfo.models import Conditioning

CPU_TRAIN_ROWS = 6  # the published training micro-batch
CPU_SAMPLE_PAIRS = 3  # the published sampling micro-batch (6 rows per forward)
MAX_TRAIN_ROWS = 64  # past this a larger micro-batch buys nothing but risk
MAX_SAMPLE_PAIRS = 32
FREE_FRACTION = 0.85  # of the free device memory a micro-batch may plan to use (fragmentation, workspaces)
OPTIMIZER_BYTES = 16  # per trainable weight: AdamW's two moments, its fp32 master and the gradient


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def given_or_default(value: int | str, units: int, default: int) -> int:
    """A micro-batch size from the config: the integer given, or for "auto" the largest divisor of
    ``units`` (what the micro-batches split) up to ``default``."""
    return largest_divisor(units, default) if value == AUTO else int(value)


@dataclass(frozen=True)
class MemoryLine:
    """Peak device bytes of one micro-batch as a line in its rows: ``fixed + per_row · rows``."""

    fixed: float
    per_row: float

    @classmethod
    def through(cls, rows: tuple[int, int], peaks: tuple[int, int]) -> "MemoryLine":
        (r1, r2), (p1, p2) = rows, peaks
        per_row = max((p2 - p1) / (r2 - r1), 1.0)
        return cls(fixed=max(p1 - per_row * r1, 0.0), per_row=per_row)

    def most_rows(self, units: int, free: float, reserved: float, limit: int) -> int:
        """The largest divisor of ``units`` (at most ``limit``) whose peak, beside ``reserved``, fits
        ``FREE_FRACTION`` of ``free``; 1 when none does (the run then finds out, with the OOM hint)."""
        budget = FREE_FRACTION * free - reserved - self.fixed
        fits = int(budget // self.per_row) if budget > 0 else 0
        return largest_divisor(units, max(1, min(fits, limit)))


def module_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """The peak device memory ``run()`` allocates above what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass(frozen=True)
class Tuned:
    train_rows: int
    sample_pairs: int
    offload_text_encoders: bool
    why: str  # one line for the log


def probe_inputs(model, rows: int, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Random states, σ and ``cond`` repeated to ``rows`` rows, on the model's device."""
    x = torch.randn(rows, *model.latent_shape, device=model.device, dtype=model.dtype)
    sigma = torch.rand(rows, device=model.device)
    return x, sigma, Conditioning(cond.embeds[:1].expand(rows, -1, -1).contiguous(),
                                  cond.pooled[:1].expand(rows, -1).contiguous())


def tune(cfg, model, units_train: int, units_sample: int, default_rows: int, trajectory_bytes: int,
         log: Callable[[str], None]) -> Tuned:
    """The run's micro-batches and text-encoder placement for ``model.device`` (see the module docstring).

    units_train: an optimizer step's elements per rank; units_sample: the pairs a rank samples;
    default_rows: the training micro-batch without measuring (the config's integer, or the CPU choice);
    trajectory_bytes: what the epoch's stored trajectories hold on the device while it trains."""
    t, s = cfg.train, cfg.sampling
    pairs = given_or_default(s.micro_batch_pairs, units_sample, CPU_SAMPLE_PAIRS)
    offload = t.offload_text_encoders
    device = model.device
    if device.type != "cuda":
        return Tuned(default_rows, pairs, False, "")
    if t.micro_batch_rows != AUTO and s.micro_batch_pairs != AUTO and offload != AUTO:
        return Tuned(default_rows, pairs, bool(offload), "")
    guidance = s.guidance_scale
    cond = model.encode([s.negative_prompt or ""])
    uncond = cond if guidance != 1.0 else None
    trainable = model.trainable_parameters()

    def train_peak(rows: int) -> int:
        def run():
            x, sigma, c = probe_inputs(model, rows, cond)
            v = model.velocity(x, sigma, c, guidance, uncond)
            v.float().square().mean().backward()
            for p in trainable:
                p.grad = None
        return peak_bytes(run, device)

    def sample_peak(pairs_: int) -> int:
        def run():
            with torch.no_grad():
                x, sigma, c = probe_inputs(model, 2 * pairs_, cond)
                model.velocity(x, sigma, c, guidance, uncond)
        return peak_bytes(run, device)

    free, _ = torch.cuda.mem_get_info(device)
    encoders = module_bytes(model.text_encoders())
    reserved = trajectory_bytes + OPTIMIZER_BYTES * sum(p.numel() for p in trainable)
    rows, why = default_rows, []
    if t.micro_batch_rows == AUTO:
        line = MemoryLine.through((1, 2), (train_peak(1), train_peak(2)))
        # with the encoders moved off when "auto" may move them (they are on the device now, in ``free``)
        room = free + (encoders if offload in (AUTO, True) else 0)
        rows = line.most_rows(units_train, room, reserved, MAX_TRAIN_ROWS)
        why.append(f"train.micro_batch_rows={rows} ({line.per_row / 2**20:.0f} MiB a row, "
                   f"{room / 2**30:.1f} GiB free)")
        need = line.fixed + line.per_row * rows + reserved
    else:
        need = reserved
    if offload == AUTO:
        offload = need > FREE_FRACTION * free
        why.append("text encoders " + ("offloaded to pinned host memory while training" if offload
                                       else f"kept on the GPU ({encoders / 2**30:.1f} GiB fits)"))
    if s.micro_batch_pairs == AUTO:
        line = MemoryLine.through((1, 2), (sample_peak(1), sample_peak(2)))
        pairs = line.most_rows(units_sample, free, trajectory_bytes, MAX_SAMPLE_PAIRS)
        why.append(f"sampling.micro_batch_pairs={pairs} ({line.per_row / 2**20:.0f} MiB a pair)")
    torch.cuda.empty_cache()
    if why:
        log("auto: " + "; ".join(why))
    return Tuned(rows, pairs, bool(offload), "; ".join(why))
