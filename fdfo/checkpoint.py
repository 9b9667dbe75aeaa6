"""Checkpoints: when to write them, where, how many to keep, and how to resume from one.

    runs/<name>/checkpoints/
        epoch_0010/
            state/            DeepSpeed's state (trainable weights, optimizer, counters), per rank
            state_universal/  the same, converted for another number of ranks (made on demand)
            adapter/          the LoRA adapter StableDiffusion3Pipeline.load_lora_weights(dir) loads
                              (transformer/ instead under full fine-tuning)
            trainer.json      epoch, step, the run config
            manifest.json     size and checksum of every file above, written last (fdfo.integrity)
        latest                the name of the newest complete checkpoint

A checkpoint is written to ``epoch_XXXX.tmp`` and renamed into place only when complete,
then ``latest`` is replaced atomically: an interrupted save never replaces a good
checkpoint. ``checkpoint.keep_last`` prunes older ones after that, never the one
``latest`` names. The trainer's state (epoch, history, every RNG state) travels in
DeepSpeed's client state, so the resumed run repeats the uninterrupted one exactly.

Before a checkpoint is resumed, its files are compared with its manifest (``state_universal/``
has one of its own; the exported weights are checked where ``fdfo.trained_checkpoint`` loads
them): a damaged file stops the run with one line that names it and the newest checkpoint of
the run that verifies. ``python -m fdfo.checkpoint verify RUN_DIR`` checks every checkpoint of a run.
"""

from __future__ import annotations

import datetime
import json
import pickle
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fdfo import atomic, distributed, integrity

STATE_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # the same state, converted for another number of ranks
UNIVERSAL_TIMEOUT = datetime.timedelta(hours=6)  # how long ranks wait for rank 0's conversion
LATEST = "latest"
TRAINER_FILE = "trainer.json"  # epoch, step, ZeRO stage and the run config, readable without DeepSpeed
EXPORTS = ("adapter", "transformer")  # the exported weights (engine.ADAPTER_DIR, engine.TRANSFORMER_DIR)
_NAME = re.compile(r"^epoch_(\d+)$")


def latest_in(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer of a checkpoints folder names, or None when there is none."""
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names the cause and the checkpoint still usable."""


class CheckpointDamaged(CheckpointError, ValueError):
    """A checkpoint's file is missing, of another size or content than its manifest records, or cannot be
    read; the message (one line) names the file and the newest checkpoint of the run that verifies."""


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
                integrity.seal(tmp, skip=(UNIVERSAL_TAG,))  # last: checksums and flushes every file
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
        return checkpoints_in(self.root)

    # ------------------------------------------------------------------ load

    def load(self, directory: str | Path) -> dict:
        """Resume the engine from ``directory`` and return the trainer's state (RNG states restored).

        Its files are compared with its manifest first (by rank 0; not again when this process verified
        it before, as ``run_dir.prepare`` does): a damaged checkpoint raises ``CheckpointDamaged`` on
        every rank, as does one that DeepSpeed cannot read. A checkpoint written by another number of
        ranks is first converted to DeepSpeed's universal format (once, kept beside the sharded state as
        ``state_universal/``, with a manifest of its own)."""
        directory = Path(directory)
        if not (directory / STATE_TAG).is_dir():
            raise FileNotFoundError(f"'{directory}' is not an fdfo checkpoint (no '{STATE_TAG}/' inside)")
        damaged = None
        if distributed.rank() == 0:
            try:
                check_resume(directory)
            except CheckpointDamaged as exc:
                damaged = str(exc)
        damaged = distributed.first_error(damaged)
        if damaged is not None:
            raise CheckpointDamaged(damaged)
        saved_ranks = saved_world_size(directory / STATE_TAG)
        same_layout = saved_ranks in (None, distributed.world_size())
        tag = STATE_TAG if same_layout else self._universal(directory, saved_ranks)
        try:
            state = self.engine.load_state(directory, tag, universal=not same_layout)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
            message = unreadable_message(directory, directory / tag, exc)
            if message is None:
                raise
            raise CheckpointDamaged(message) from exc
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
        if distributed.rank() == 0 and out.is_dir():
            damaged = check_universal(directory)
            error = [(True, damaged) if damaged else None]
        elif distributed.rank() == 0:
            distributed.print0(f"checkpoint '{directory}' was written by {saved_ranks} rank(s), this run has "
                               f"{distributed.world_size()}: converting it to DeepSpeed's universal format in '{out}'")
            try:
                convert_to_universal(directory / STATE_TAG, out)
            except Exception as e:  # noqa: BLE001  (every rank must hear of it, not wait at a barrier)
                error = [(False, str(e))]
        dist.broadcast_object_list(error, src=0, group=group)  # also the barrier: the others wait here
        if error[0] is not None:
            dist.destroy_process_group(group)
            damaged, message = error[0]
            raise (CheckpointDamaged if damaged else CheckpointError)(message)
        missing = torch.tensor([0 if out.is_dir() else 1])
        dist.all_reduce(missing, op=dist.ReduceOp.SUM, group=group)  # every rank stops together
        dist.destroy_process_group(group)
        if int(missing):
            raise RuntimeError(f"{int(missing)} rank(s) cannot see '{out}': resuming on another number of ranks "
                               "needs the run directory on a file system all ranks share")
        return UNIVERSAL_TAG


def checkpoints_in(root: str | Path) -> list[Path]:
    """The complete checkpoints (``epoch_XXXX``) in a checkpoints folder, oldest first (by epoch)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------- verification (fdfo.integrity)

UNVERIFIED = "has no manifest (it was written before fdfo checksummed its checkpoints): its files cannot be verified"
RESUMED = (UNIVERSAL_TAG, *EXPORTS)  # what a resume does not read of a checkpoint (checked apart)
# What torch and DeepSpeed say about a file they cannot read (a checkpoint without a manifest, or one
# damaged after it was verified).
READ_FAILURES = ("PytorchStreamReader", "Ran out of input", "invalid load key", "unexpected EOF",
                 "failed finding central directory", "archive is corrupted")


def _notice(notify, message: str) -> None:
    if integrity.once(message):
        (notify or distributed.print0)(message)


def newest_good(root: Path, exclude: Path | None = None, only=None, skip=RESUMED) -> tuple[Path | None, Path | None]:
    """(the newest checkpoint in ``root`` that verifies, the newest one without a manifest), leaving out
    ``exclude``; ``only``/``skip`` as in ``integrity.verify``."""
    unverified = None
    for path in reversed(checkpoints_in(root)):
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        verdict = integrity.verify_cached(path, only=only, skip=skip)
        if verdict.good:
            return path, unverified
        if verdict.status == "unverified" and unverified is None:
            unverified = path
    return None, unverified


def fallback(checkpoint: Path, flag: str = "--resume", only=None, skip=RESUMED) -> str:
    """What to use instead of a damaged ``checkpoint``: the newest checkpoint of its run that verifies."""
    checkpoint = Path(checkpoint)
    good, unverified = newest_good(checkpoint.parent, checkpoint, only, skip)
    use = "continue the run from it" if flag == "--resume" else "use it"
    if good is not None:
        return f"the newest checkpoint of this run that verifies is '{good}': {use} with {flag} {good}"
    if unverified is not None:
        return (f"no other checkpoint of this run verifies; '{unverified}' {UNVERIFIED.split(':')[0]}: "
                f"{flag} {unverified} uses it unverified")
    start_over = "; start the run over with --overwrite (the damaged run is moved aside)" if flag == "--resume" else ""
    return f"no other checkpoint of this run verifies{start_over}"


def damaged_message(checkpoint: Path, verdict: integrity.Verdict, flag: str = "--resume", only=None,
                    skip=RESUMED) -> str:
    """One line: the damaged checkpoint, its first bad file and what is wrong, and what to use instead."""
    return f"checkpoint '{checkpoint}' is damaged: {verdict.describe()}; {fallback(checkpoint, flag, only, skip)}"


def check_trainer_file(checkpoint: Path) -> None:
    """``trainer.json`` of ``checkpoint`` against its manifest (cheap: read before a resume is planned)."""
    verdict = integrity.verify(checkpoint, only=[TRAINER_FILE])
    if verdict.status == "bad":
        raise CheckpointDamaged(damaged_message(checkpoint, verdict))


def check_resume(checkpoint: Path, notify=None) -> None:
    """What a resume reads of ``checkpoint`` (``state/``, ``trainer.json``) against its manifest, on one rank
    (rank 0): CheckpointDamaged naming the file and the newest checkpoint of the run that verifies; a
    checkpoint without a manifest gets a one-line notice and is used as it is. Damaged exported weights
    (which a resume does not read) get a one-line warning."""
    checkpoint = Path(checkpoint)
    verdict = integrity.verify_cached(checkpoint, skip=RESUMED)
    if verdict.status == "bad":
        raise CheckpointDamaged(damaged_message(checkpoint, verdict))
    if verdict.status == "unverified":
        _notice(notify, f"checkpoint '{checkpoint}' {UNVERIFIED}; resuming from it as it is")
        return
    exports = [name for name in EXPORTS if (checkpoint / name).exists()]
    if exports:
        export = integrity.verify_cached(checkpoint, only=exports)
        if export.status == "bad":
            _notice(notify, f"checkpoint '{checkpoint}': {export.describe()}; the state to resume verifies, so the "
                            f"run resumes from it, but do not use its {'/ and '.join(exports)}/ (the next checkpoint "
                            "exports the weights anew)")


def check_universal(checkpoint: Path, notify=None) -> str | None:
    """``state_universal/`` of ``checkpoint`` against its own manifest: the one-line error, or None."""
    out = Path(checkpoint) / UNIVERSAL_TAG
    verdict = integrity.verify_cached(out)
    if verdict.status == "bad":
        return (f"checkpoint '{checkpoint}' is damaged: its universal conversion {verdict.describe()}; it is made "
                f"from the checkpoint's '{STATE_TAG}/', which verifies: delete '{out}' and resume again to convert "
                "it anew")
    if verdict.status == "unverified":
        _notice(notify, f"the universal conversion '{out}' {UNVERIFIED}; loading it as it is")
    return None


def check_export(checkpoint: Path, export: str, notify=None) -> None:
    """For the commands that sample (``--adapter``): the exported weights ``export`` (``adapter`` or
    ``transformer``) and ``trainer.json`` of an fdfo checkpoint against its manifest."""
    checkpoint = Path(checkpoint)
    only = [export, TRAINER_FILE]
    verdict = integrity.verify_cached(checkpoint, only=only)
    if verdict.status == "bad":
        raise CheckpointDamaged(damaged_message(checkpoint, verdict, "--adapter", only=only, skip=()))
    if verdict.status == "unverified":
        _notice(notify, f"checkpoint '{checkpoint}' {UNVERIFIED}; loading its {export}/ as it is")


def unreadable_message(checkpoint: Path, state_dir: Path, exc: BaseException) -> str | None:
    """One line for a state DeepSpeed could not read (None when ``exc`` is not about reading a file)."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if any(m in line for m in READ_FAILURES)), lines[0] if lines else
                  type(exc).__name__)
    broken = [p for p in sorted(Path(state_dir).rglob("*.pt")) if p.is_file() and not zipfile.is_zipfile(p)]
    if isinstance(exc, FileNotFoundError) and exc.filename:
        what = f"'{exc.filename}' is missing"
    elif broken:
        more = f", and {len(broken) - 1} more file{'s' if len(broken) > 2 else ''} like it" if len(broken) > 1 else ""
        what = (f"'{broken[0]}' cannot be read: it is not a complete torch file (cut short or damaged; torch: "
                f"{reason}){more}")
    elif isinstance(exc, (EOFError, pickle.UnpicklingError)) or any(m in text for m in READ_FAILURES):
        what = f"its state '{state_dir}' cannot be read ({reason})"
    else:
        return None
    return f"checkpoint '{checkpoint}' is damaged: {what}; {fallback(checkpoint)}"


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
    try:
        integrity.seal(tmp)  # its own manifest, written last
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"writing the universal checkpoint '{out}' failed ({e.strerror or e}); free space (or "
                           "fix the directory) and resume again") from e
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


# --------------------------------------------------------------------------- python -m fdfo.checkpoint verify


def _status(verdict: integrity.Verdict) -> str:
    if verdict.status == "good":
        return "good"
    if verdict.status == "unverified":
        return "unverified: " + UNVERIFIED.replace("has no", "no")
    return "BAD: " + verdict.describe(Path())


def main(argv: list[str] | None = None) -> int:
    """``python -m fdfo.checkpoint verify RUN_DIR``: every checkpoint of a run against its manifest; exit
    status 1 when one is damaged, 2 when RUN_DIR holds no checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fdfo.checkpoint",
                                description="Check the checkpoints of a run against their manifests.")
    commands = p.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checkpoint of a run (exit status 1 if one is damaged)")
    verify.add_argument("run_dir", help="a run directory (runs/<name>), its checkpoints/ folder, or one checkpoint")
    args = p.parse_args(argv)
    path = Path(args.run_dir)
    if (path / "checkpoints").is_dir():
        root, found = path / "checkpoints", checkpoints_in(path / "checkpoints")
    elif (path / STATE_TAG).is_dir() or (path / integrity.MANIFEST).is_file():
        root, found = path.parent, [path]
    else:
        root, found = path, checkpoints_in(path)
    if not found:
        print(f"python -m fdfo.checkpoint: error: '{path}' holds no checkpoint; give a run directory "
              "(runs/<name>), its checkpoints/ folder or a checkpoint (checkpoints/epoch_XXXX)", file=sys.stderr)
        return 2
    latest = latest_in(root) if (root / LATEST).is_file() else None
    bad, newest = 0, None
    for checkpoint in found:
        verdict = integrity.verify(checkpoint, skip=(UNIVERSAL_TAG,))
        mark = "  (latest)" if latest is not None and checkpoint.name == latest.name else ""
        print(f"{checkpoint}  {_status(verdict)}{mark}", flush=True)
        bad += verdict.status == "bad"
        if verdict.good:
            newest = checkpoint
        if (checkpoint / UNIVERSAL_TAG).is_dir():
            universal = integrity.verify(checkpoint / UNIVERSAL_TAG)
            fix = "; delete it to convert it anew from the checkpoint's state" if universal.status == "bad" else ""
            print(f"{checkpoint / UNIVERSAL_TAG}  {_status(universal)}{fix}", flush=True)
            bad += universal.status == "bad"
    if newest is not None:
        print(f"newest good: {newest} (continue the run from it with --resume {newest})")
    else:
        print("newest good: none (no checkpoint of this run verifies)")
    if bad:
        print(f"{bad} damaged: see the BAD lines above", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    from fdfo.checkpoint import main as _main  # (the package's module, not a second copy of its classes)

    sys.exit(_main())
