"""The interface between the training loop and an RL algorithm, and what algorithms share.

An algorithm (FDFO, Flow-GRPO) is an object the trainer drives once per epoch:

    check(cfg)                class method: the algorithm's own config checks (a ConfigError)
    layout_for(cfg, world)    class method: the epoch's batch sizes, or a ConfigError at start-up
    sample(epoch, scorer)     an epoch's batch: row prompts, and whatever the algorithm keeps
                              (trajectories, log-probabilities); each sampled micro-batch's final
                              states go to the scorer (fdfo.scoring), which decodes and rewards them
                              while the next micro-batch samples
    elements(batch, R, std)   rewards in, the epoch's training elements out: how many there are
                              (over all ranks) and the micro-batch loss of any index set of them
    summary                   the metric names the one-line epoch summary shows

The trainer never names an algorithm: it rewards the batch, skips it if a reward is
not finite, shuffles the elements globally and runs the optimizer steps.

``Policy`` is what every algorithm needs from the model being trained: the σ grid,
the velocity while sampling, while training and of the frozen base, text encoding,
decoding, and per-micro-batch random generators seeded by the *global* micro-batch
index, so that an epoch's samples do not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch

from fdfo import distributed, tuning
from fdfo.config import AUTO
from fdfo.context import RunContext, Stream
from fdfo.errors import ConfigError
from fdfo.models import Conditioning
from fdfo.scoring import Scorer
from fdfo.trajectories import TrajectoryStore

# A micro-batch loss: positions start:stop of this rank's training order (a slice: indexing with it neither
# copies an index to the device nor reads one back) -> (loss, metrics as device tensors).
MicroLoss = Callable[[slice], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def valid_values(n: int, given: int, count: int = 8) -> str:
    """The divisors of ``n`` nearest to ``given``, for an error message about a size that must divide ``n``."""
    divisors = [m for m in range(1, n + 1) if n % m == 0]
    near = sorted(sorted(divisors, key=lambda m: (abs(m - given), m))[:count])
    return f"the valid values nearest to {given}: {near} (every divisor of {n} is valid)"


@dataclass(frozen=True)
class Layout:
    """How one epoch splits over ranks, optimizer steps and micro-batches."""

    rows_per_rank: int  # images sampled (and rewarded) per rank
    elements_per_rank: int  # training elements per rank
    optimizer_steps: int
    micro_batch_rows: int  # training elements per forward/backward

    @property
    def elements_per_step(self) -> int:
        return self.elements_per_rank // self.optimizer_steps

    @property
    def grad_accum(self) -> int:
        return self.elements_per_step // self.micro_batch_rows


@dataclass
class Batch:
    """One rank's sampled batch: ``images`` [rows, C, H, W] in [0, 1] with their ``prompts`` (one per row),
    the algorithm's own tensors in ``data``, and the rows' ``rewards`` [rows] with the reward's ``parts``
    when ``sample`` was given a scorer with a reward (``fdfo.scoring``)."""

    prompts: list[str]
    images: torch.Tensor
    data: dict = field(default_factory=dict)
    rewards: torch.Tensor | None = None
    parts: dict = field(default_factory=dict)


@dataclass
class MicroBatch:
    start: int  # first item of this rank's list
    size: int
    gen_cpu: torch.Generator  # Stream.SAMPLE_HOST of (epoch, global micro-batch index)
    gen_dev: torch.Generator  # Stream.SAMPLE_DEVICE of the same, on the device


class Policy:
    """The model being trained, as the algorithms see it."""

    def __init__(self, cfg, model, engine, ctx: RunContext, sample_pairs: int | None = None):
        """sample_pairs: pairs per sampling forward (``fdfo.tuning``'s choice for the device; None: the
        config's integer, or for "auto" the published 3)."""
        self.cfg, self.model, self.engine, self.ctx, self.device = cfg, model, engine, ctx, ctx.device
        given = cfg.sampling.micro_batch_pairs
        self.sample_pairs = sample_pairs or (tuning.CPU_SAMPLE_PAIRS if given == AUTO else int(given))
        self.kernels = cfg.train.kernels  # fdfo.kernels backend of every fused kernel call
        self.sigmas = model.sigmas(cfg.sampling.steps)  # [T + 1], CPU
        self.progress = ctx.progress
        self.guidance = cfg.sampling.guidance_scale
        self.uncond = model.encode([cfg.sampling.negative_prompt]) if self.guidance != 1.0 else None

    # ------------------------------------------------------------------ velocities

    def velocity_fn(self, cond: Conditioning) -> Callable:
        """v(x, σ) for sampling (no gradient needed; CFG as configured; the inference copy under ZeRO-3)."""
        return lambda x, t: self.model.velocity(x, t, cond, self.guidance, self.uncond)

    def train_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity through the training engine (its hooks run; the gradient flows to the weights)."""
        return self.model.velocity(x, sigma, cond, self.guidance, self.uncond, net=self.engine.module)

    @torch.no_grad()
    def base_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen base model's velocity (LoRA adapter disabled), for KL terms; needs LoRA (config-checked)."""
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

    # ------------------------------------------------------------------ sampling phase

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Text encoders on the device and the weights materialised for the many sampling forwards."""
        self.model.move_text_encoders(self.device)
        with self.engine.inference_weights():
            yield

    def encode(self, prompts: list[str]) -> Conditioning:
        mb = self.sample_pairs
        return Conditioning.cat([self.model.encode(prompts[i:i + mb]) for i in range(0, len(prompts), mb)])

    @property
    def forward_rows(self) -> int:
        """Rows per sampling forward (both rows of ``sample_pairs`` pairs)."""
        return 2 * self.sample_pairs

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        mb = self.forward_rows
        return torch.cat([self.model.decode(x0[i:i + mb]) for i in range(0, x0.shape[0], mb)])

    def micro_batches(self, epoch: int, n: int, size: int) -> list[MicroBatch]:
        """This rank's n items in micro-batches, each with generators seeded by its *global* index.

        Seeding by (seed, epoch, global micro-batch) rather than by rank makes the epoch's samples the
        same on any number of ranks (when n is a multiple of size), so runs compare across world sizes.
        """
        per_rank = math.ceil(n / size)
        out = []
        for i in range(per_rank):
            g = self.ctx.rank * per_rank + i
            gen_cpu = self.ctx.generator(Stream.SAMPLE_HOST, epoch, g)
            gen_dev = self.ctx.generator(Stream.SAMPLE_DEVICE, epoch, g, device=self.device)
            out.append(MicroBatch(i * size, min(size, n - i * size), gen_cpu, gen_dev))
        return out


class Algorithm(ABC):
    """An RL algorithm the trainer drives (see the module docstring)."""

    name: ClassVar[str]  # its name in train.algorithm, and the name of its section of the run config
    Settings: ClassVar[type]  # its settings: a frozen dataclass of fdfo.config fields (fdfo.settings composes it)
    summary: ClassVar[tuple[str, ...]] = ("policy_loss", "clipfrac", "grad_norm")
    # Bytes of trajectory tensors this rank held for the last epoch's training: its own samples plus
    # what it fetched for its elements (logged per epoch as trajectory_mib), wherever they lived.
    held_bytes: int = 0
    kl_key: ClassVar[str]  # the field of its settings that holds its KL weight
    grid_group: int = 2  # consecutive images of one sampling unit (a pair), one row of the sample grid

    @classmethod
    def check(cls, cfg) -> None:
        """Config checks of this algorithm, run when the config is built: a KL term needs LoRA (the
        base model is the model with its adapter disabled)."""
        value, key = getattr(cls.settings_of(cfg), cls.kl_key), f"{cls.name}.{cls.kl_key}"
        if value > 0 and not cfg.lora.enabled:
            raise ConfigError(f"config key '{key}' is {value}, but a KL term needs LoRA (the base model is "
                              f"the model with its adapter disabled): set lora.enabled true or {key} 0")

    @classmethod
    def settings_of(cls, cfg):
        """This algorithm's section of the run config (an instance of its ``Settings``)."""
        return getattr(cfg, cls.name)

    def __init__(self, cfg, policy: Policy, prompts: list[str], layout: Layout):
        self.cfg, self.policy, self.prompts, self.layout = cfg, policy, prompts, layout
        self.settings = self.settings_of(cfg)
        # Sampled trajectories and the fetched elements live here: on the device or in host memory.
        self.store = TrajectoryStore(cfg.train.trajectory_device, policy.device)

    @property
    def device_held_bytes(self) -> int:
        """The most trajectory bytes on the training device at once in the last epoch (logged as
        trajectory_device_mib): all of ``held_bytes``, or about a micro-batch's with trajectories in host memory."""
        return self.store.device_bytes if self.store.host else self.held_bytes

    @classmethod
    @abstractmethod
    def layout_for(cls, cfg, world_size: int) -> Layout:
        """The epoch's layout on ``world_size`` ranks; a ConfigError when the sizes do not divide."""

    @abstractmethod
    def sample(self, epoch: int, scorer: Scorer | None = None) -> Batch:
        """This rank's batch of the epoch, drawn from generators seeded by (seed, epoch, global index); each
        micro-batch's final states and row prompts go to ``scorer.submit`` as soon as they are sampled, and
        the batch holds ``scorer.result()`` (without a scorer: the decoded images alone)."""

    @abstractmethod
    def elements(self, batch: Batch, rewards: torch.Tensor, reward_std: float, order: torch.Tensor) -> MicroLoss:
        """The micro-batch loss of this rank's training elements: ``order`` holds their ids in the
        epoch's global list (rank-major over the ranks' rows: the element ids of rank r's rows come
        before rank r + 1's), in training order, and ``micro_loss(p)`` is the loss of ``order[p]`` (``p`` a
        slice of positions; it must not wait for the device: the trainer reads its results once per step).
        Collective: every rank calls it, and fetches the rows its elements need (``self.store.fetch``);
        afterwards the trainer drops ``batch.data``, so ``micro_loss`` must hold what it uses."""

    def throughput(self, rows: int, seconds: float) -> dict[str, float]:
        """Extra throughput figures of an epoch of ``rows`` images (over all ranks)."""
        return {}


def fetch(rows: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows ``rows`` (global, rank-major) of small per-row tensors (pair differences, embeddings) on
    their device: only the rows this rank's elements reference travel (``distributed.fetch_rows``).
    Trajectory tensors go through ``Algorithm.store.fetch``, which may keep them in host memory."""
    return [distributed.fetch_rows(t, rows) for t in tensors]
