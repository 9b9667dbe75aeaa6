"""Where an epoch's trajectory tensors live while it trains (``train.trajectory_device``).

``device`` (default)
    The sampled states and velocities stay on the training device; the exchange brings this
    rank's training elements onto it; each micro-batch indexes them there.
``host``
    Each sampled micro-batch's trajectories are copied to (pinned) host memory as soon as it is
    sampled, so the device holds one micro-batch of them at a time; the exchange lands this
    rank's elements in host memory too, staging at most ``CHUNK_BYTES`` per collective round
    (NCCL's collectives need device tensors, so each round goes through the device); and
    while micro-batch ``m`` trains, micro-batch ``m + 1`` is copied to the device on a side CUDA
    stream, so the copy overlaps the forward and backward.

The values are moved, never computed, so both give bit-identical training. On a machine
without CUDA, host and device memory are one: ``host`` runs the same code (chunked exchange,
one micro-batch served at a time) without pinning or a copy stream.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from fdfo import distributed

PLACES = ("device", "host")
# Bytes per rank and collective round of a host-memory exchange (the environment variable sets it for
# tuning, and for tests that want many rounds).
CHUNK_BYTES = int(os.environ.get("FDFO_TRAJECTORY_CHUNK_BYTES", 256 * 2**20))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TrajectoryStore:
    """Keeps an algorithm's per-row and per-element trajectory tensors where the config says, and
    serves micro-batches of them to the training device."""

    def __init__(self, place: str, device: torch.device):
        if place not in PLACES:
            raise ValueError(f"train.trajectory_device must be one of {', '.join(PLACES)}, not '{place}'")
        self.place, self.device = place, device
        self.host = place == "host"
        self.pin = self.host and device.type == "cuda"
        self.device_bytes = 0  # the most trajectory bytes on the device at once, this epoch

    def new_epoch(self) -> None:
        self.device_bytes = 0

    def buffer(self, rows: int) -> "EpochBuffer":
        """A tensor of ``rows`` rows where trajectories live, filled a sampled micro-batch at a time: the
        epoch's trajectories are written once into it, never concatenated (which would hold them twice)."""
        return EpochBuffer(self, rows)

    def keep(self, *pairs: tuple["EpochBuffer", torch.Tensor]) -> None:
        """One sampled micro-batch's tensors into their epoch buffers (``(buffer, tensor)`` pairs); with
        the trajectories in host memory, that micro-batch was the most of them on the device at once."""
        self.device_bytes = max(self.device_bytes, nbytes(*(t for _, t in pairs)))
        for buf, t in pairs:
            buf.append(t)

    def fetch(self, rows: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Rows ``rows`` (global, rank-major) of each per-row tensor, exchanged between the ranks
        (``distributed.fetch_rows``) into the store's memory. In host memory the exchange moves rounds of
        at most ``CHUNK_BYTES`` on the collectives' device: a round stages what this rank sends (up to
        the world size times a round's rows, when every rank asks it for all of theirs), receives and
        reorders, so a round is ``CHUNK_BYTES / (world + 2)`` of rows; what it staged is counted in
        ``device_bytes``."""
        if not self.host:
            return [distributed.fetch_rows(t, rows) for t in tensors]
        out, staged = [], []
        for t in tensors:
            per_round = CHUNK_BYTES // max(nbytes(t[:1]) * (distributed.world_size() + 2), 1)
            out.append(distributed.fetch_rows(t, rows, into=torch.device("cpu"), pin=self.pin,
                                              chunk_rows=max(1, per_round), staged=staged))
        if distributed.active():
            self.device_bytes = max([self.device_bytes, *staged])
        return out

    def server(self, *tensors: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """``serve(p)``: each tensor's rows ``p`` (a micro-batch's positions: a slice, as the trainer gives
        them, or an index tensor) on the training device.

        On the device this indexes (a slice is a view: nothing is copied or synchronised). In host memory
        it copies; consecutive runs (slices, or index tensors that hold one) are read as slices, and the
        run after them is copied ahead on a side stream while the caller computes with these."""
        if not self.host:
            return lambda p: [t[p] for t in tensors]
        return _HostServer(self, tensors)


class EpochBuffer:
    """An epoch's tensor of one kind (states, velocities), allocated at the first micro-batch."""

    def __init__(self, store: TrajectoryStore, rows: int):
        self.store, self.rows, self.filled = store, rows, 0
        self.data: torch.Tensor | None = None

    def append(self, t: torch.Tensor) -> None:
        """Copy a sampled micro-batch [n, ...] (on the device) into the next n rows."""
        if self.data is None:
            where = dict(device="cpu", pin_memory=self.store.pin) if self.store.host else dict(device=t.device)
            self.data = torch.empty(self.rows, *t.shape[1:], dtype=t.dtype, **where)
        self.data[self.filled:self.filled + t.shape[0]].copy_(t)
        self.filled += t.shape[0]

    def tensor(self) -> torch.Tensor:
        if self.filled != self.rows:
            raise RuntimeError(f"the epoch buffer holds {self.filled} of its {self.rows} rows")
        return self.data


class _HostServer:
    """Serves micro-batches of host-memory tensors, one consecutive run ahead."""

    def __init__(self, store: TrajectoryStore, tensors: tuple[torch.Tensor, ...]):
        self.store, self.tensors = store, tensors
        self.n = tensors[0].shape[0]
        self.stream = torch.cuda.Stream(store.device) if store.device.type == "cuda" else None
        self.ahead: tuple[int, int, list[torch.Tensor], object] | None = None  # start, size, tensors, event

    def _copy(self, start: int, size: int) -> list[torch.Tensor]:
        return [t[start:start + size].to(self.store.device, non_blocking=self.store.pin) for t in self.tensors]

    def __call__(self, p: slice | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(p, slice):
            start, stop, _ = p.indices(self.n)
            size = max(stop - start, 0)
        else:
            q = p.cpu()
            size = q.numel()
            start = int(q[0]) if size else 0
            if size == 0 or not torch.equal(q, torch.arange(start, start + size)):
                return [t[q].to(self.store.device) for t in self.tensors]  # not a run: no read-ahead
        if self.ahead is not None and self.ahead[:2] == (start, size):
            out, event = self.ahead[2], self.ahead[3]
            if event is not None:
                torch.cuda.current_stream(self.store.device).wait_event(event)
                for t in out:  # made on the side stream, used on this one: keep the allocator from reusing them early
                    t.record_stream(torch.cuda.current_stream(self.store.device))
        else:
            out = self._copy(start, size)
        self.ahead = None
        if start + 2 * size <= self.n:
            if self.stream is None:
                self.ahead = (start + size, size, self._copy(start + size, size), None)
            else:
                with torch.cuda.stream(self.stream):
                    ahead = self._copy(start + size, size)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.ahead = (start + size, size, ahead, event)
        held = nbytes(*out) + (nbytes(*self.ahead[2]) if self.ahead is not None else 0)
        self.store.device_bytes = max(self.store.device_bytes, held)
        return out
