"""What every kernel wrapper needs before a launch: row views, output buffers, the device check.

Imports triton, so only the Triton paths import this module (``fdfo.kernels`` itself stays
importable without triton).
"""

from __future__ import annotations

import math

import torch
import triton

# Tests set this to True: every buffer a wrapper allocates for a kernel to write is then filled
# with NaN (integers: -1) before the launch, so an element the kernel skips shows up as a mismatch.
# (Buffers the caller passes as ``out=`` are the caller's to poison: they may alias an input.)
POISON = False

MAX_CHUNKS = 256  # programs per row at most; a chunk is TILES·BLOCK elements

# Element types the kernels load and store (they compute in fp32 whatever the storage).
FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(math.nan if dtype.is_floating_point else -1)
    return out


def rows_view(a: torch.Tensor, rows: int) -> torch.Tensor:
    """``a`` [rows, ...] as [rows, N] with unit inner stride; a copy only where no such view exists.

    Row-strided views such as ``xs[:, k]`` of a [rows, T, C, H, W] buffer stay views: the kernels
    take a row stride, so stored trajectories are read and written in place.
    """
    if a.shape[0] != rows:
        raise ValueError(f"expected {rows} rows, got shape {tuple(a.shape)}")
    a2 = a.reshape(rows, -1)
    if a2.shape[1] > 1 and a2.stride(1) != 1:
        a2 = a2.contiguous()
    return a2


def out_view(out: torch.Tensor, rows: int, n: int, name: str) -> torch.Tensor:
    """A caller's output buffer as a writable [rows, N] view (never a copy: the writes must land)."""
    if out.shape[0] != rows or out[0].numel() != n:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {rows} rows of {n} elements")
    try:
        o2 = out.view(rows, n)
    except RuntimeError as e:
        raise ValueError(f"{name} must be viewable as [rows, N] with unit inner stride") from e
    if n > 1 and o2.stride(1) != 1:
        raise ValueError(f"{name} must have unit inner stride")
    return o2


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def runs_on_cpu(kernel) -> bool:
    """Whether ``kernel`` accepts CPU tensors: it was decorated while TRITON_INTERPRET=1 (Triton's
    interpreter runs it on the CPU), or it is a stand-in that declares ``runs_on_cpu = True``.

    The attribute is the hook for anything a wrapper may find in place of a kernel that never
    touches the tensors' memory (a tool that records launches instead of running them, say):
    the wrappers then accept CPU tensors without knowing the tool.
    """
    return interpreted(kernel) or getattr(kernel, "runs_on_cpu", False) is True


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated while TRITON_INTERPRET=1 (Triton's CPU interpreter runs it)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and a device the kernel can run on (CUDA, or CPU via the interpreter)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"kernel inputs must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not runs_on_cpu(kernel):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device.type}); to run them on CPU, set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported, "
            "or use the torch backend (backend='torch')."
        )
    return device


def launch_config(n: int, block: int | None = None, max_chunks: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, TILES, chunks) for rows of n elements: chunks of TILES·BLOCK, at most max_chunks per row."""
    block = block or min(2048, next_pow2(n))
    max_chunks = max_chunks or MAX_CHUNKS
    tiles = 1
    chunks = triton.cdiv(n, block)
    if chunks > max_chunks:
        tiles = triton.cdiv(chunks, max_chunks)
        chunks = triton.cdiv(n, block * tiles)
    return block, tiles, chunks
