"""Everything the trainer and the tools need to know about ranks, in one place.

    init(), close()           the process group: DeepSpeed's launcher, torchrun, or a plain process
    rank(), world_size()      this process's place (0 and 1 without a process group)
    launched_world_size()     the world the launcher started (WORLD_SIZE), known before init()
    active(), barrier()       whether there are other ranks; wait for them
    print0(msg)               one line from rank 0, safe beside tqdm bars
    sum_over_ranks(values)    float64 all-reduce of a list of numbers or of a tensor
    mean_over_ranks(named)    the mean over ranks of named numbers (step and reward metrics)
    gather_rows(x)            concatenation of a per-rank tensor over ranks, in rank order
    fetch_rows(x, rows)       gather_rows(x)[rows] without the gather: an all-to-all moves only those rows
    rank0_first()             rank 0 runs the block first (building shared assets: cached base
                              models, reward weights); the others wait, then run it too and load

Every helper is the identity in a single process with no process group, so tools that
can run without one (generate, evaluate) use them unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(*, deepspeed: bool = True) -> torch.device:
    """Join (or create) the process group and return this rank's device.

    A plain ``python fdfo/train.py`` becomes rank 0 of a world of 1 on a free local port, so the
    trainer has one code path. ``deepspeed=False`` (the inference tools) creates a group only when
    launched with WORLD_SIZE > 1 and never imports DeepSpeed.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:  # (DeepSpeed's init is a no-op on an existing group, but it wants these variables)
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        if device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed as ds

        if device.type == "cuda":
            ds.init_distributed(dist_backend=backend, verbose=False)
        else:
            _init_on_cpu(ds, backend)
            atexit.register(_remove_shm_buffer, _shm_buffer_path())
    elif not dist.is_initialized() and launched_world_size() > 1:
        dist.init_process_group(backend)
    return device


def _init_on_cpu(ds, backend: str) -> None:
    """DeepSpeed's init on CPU loads its shared-memory all-reduce op, compiling it on a machine's first
    run (about 30 s) and announcing it as "built successfully" on every run: say so once, when it is
    compiled, and keep the rest of what DeepSpeed prints."""
    import io

    from torch.utils.cpp_extension import _get_build_directory

    try:
        built = any(Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 - only decides whether to announce the build
        built = True
    if not built and _launched_rank() == 0:
        print("[fdfo] building DeepSpeed's CPU communication op (first run on this machine only, about 30 s)",
              flush=True)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        ds.init_distributed(dist_backend=backend, verbose=False)
    kept = [line for line in said.getvalue().splitlines() if not line.endswith("built successfully")]
    if kept:
        print("\n".join(kept), flush=True)


def _shm_buffer_path() -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for this rank (its own naming scheme)."""
    env = os.environ
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


def _remove_shm_buffer(path: Path) -> None:
    """DeepSpeed never unlinks it: 67 MB of tmpfs per CPU process, until the machine restarts. At exit
    every rank has long mapped the others' buffers, so removing the name takes nothing from them."""
    path.unlink(missing_ok=True)


def close() -> None:
    """Leave the process group (if any), so that the process exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """A process group with more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def launched_world_size() -> int:
    """The number of ranks the launcher (deepspeed, torchrun) started, 1 for a plain process: what
    init() will join, known before it, so that start-up checks can run before DeepSpeed starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if active():
        dist.barrier()


def print0(msg: str) -> None:
    """Print from rank 0 only (the launcher's rank 0 before the group forms), through tqdm so that
    progress bars stay intact."""
    if (rank() if dist.is_initialized() else _launched_rank()) == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"[fdfo] {msg}")


def _reduce_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values):
    """Sum over ranks in float64: a list of numbers gives a list, a tensor gives a CPU float64 tensor."""
    as_list = not isinstance(values, torch.Tensor)
    t = torch.as_tensor(values, dtype=torch.float64)
    if active():
        t = t.to(_reduce_device())
        dist.all_reduce(t)
        t = t.cpu()
    return t.tolist() if as_list else t


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each named value (every rank must pass the same names in the same order)."""
    totals = sum_over_ranks(list(values.values()))
    return {k: v / world_size() for k, v in zip(values, totals)}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor [n, ...] over ranks -> [world·n, ...] (rank order)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks. Every rank
    must call it. For small things only (an evaluation grid's cells), not for tensors of a batch."""
    if not active():
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def fetch_rows(x: torch.Tensor, rows: torch.Tensor, *, into: torch.device | None = None, pin: bool = False,
               chunk_rows: int | None = None, staged: list[int] | None = None) -> torch.Tensor:
    """``gather_rows(x)[rows]``, moving only the rows asked for.

    ``rows`` are indices into the rank-major concatenation of every rank's ``x`` (each rank holds
    the same number of rows). Each rank tells each owner which of its rows it wants (an all-to-all
    of indices), then every owner sends those rows (a second all-to-all): a rank receives what it
    asked for, not the whole epoch. Collective: every rank calls it, each with its own ``rows``.

    into: where the result is made (default: ``x``'s device), in pinned memory if ``pin``.
    chunk_rows: at most this many of the asked rows per collective round (the ranks agree on the
    smallest given and run as many rounds as the rank that asks most), so that when the collectives
    need device tensors (NCCL) and ``x`` or the result live in host memory, the collectives' device
    holds one round's rows at a time. staged: if given, gets the most bytes one round staged on
    the collectives' device (what the rank sent, received and reordered).
    """
    target = into or x.device
    if not active():
        if chunk_rows is None and target == x.device and not pin:
            return x[rows.to(x.device)]
        out = torch.empty(rows.numel(), *x.shape[1:], dtype=x.dtype, device=target,
                          pin_memory=pin and target.type == "cpu")
        step, rows = chunk_rows or max(rows.numel(), 1), rows.to(x.device)
        for i in range(0, rows.numel(), step):
            part = rows[i:i + step]
            out[i:i + part.numel()] = x[part]
        return out
    dev = _reduce_device()
    rows = rows.to(dev, torch.int64)
    if chunk_rows is None:
        if target == dev and not pin:  # one round, its result is the answer: no second copy
            got, nbytes = _exchange(x, rows, dev)
            if staged is not None:
                staged.append(nbytes)
            return got
        rounds, chunk_rows = 1, max(rows.numel(), 1)
    else:
        agree = torch.tensor([rows.numel(), -chunk_rows], device=dev)  # most rows asked, smallest chunk
        dist.all_reduce(agree, op=dist.ReduceOp.MAX)
        chunk_rows = max(1, -int(agree[1]))
        rounds = -(-int(agree[0]) // chunk_rows)
    out = torch.empty(rows.numel(), *x.shape[1:], dtype=x.dtype, device=target,
                      pin_memory=pin and target.type == "cpu")
    for r in range(rounds):
        part = rows[r * chunk_rows:(r + 1) * chunk_rows]
        got, nbytes = _exchange(x, part, dev)
        out[r * chunk_rows:r * chunk_rows + part.numel()] = got
        if staged is not None:
            staged.append(nbytes)
    return out


def _exchange(x: torch.Tensor, rows: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, int]:
    """One round of ``fetch_rows``: the rows ``rows`` (on the collectives' device ``dev``) of ``x``, on
    ``dev``; and the bytes of rows this round held on ``dev`` at once."""
    n, world = x.shape[0], dist.get_world_size()
    owner = torch.div(rows, n, rounding_mode="floor")
    by_owner = torch.argsort(owner, stable=True)
    want = (rows[by_owner] % n).contiguous()
    send_counts = torch.bincount(owner, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
    asked = torch.empty(sum(recv_split), dtype=torch.int64, device=dev)
    dist.all_to_all_single(asked, want, output_split_sizes=recv_split, input_split_sizes=send_split)
    payload = x[asked.to(x.device)].to(dev).contiguous()
    got = torch.empty(rows.numel(), *x.shape[1:], dtype=x.dtype, device=dev)
    dist.all_to_all_single(got, payload, output_split_sizes=send_split, input_split_sizes=recv_split)
    out = torch.empty_like(got)
    out[by_owner] = got
    row = x[:1].numel() * x.element_size()
    return out, (payload.shape[0] + 2 * rows.numel()) * row


def first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank (each rank takes part, failed or not: no rank waits alone)."""
    if not active():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Run the block on rank 0, then on the other ranks.

    For shared assets that the block creates on first use and loads afterwards (a cached base
    model, trained reward weights): rank 0 builds them while the others wait, and the others
    then find them built. If the block fails on rank 0, the others stop with the same message
    instead of waiting at a barrier until the process group times out.
    """
    if not active():
        yield
        return
    if rank() == 0:
        error: list[str | None] = [None]
        try:
            yield
        except BaseException as exc:
            error = [f"{type(exc).__name__}: {exc}"]
            raise
        finally:
            dist.broadcast_object_list(error, src=0)
        return
    error = [None]
    dist.broadcast_object_list(error, src=0)  # waits for rank 0's block
    if error[0] is not None:
        raise RuntimeError(f"rank 0 failed while building a shared asset: {error[0]}")
    yield
