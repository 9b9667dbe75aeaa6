"""The run context: what every part of a run needs to know about the process it runs in, made once.

The trainer (or a test, without any process group: ``RunContext.local``) makes one and passes it down;
parts read the rank, the world size, the device and whether to draw progress bars from it, and draw every
random number from a generator of one of the run's named streams, never from torch's global generator.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Iterator

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, stream): stable across runs and resumes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & ((1 << 64) - 1)
    return h >> 1


class Stream(enum.IntEnum):
    """The run's random streams. A generator of stream S for indices (i, j, ...) is seeded by
    ``derive_seed(train.seed, i, j, ..., S)``: independent of every other stream and index, and the same
    on any number of ranks and after a resume."""

    SAMPLE_HOST = 0  # a sampling micro-batch's host draws (prompts, churn, graph seed): (epoch, global micro-batch)
    SAMPLE_DEVICE = 1  # the same micro-batch's device draws (latents, noise): (epoch, global micro-batch)
    GROUP_PROMPTS = 2  # Flow-GRPO's prompts of an epoch's groups: (epoch, 0)
    SHUFFLE = 7  # the epoch's global permutation of training elements: (epoch,)
    TRAINED_STEPS = 8  # FDFO's subset of trained steps per row (fdfo.timestep_fraction): (epoch,)
    ADAPTER = 9  # the LoRA adapter's initialisation: ()


@dataclass(frozen=True)
class RunContext:
    rank: int
    world_size: int
    device: torch.device
    progress: bool  # progress bars: log.progress, on rank 0 only
    seed: int  # train.seed, the root of every stream

    @classmethod
    def local(cls, seed: int = 0, device: torch.device | str = "cpu", progress: bool = False) -> "RunContext":
        """One process, no process group (tests, tools)."""
        return cls(rank=0, world_size=1, device=torch.device(device), progress=progress, seed=seed)

    def seed_of(self, stream: Stream, *indices: int) -> int:
        return derive_seed(self.seed, *indices, stream)

    def generator(self, stream: Stream, *indices: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator of ``stream`` at ``indices``, on ``device`` (the host by default)."""
        return torch.Generator(device).manual_seed(self.seed_of(stream, *indices))


@contextlib.contextmanager
def global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """torch's global generator (and ``device``'s, for a GPU) seeded with ``seed`` inside the block and
    restored after it: for library code that draws from it (diffusers and peft initialise weights there)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
