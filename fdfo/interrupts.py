"""Stopping a run cleanly: Ctrl-C, SIGTERM, and a launcher that goes away.

``install()`` in each trainer process:

* SIGTERM raises ``Interrupted`` (a ``KeyboardInterrupt``), so that a scheduler's SIGTERM
  unwinds exactly like Ctrl-C: a checkpoint being written stays an ``epoch_XXXX.tmp`` that is
  never loaded, exit handlers run (they remove DeepSpeed's shared-memory buffer on CPU) and
  the entry point exits with 128 + the signal's number and one line of explanation.
* Under DeepSpeed's launcher (``deepspeed fdfo/train.py``) on one node, the ``deepspeed``
  command forwards no signal to its per-node launcher, so killing it used to leave the
  trainers running. A daemon thread watches the launcher processes this trainer descends
  from and stops the trainer, as SIGTERM would, when one of them is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 1.0
LAUNCHER_MARKERS = ("deepspeed.launcher", "bin/deepspeed")  # in the command line of DeepSpeed's processes


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def install() -> None:
    """SIGTERM and SIGINT as an exception, and the launcher watchdog (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise)
    # Also Ctrl-C, explicitly: a process started in the background of a non-interactive shell inherits
    # SIGINT ignored, and would then never stop on it.
    signal.signal(signal.SIGINT, _raise)
    launchers = launcher_ancestors()
    if launchers and not any(t.name == "fdfo-launcher-watch" for t in threading.enumerate()):
        threading.Thread(target=_watch, args=(launchers,), name="fdfo-launcher-watch", daemon=True).start()


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, the shell's convention (130 for Ctrl-C)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def launcher_ancestors() -> list:
    """The DeepSpeed launcher processes above this one (nearest first), as psutil processes."""
    try:
        import psutil
    except ImportError:  # (DeepSpeed depends on psutil; without it there is no launcher to watch)
        return []
    out = []
    for parent in psutil.Process().parents():
        try:
            cmdline = " ".join(parent.cmdline())
        except psutil.Error:
            break
        if not any(marker in cmdline for marker in LAUNCHER_MARKERS):
            break
        out.append(parent)
    return out


def _alive(process) -> bool:
    import psutil

    try:  # (is_running also checks that the pid was not reused)
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(launchers: list) -> None:
    while all(_alive(p) for p in launchers):
        time.sleep(POLL_S)
    gone = next(p for p in launchers if not _alive(p))
    print(f"[fdfo] the launcher process {gone.pid} exited: stopping this rank", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
