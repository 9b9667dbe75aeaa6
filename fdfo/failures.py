"""What a run says when a part it depends on fails: one line naming the part, what went wrong, the
last complete checkpoint, and (for an out-of-memory error) the settings that lower memory.

The trainer raises these at the point of failure, before anything of the failed epoch is written,
so what survives is exactly the run up to its last complete checkpoint; ``fdfo.train`` prints the
line and exits with status 1.
"""

from __future__ import annotations

from pathlib import Path

from fdfo.checkpoint import latest_in
from fdfo.errors import RewardFailed, TrainingError, first_line


def last_checkpoint(out_dir: str | Path) -> str:
    """Where a stopped run can continue from, as the end of a one-line message."""
    latest = latest_in(Path(out_dir) / "checkpoints")
    if latest is not None:
        return f"the last complete checkpoint is '{latest}': continue with --resume"
    return "no checkpoint was written yet"


def part_failed(what: str, exc: BaseException, out_dir: str | Path, hint: str = "") -> TrainingError:
    """The one-line error for a failed part: ``what`` happened (e.g. "epoch 2: the reward failed"), because
    of ``exc``, with ``hint`` (what to change) and where the run can continue from."""
    detail = str(exc) if isinstance(exc, RewardFailed) else first_line(exc)
    return TrainingError(f"{what} ({detail}){'; ' + hint if hint else ''}; nothing of it was trained on or "
                         f"written; {last_checkpoint(out_dir)}")


def memory_hint(cfg, micro_batch_rows: int, sample_pairs: int) -> str:
    """The settings that lower the memory of a run like ``cfg``, with the values it uses now."""
    levers = [f"train.micro_batch_rows (now {micro_batch_rows})", f"sampling.micro_batch_pairs (now {sample_pairs})"]
    if not cfg.train.gradient_checkpointing:
        levers.append("train.gradient_checkpointing true")
    if cfg.train.trajectory_device != "host":
        levers.append("train.trajectory_device host (trajectories in pinned host memory)")
    if cfg.train.offload_text_encoders is not True:
        levers.append("train.offload_text_encoders true")
    return "to use less GPU memory lower " + ", ".join(levers[:2]) + (
        "; or set " + ", ".join(levers[2:]) if levers[2:] else "") + " (docs/scaling.md lists more)"
