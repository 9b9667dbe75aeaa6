"""Checkpoints: when to write them, where, how many to keep, and how to resume from one.

    runs/<name>/checkpoints/
        epoch_0010/
            state/            DeepSpeed's state (trainable weights, optimizer, counters), per rank
            state_universal/  the same, converted for another number of ranks (made on demand)
            adapter/          the LoRA adapter StableDiffusion3Pipeline.load_lora_weights(dir) loads
                              (transformer/ instead under full fine-tuning)
            trainer.json      epoch, step, the run config
        latest                the name of the newest complete checkpoint

A checkpoint is written to ``epoch_XXXX.tmp`` and renamed into place only when complete,
then ``latest`` is replaced atomically: an interrupted save never replaces a good
checkpoint. ``checkpoint.keep_last`` prunes older ones after that, never the one
``latest`` names. The trainer's state (epoch, history, every RNG state) travels in
DeepSpeed's client state, so the resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import datetime
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fdfo import atomic, distributed

STATE_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # the same state, converted for another number of ranks
UNIVERSAL_TIMEOUT = datetime.timedelta(hours=6)  # how long ranks wait for rank 0's conversion
LATEST = "latest"
TRAINER_FILE = "trainer.json"  # epoch, step, ZeRO stage and the run config, readable without DeepSpeed
_NAME = re.compile(r"^epoch_(\d+)$")


def latest_in(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer of a checkpoints folder names, or None when there is none."""
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the cause and the checkpoint still usable."""


class CheckpointManager:
    """Writes, finds, prunes and loads the checkpoints of one run directory (every rank calls each method)."""

    def __init__(self, out_dir: str | Path, cfg, engine):
        self.root = Path(out_dir) / "checkpoints"
        self.every, self.keep_last = cfg.every, cfg.keep_last
        self.engine = engine

    def due(self, epoch: int, last: bool) -> bool:
        """Whether to write a checkpoint after ``epoch`` (every ``checkpoint.every`` epochs and at the end)."""
        return bool(self.every) and (epoch % self.every == 0 or last)

    def path(self, epoch: int) -> Path:
        return self.root / f"epoch_{epoch:04d}"

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None when the run has none."""
        return latest_in(self.root)

    # ------------------------------------------------------------------ save

    def save(self, epoch: int, trainer_state: dict) -> Path:
        """Atomically writes the checkpoint of ``epoch``, points ``latest`` at it and prunes old ones.

        A failed write (a full disk, a lost mount) removes the partial ``.tmp`` and raises a
        ``CheckpointError`` that says what failed and which checkpoint is still the latest."""
        directory = self.path(epoch)
        tmp = directory.with_name(directory.name + ".tmp")
        error = None
        try:
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            distributed.barrier()
            self.engine.save_state(tmp, STATE_TAG, dict(trainer_state, rng=rng_state()))
            self.engine.export(tmp)
        except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
            error = exc
        # Every rank learns of a failure on any rank, so none waits for the others at a barrier.
        if distributed.sum_over_ranks([error is not None])[0]:
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(self._failure(directory, error))
        if distributed.rank() == 0:
            try:
                atomic.write_text(tmp / TRAINER_FILE, json.dumps(
                    {k: v for k, v in trainer_state.items() if k != "history"}, indent=1))
                atomic.replace_dir(tmp, directory)
                atomic.write_text(self.root / LATEST, directory.name)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(self._failure(directory, exc)) from exc
            self.prune()
        distributed.barrier()
        return directory

    def _failure(self, directory: Path, error: BaseException | None) -> str:
        latest = self.latest()
        if error is None:
            what = "on another rank"
        else:
            what = (f"{error.strerror} ({error.filename or directory})" if isinstance(error, OSError) and
                    error.strerror else str(error).strip().splitlines()[-1])
        try:
            free = f"; {shutil.disk_usage(self.root).free / 2**20:.0f} MiB free on its file system"
        except OSError:
            free = ""
        kept = f"the latest checkpoint is still '{latest}'" if latest else "no earlier checkpoint exists"
        return (f"writing checkpoint '{directory}' failed: {what}{free}. Nothing partial was left; {kept}. "
                "Free space (or fix the directory) and continue with --resume")

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all), never the one
        ``latest`` names, and whatever an interrupted save left. Returns the checkpoints deleted."""
        # What a killed save or deletion left: *.tmp (an unfinished checkpoint or `latest`), *.old (the
        # instant between two renames), *.deleting (a half-done deletion). The save that calls this is done.
        for pattern in ("*.tmp", "*.old", "*.deleting"):
            for stale in self.root.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        if not self.keep_last:
            return []
        found = self.checkpoints()
        keep = {p.name for p in found[-self.keep_last:]}
        latest = self.latest()
        if latest is not None:
            keep.add(latest.name)
        removed = [p for p in found if p.name not in keep]
        for path in removed:
            atomic.remove_dir(path)
        return removed

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of this run, oldest first (by epoch)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    # ------------------------------------------------------------------ load

    def load(self, directory: str | Path) -> dict:
        """Resume the engine from ``directory`` and return the trainer's state (RNG states restored).

        A checkpoint written by another number of ranks is first converted to DeepSpeed's universal
        format (once, kept beside the sharded state as ``state_universal/``)."""
        directory = Path(directory)
        if not (directory / STATE_TAG).is_dir():
            raise FileNotFoundError(f"'{directory}' is not an fdfo checkpoint (no '{STATE_TAG}/' inside)")
        saved_ranks = saved_world_size(directory / STATE_TAG)
        same_layout = saved_ranks in (None, distributed.world_size())
        tag = STATE_TAG if same_layout else self._universal(directory, saved_ranks)
        state = self.engine.load_state(directory, tag, universal=not same_layout)
        rng = state.pop("rng")
        if same_layout:
            set_rng_state(rng)  # (per-rank streams; nothing the trainer draws depends on them across ranks)
        return state

    def _universal(self, directory: Path, saved_ranks: int) -> str:
        """Rank 0 converts ``state/`` to ``state_universal/`` (atomically) unless it exists; returns the tag."""
        out = directory / UNIVERSAL_TAG
        # The other ranks wait for rank 0's conversion, which can outlast the process group's timeout
        # (DeepSpeed's default is 10 minutes) on a large state: they wait on a gloo group of their own.
        group = dist.new_group(backend="gloo", timeout=UNIVERSAL_TIMEOUT)
        error = [None]
        if distributed.rank() == 0 and not out.is_dir():
            distributed.print0(f"checkpoint '{directory}' was written by {saved_ranks} rank(s), this run has "
                               f"{distributed.world_size()}: converting it to DeepSpeed's universal format in '{out}'")
            try:
                convert_to_universal(directory / STATE_TAG, out)
            except Exception as e:  # noqa: BLE001  (every rank must hear of it, not wait at a barrier)
                error = [str(e)]
        dist.broadcast_object_list(error, src=0, group=group)  # also the barrier: the others wait here
        if error[0] is not None:
            raise RuntimeError(error[0])
        missing = torch.tensor([0 if out.is_dir() else 1])
        dist.all_reduce(missing, op=dist.ReduceOp.SUM, group=group)  # every rank stops together
        dist.destroy_process_group(group)
        if int(missing):
            raise RuntimeError(f"{int(missing)} rank(s) cannot see '{out}': resuming on another number of ranks "
                               "needs the run directory on a file system all ranks share")
        return UNIVERSAL_TAG


def saved_world_size(state_dir: Path) -> int | None:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint directory (one optimizer shard each under
    ZeRO 1-3); None for an unsharded (stage 0) checkpoint, which loads on any number of ranks."""
    state_dir = Path(state_dir)
    shards = list(state_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if shards:
        return len(shards)
    if (state_dir / "mp_rank_00_model_states.pt").is_file():
        return None
    raise FileNotFoundError(f"'{state_dir}' holds neither ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt) "
                            "nor mp_rank_00_model_states.pt; is it a complete checkpoint?")


def convert_to_universal(state_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on ``state_dir`` into ``out``, written to a temporary sibling first."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    state_dir, out = Path(state_dir), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker: DeepSpeed's parallel path forks a process pool from this (CUDA- and process-group-
    # initialised) rank. A large state takes a while; the other ranks wait up to UNIVERSAL_TIMEOUT.
    args = Namespace(input_folder=str(state_dir), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting '{state_dir}' to a universal checkpoint failed ({e}); resume on the "
                           "number of ranks that wrote it, or start a new run from its exported adapter") from e
    stray = tmp.parent / "latest_universal"  # ds_to_universal also writes a 'latest' file beside its output
    if stray.is_file():
        stray.unlink()
    atomic.replace_dir(tmp, out)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
