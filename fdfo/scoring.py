"""Decoding and rewarding an epoch's samples as they are sampled (``reward.overlap``).

An algorithm hands each sampled micro-batch's final states to ``Scorer.submit`` and collects
the epoch's images and rewards from ``Scorer.result``. With overlap on, a worker thread
decodes and scores while the caller samples the next micro-batch; on CUDA the worker runs on
its own stream, ordered after the sampler's work by an event, so the decoder and the reward
models fill the gaps of the sampling loop instead of waiting for it to end. With overlap off
the same work runs at once, in the caller's thread and stream.

The reward sees exactly the chunks it would see scoring the whole batch at once: images wait
until ``chunk`` of them are decoded (the reward's batch size), and the remainder is scored by
``result``. So both modes give bit-identical images and rewards.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from fdfo.errors import RewardFailed, first_line

Decode = Callable[[torch.Tensor], torch.Tensor]  # final states [n, C, h, w] -> images [n, 3, H, W] in [0, 1]
Reward = Callable[[list[str], torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class Scored:
    """An epoch's images, in submission order, with their rewards (None without a reward)."""

    images: torch.Tensor
    rewards: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Scorer:
    """Decodes (and, given ``reward``, scores) submitted micro-batches; see the module docstring.

    decode:  final states -> images (e.g. ``Policy.decode``).
    reward:  (prompts, images) -> (rewards [n], {part: [n]}) (e.g. ``WeightedReward``), or None.
    chunk:   images per reward call (the reward's batch size).
    overlap: work on a worker thread (and its own CUDA stream) while the caller goes on.
    """

    def __init__(self, decode: Decode, reward: Reward | None = None, *, chunk: int = 8, overlap: bool = False):
        self.decode, self.reward, self.chunk = decode, reward, max(1, int(chunk))
        self._images: list[torch.Tensor] = []
        self._rewards: list[torch.Tensor] = []
        self._parts: list[dict[str, torch.Tensor]] = []
        self._waiting: list[tuple[list[str], torch.Tensor]] = []  # decoded, not yet scored
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fdfo-scorer") if overlap else None
        self._jobs: list[Future] = []
        self._side: torch.cuda.Stream | None = None  # the worker's CUDA stream (made at the first CUDA submit)

    # ------------------------------------------------------------------ the caller's side

    def submit(self, prompts: list[str], x0: torch.Tensor) -> None:
        """One micro-batch's final states (their rows' prompts beside them)."""
        if len(prompts) != x0.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x0.shape[0]} rows")
        if self._pool is None:
            self._work(list(prompts), x0, None)
            return
        ready = None
        if x0.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x0.device))
            if self._side is None:
                self._side = torch.cuda.Stream(x0.device)
            x0.record_stream(self._side)  # (used there: its memory is not reused before that stream is done)
        self._jobs.append(self._pool.submit(self._work, list(prompts), x0, ready))

    def result(self) -> Scored:
        """Every submitted micro-batch's images and rewards, in submission order (waits for the worker)."""
        if self._pool is not None:
            self._jobs.append(self._pool.submit(self._flush))
            try:
                for job in self._jobs:
                    job.result()  # (re-raises the worker's error here)
            finally:
                self.close()
        else:
            self._flush()
        images = torch.cat(self._images) if self._images else torch.empty(0)
        if self.reward is None:
            return Scored(images)
        rewards = torch.cat(self._rewards) if self._rewards else torch.empty(0)
        parts = {k: torch.cat([p[k] for p in self._parts]) for k in (self._parts[0] if self._parts else {})}
        for t in (images, rewards, *parts.values()):  # made on the worker's stream, used on this one
            if t.is_cuda and self._side is not None:
                t.record_stream(torch.cuda.current_stream(t.device))
        return Scored(images, rewards, parts)

    def close(self) -> None:
        """Stop the worker (pending work is cancelled); on CUDA this stream waits for the worker's."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._side is not None:
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the work (worker or caller)

    def _work(self, prompts: list[str], x0: torch.Tensor, ready: torch.cuda.Event | None) -> None:
        with torch.no_grad(), self._on_side():  # (grad mode and the current stream are per thread)
            if ready is not None:
                self._side.wait_event(ready)
            self._decode_and_score(prompts, x0)

    def _on_side(self):
        """The worker's stream as the current one (a no-op without CUDA or without overlap)."""
        if self._pool is None or self._side is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._side)

    def _decode_and_score(self, prompts: list[str], x0: torch.Tensor) -> None:
        images = self.decode(x0)
        self._images.append(images)
        if self.reward is None:
            return
        self._waiting.append((prompts, images))
        while sum(len(p) for p, _ in self._waiting) >= self.chunk:
            self._score(self.chunk)

    def _flush(self) -> None:
        """Score what waits (fewer than ``chunk`` images)."""
        if self.reward is None:
            return
        with torch.no_grad(), self._on_side():
            while self._waiting:
                self._score(self.chunk)

    def _score(self, n: int) -> None:
        """Score the first ``n`` waiting images (all of them when fewer wait)."""
        prompts, images, taken = [], [], 0
        while self._waiting and taken < n:
            p, im = self._waiting[0]
            k = min(n - taken, len(p))
            prompts += p[:k]
            images.append(im[:k])
            if k == len(p):
                self._waiting.pop(0)
            else:
                self._waiting[0] = (p[k:], im[k:])
            taken += k
        try:
            rewards, parts = self.reward(prompts, torch.cat(images))
        except torch.OutOfMemoryError:
            raise  # (the run's memory, not the reward's fault: the trainer says which settings lower it)
        except Exception as exc:  # noqa: BLE001  (any failure of the reward model: named, never trained on)
            raise RewardFailed(first_line(exc)) from exc
        self._rewards.append(rewards)
        self._parts.append(parts)
