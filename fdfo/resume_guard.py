"""After a resume, the first trained epoch against the run before it (``checkpoint.resume_guard``).

A checkpoint whose files verify can still hold a state the run never had: written from bad memory,
an optimizer state edited or taken from another run, weights changed by hand. A resume repeats the
uninterrupted run exactly, so its first epoch should look like the epochs before it; from such a
state it does not (from a checkpoint with flipped bytes in its weights the loss went from about
1e-3 to 17, the gradient norm to 2.4e4, the clip fraction to 0.70), and the run would go on to
write checkpoints over the good history.

The guard compares that first trained epoch with the last ``RECENT`` trained epochs before the
resume. It jumped when its policy loss (absolute value) or gradient norm is more than ``factor``
times the largest of those epochs' (``checkpoint.resume_guard``, 100 by default: two orders of
magnitude), or when its clip fraction reaches ``CLIP_JUMP`` where those epochs clipped at most
``CLIP_CALM`` (a bounded fraction has no orders of magnitude to jump by; a wrecked update shows there
first, since clipped elements carry no gradient). Then the run stops before it evaluates or writes a
checkpoint, with one line naming the numbers. A history of fewer than ``MIN_EPOCHS`` trained epochs
is not compared (the first epochs of a run legitimately move by orders of magnitude: a fresh LoRA's
B factor is zero). Every rank sees the same (all-reduced) numbers, so every rank stops together.
"""

from __future__ import annotations

from fdfo.errors import TrainingError

RECENT = 5  # trained epochs before the resume that set the reference
MIN_EPOCHS = 3  # fewer trained epochs before the resume: nothing to compare with
SCALED = ("policy_loss", "grad_norm")  # compared by ratio
CLIP_JUMP, CLIP_CALM = 0.4, 0.1  # the clip fraction jumps to CLIP_JUMP from at most CLIP_CALM
OPT_OUT = "--checkpoint.resume_guard 0"


def reference(history: list[dict]) -> dict[str, float]:
    """The largest absolute value of each compared metric over the last ``RECENT`` trained epochs; empty
    when fewer than ``MIN_EPOCHS`` were trained."""
    trained = [r for r in history if r.get("kind") == "epoch" and not r.get("skipped")]
    if len(trained) < MIN_EPOCHS:
        return {}
    ref = {}
    for name in (*SCALED, "clipfrac"):
        values = [abs(r[name]) for r in trained[-RECENT:] if isinstance(r.get(name), (int, float))]
        if values:
            ref[name] = max(values)
    return ref


def jumps(record: dict, ref: dict[str, float], factor: float) -> list[str]:
    """``name value (at most R before)`` for each compared metric of ``record`` that jumped."""
    found = []
    for name, before in ref.items():
        value = record.get(name)
        if not isinstance(value, (int, float)):
            continue
        if name in SCALED:
            jumped = abs(value) > factor * before
        else:
            jumped = value >= CLIP_JUMP and before <= CLIP_CALM
        if jumped:
            found.append(f"{name} {value:.3g} (at most {before:.3g} before)")
    return found


class ResumeGuard:
    """Checks the first trained epoch after a resume from ``checkpoint`` (one check, then it is done).

    history: the checkpoint's run history (epoch and eval records, as ``RunReport.history``).
    factor:  ``checkpoint.resume_guard``; 0 = no check."""

    def __init__(self, checkpoint, history: list[dict], factor: float):
        self.checkpoint, self.factor = checkpoint, factor
        self.ref = reference(history) if factor else {}

    def check(self, record: dict) -> None:
        """Raise ``TrainingError`` if ``record`` (an epoch's) jumped; skipped epochs are not checked."""
        if not self.ref or record.get("skipped"):
            return
        found, self.ref = jumps(record, self.ref, self.factor), {}
        if found:
            raise TrainingError(
                f"epoch {record.get('epoch')}, the first after resuming from '{self.checkpoint}', jumped against "
                f"the epochs before it: {', '.join(found)}. The checkpoint's "
                "files verify, so its state is not what the run left (weights or optimizer state changed after it "
                "was written) or the config changed; nothing of this epoch was written. Resume from an earlier "
                f"checkpoint (--resume DIR; python -m fdfo.checkpoint verify lists them), or, if the change is "
                f"intended, resume with {OPT_OUT}")
