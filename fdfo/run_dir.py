"""The run directory, settled before any model is loaded: a new run, a run started over, or a resumed one.

    (no flag)        log.out_dir must be absent or hold no run; a directory that holds one is refused
    --overwrite      the old run is moved aside to <out_dir>.replaced-<time> (nothing is deleted),
                     then a new run starts in an empty log.out_dir
    --resume [auto]  this run's latest checkpoint; when it has none yet, a notice and a new run
    --resume DIR     that checkpoint directory (or a run directory: its latest checkpoint)

One trainer at a time per run directory: ``prepare`` takes the directory's lock (``fdfo.run_lock``;
global rank 0 alone takes and removes it) before it writes anything there; a directory another
live trainer holds is refused with one line naming it (``plan`` already reads the lock, on every
rank, so that all ranks stop together before any model is loaded). The lock goes when the process
exits, by Ctrl-C and SIGTERM too.

A resume checks the checkpoint's files against its manifest (``fdfo.integrity``: ``trainer.json``
in ``plan``, the state in ``prepare`` on rank 0) and compares its saved config with the new one.
A change the saved state cannot take (base model, LoRA shape, algorithm, ZeRO stage) is refused, naming the keys;
any other change is listed and used as given, optimizer hyperparameters included. A
checkpoint already at ``train.epochs`` has nothing left to train (``RunComplete``); one past
it is an error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fdfo import distributed, run_lock, trackers
from fdfo.checkpoint import (LATEST, STATE_TAG, TRAINER_FILE, CheckpointError, check_resume, check_trainer_file,
                             latest_in)
from fdfo.errors import ConfigError
from fdfo.outputs import OutDirError, check_out_dir
from fdfo.settings import RunConfig, migrate

# What a run writes into log.out_dir; a directory holding any of these holds a run.
RUN_ENTRIES = ("metrics.jsonl", "config.json", "checkpoints", "samples", "reward_curve.png", "tensorboard")
# Settings the saved state cannot take: its weights and optimizer shards are shaped by them.
FIXED_ON_RESUME = ("model.path", "model.revision", "lora.enabled", "lora.rank", "lora.target_modules",
                   "train.algorithm")


class RunDirError(ConfigError):
    """The run directory or the checkpoint to resume does not allow what was asked; the message says why."""


class RunComplete(Exception):
    """The checkpoint to resume is already at train.epochs: nothing to train."""


@dataclass
class Start:
    """How the run starts: the checkpoint to resume (None: a new run) and what was decided on the way."""

    out_dir: Path
    checkpoint: Path | None = None
    saved_config: dict | None = None
    changes: list[str] = field(default_factory=list)  # "key: old -> new" for a resume with other settings
    move_aside: Path | None = None  # --overwrite: where the old run goes
    lock: run_lock.RunLock | None = None  # the run directory's lock (rank 0, after prepare)


def plan(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> Start:
    """Decide how the run starts, touching nothing (every rank runs it; they reach the same answer). A
    tracker that log asks for and that is not installed is answered here, before the run directory is."""
    trackers.check_installed(cfg.log)
    out_dir = Path(cfg.log.out_dir)
    try:
        check_out_dir(out_dir, "log.out_dir")
    except OutDirError as exc:
        raise RunDirError(str(exc)) from None
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: --resume continues the run in "
                          f"'{out_dir}', --overwrite starts it over; give one")
    if out_dir.is_dir():  # (read only, on every rank, so that all stop at once; rank 0 takes it in prepare)
        busy = run_lock.holder(out_dir)
        if busy:
            raise RunDirError(busy)
    held = run_entries(out_dir)
    if not resume:
        if held and not overwrite:
            raise RunDirError(f"log.out_dir '{out_dir}' already holds a run ({', '.join(held)}); continue it with "
                              "--resume, start over with --overwrite (moves the old run aside, deletes nothing), "
                              "or choose another log.out_dir")
        return Start(out_dir, move_aside=_aside_name(out_dir) if held else None)

    checkpoint = _find_checkpoint(out_dir, resume)
    if checkpoint is None:
        distributed.print0(f"--resume: no checkpoint in '{out_dir / 'checkpoints'}' yet: starting the run from "
                           "epoch 0 (its epochs repeat exactly, so the metrics of any earlier attempt are replaced)")
        return Start(out_dir)
    own = out_dir.resolve() in checkpoint.resolve().parents
    if not own and held:
        raise RunDirError(f"resuming from '{checkpoint}', a checkpoint of another run, needs an empty log.out_dir; "
                          f"'{out_dir}' holds a run ({', '.join(held)}): choose another log.out_dir")
    check_trainer_file(checkpoint)  # what plan reads of it, against its manifest (the rest: prepare)
    saved = _read_trainer_state(checkpoint)
    saved_config = migrate(saved.get("config") or {})  # (a checkpoint of an earlier version: its keys moved)
    fixed, changes = compare_configs(saved_config, cfg.to_dict())
    if saved.get("zero_stage") is not None:
        from fdfo.engine import zero_stage

        stage = zero_stage(cfg)
        if stage != saved["zero_stage"]:
            fixed.append(f"ZeRO stage: {saved['zero_stage']} -> {stage} (deepspeed.zero_stage / deepspeed.config)")
    if fixed:
        raise RunDirError(f"cannot resume '{checkpoint}' with changed {'; '.join(fixed)}: its saved weights and "
                          "optimizer state are shaped by these; resume with the saved values, or start a new run")
    epoch = int(saved["epoch"])
    if epoch > cfg.train.epochs:
        raise RunDirError(f"'{checkpoint}' is at epoch {epoch}, past train.epochs={cfg.train.epochs}: nothing to "
                          f"train; give train.epochs above {epoch} to train on")
    if epoch == cfg.train.epochs:
        raise RunComplete(f"'{checkpoint}' is at epoch {epoch} = train.epochs: the run is complete; give "
                          f"train.epochs above {epoch} to train on")
    return Start(out_dir, checkpoint, saved_config, changes)


def prepare(start: Start) -> Start:
    """After ``plan`` on every rank: rank 0 takes the run directory's lock (before anything is written
    there), moves an overwritten run aside, creates the directory, and checks the checkpoint to resume
    against its manifest. A failure there (another trainer holds the directory, a damaged checkpoint)
    raises on every rank with the same one-line message."""
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    failure = None
    if distributed.rank() == 0:
        try:
            _claim(start)
            if start.checkpoint is not None:
                check_resume(start.checkpoint)
        except (RunDirError, CheckpointError) as exc:
            failure = exc
        except OSError as exc:
            failure = RunDirError(f"preparing log.out_dir '{start.out_dir}' failed: {exc.strerror or exc} "
                                  f"({exc.filename or start.out_dir})")
        if failure is not None and start.lock is not None:
            start.lock.release()
            start.lock = None
    message = distributed.first_error(None if failure is None else str(failure))  # (also the barrier)
    if failure is not None:
        raise failure
    if message is not None:
        raise RunDirError(message)
    for change in start.changes:
        distributed.print0(f"resuming with a changed setting: {change}")
    return start


def _claim(start: Start) -> None:
    """Rank 0: lock log.out_dir (the old run's lock first under --overwrite: a run another trainer still
    writes is never moved aside), move an old run aside, create the directory."""
    if start.move_aside is not None:
        old = _lock(start.out_dir)
        os.replace(start.out_dir, start.move_aside)
        old.release(moved_to=start.move_aside)
        distributed.print0(f"--overwrite: the previous run in '{start.out_dir}' was moved to '{start.move_aside}'")
    start.out_dir.mkdir(parents=True, exist_ok=True)
    start.lock = _lock(start.out_dir)


def _lock(out_dir: Path) -> run_lock.RunLock:
    try:
        return run_lock.acquire(out_dir, notify=distributed.print0)
    except run_lock.RunLocked as exc:
        raise RunDirError(str(exc)) from None


# --------------------------------------------------------------------------- helpers


def run_entries(out_dir: Path) -> list[str]:
    """The entries of a run in ``out_dir`` (empty when it holds none)."""
    return [name for name in RUN_ENTRIES if (out_dir / name).exists()] if out_dir.is_dir() else []


def compare_configs(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes the saved state cannot take, other changes), each as "key: old -> new"."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    fixed, other = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, now = old_flat.get(key, "(absent)"), new_flat.get(key, "(absent)")
        if old != now:
            (fixed if key in FIXED_ON_RESUME else other).append(f"{key}: {old!r} -> {now!r}")
    return fixed, other


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _aside_name(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}"), 1
    while candidate.exists():
        n += 1
        candidate = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}-{n}")
    return candidate


def _find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """``auto``: the run's latest checkpoint (None if it has none); else a checkpoint or run directory."""
    if resume == "auto":
        return _latest(out_dir / "checkpoints")
    path = Path(resume)
    if (path / "checkpoints").is_dir() and not (path / STATE_TAG).is_dir():  # a run directory
        latest = _latest(path / "checkpoints")
        if latest is None:
            raise RunDirError(f"--resume '{resume}' is a run directory without a checkpoint; give a checkpoint "
                              "(runs/<name>/checkpoints/epoch_XXXX)")
        return latest
    if not path.is_dir():
        raise RunDirError(f"--resume '{resume}' does not exist; give a checkpoint directory "
                          "(runs/<name>/checkpoints/epoch_XXXX), a run directory, or 'auto'")
    if not (path / STATE_TAG).is_dir() or not (path / TRAINER_FILE).is_file():
        _check_files(path)
        raise RunDirError(f"--resume '{resume}' is not a complete fdfo checkpoint (it needs '{STATE_TAG}/' and "
                          f"'{TRAINER_FILE}'); give runs/<name>/checkpoints/epoch_XXXX")
    return path


def _latest(root: Path) -> Path | None:
    path = latest_in(root)
    if path is None:
        return None
    if not (path / TRAINER_FILE).is_file():
        _check_files(path)
        raise RunDirError(f"'{root / LATEST}' names '{path.name}', which is not a complete checkpoint; resume from "
                          f"one of {sorted(p.name for p in root.glob('epoch_*'))} with --resume DIR")
    return path


def _check_files(checkpoint: Path) -> None:
    """An incomplete checkpoint that has a manifest: the one-line CheckpointDamaged naming what is missing."""
    from fdfo import integrity
    from fdfo.checkpoint import CheckpointDamaged, damaged_message

    if (checkpoint / integrity.MANIFEST).is_file():
        verdict = integrity.verify(checkpoint, skip=("state_universal",))
        if verdict.status == "bad":
            raise CheckpointDamaged(damaged_message(checkpoint, verdict))


def _read_trainer_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"'{checkpoint / TRAINER_FILE}' cannot be read ({exc}); resume from another "
                          "checkpoint") from None
    if "epoch" not in state:
        raise RunDirError(f"'{checkpoint / TRAINER_FILE}' names no epoch; resume from another checkpoint")
    return state
