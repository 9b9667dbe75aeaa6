"""One trainer per run directory: a lock file, taken atomically before anything is written into the directory.

    runs/<name>/fdfo.lock    {"host": "gpu-07", "pid": 12345, "since": "2026-05-09 14:03:12 UTC", ...}

``acquire(directory)`` creates the file with O_CREAT|O_EXCL (one process wins, on a local disk and
on NFSv3+ alike) and holds it until ``release()`` or the process exits: at interpreter exit
(``atexit``; the trainer turns SIGINT and SIGTERM into an exception, so they end there too), and on
a SIGTERM, SIGINT or SIGHUP that would otherwise kill the process without running exit handlers
(their handler is installed only where none is). A lock that exists already:

* held by a live process: ``RunLocked``, one line naming the host, the PID, since when, and what to do;
* held by a process of this host that is gone (kill -9, a crash, a reboot; its PID reused by another
  process counts as gone: the lock records the process's start time): taken over with a one-line notice;
* held by a process of another host: this host cannot see it. The holder refreshes the file's
  modification time every ``HEARTBEAT_S`` seconds; a lock not refreshed for ``STALE_AFTER_S`` (the
  holder's machine died or lost the file system) is taken over with a notice, a fresher one is
  refused with the command that removes it. A holder that finds its lock taken over (or replaced)
  stops its run (SIGTERM to itself: the trainer stops as on Ctrl-C, its last checkpoint intact),
  so that two trainers never write one run for longer than a heartbeat; one deleted by hand while
  held is put back at the next heartbeat.

A process takes a lock it already holds again without waiting (a second Trainer in one process).
In a multi-rank run only global rank 0 takes and removes the lock (``fdfo.run_dir.prepare``); every
rank reads it (``holder``, in ``fdfo.run_dir.plan``) so that all ranks stop together on a busy directory.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LOCK_FILE = "fdfo.lock"
HEARTBEAT_S = 30.0  # how often the holder refreshes the lock file's modification time
STALE_AFTER_S = 600.0  # another host's lock not refreshed for this long is taken over
YOUNG_S = 2.0  # a lock file this new and still empty is being written: read it again


class RunLocked(RuntimeError):
    """Another live trainer holds the run directory; the message (one line) names it and what to do."""


def _say(message: str) -> None:
    print(f"[fdfo] {message}", flush=True)


# --------------------------------------------------------------------------- who holds it


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc; else psutil's time), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return "ticks:" + stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return f"time:{psutil.Process(pid).create_time():.2f}"
    except Exception:  # noqa: BLE001 - no psutil, or no such process: unknown
        return None


def _identity() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "since_unix": now, "process_start": process_start(os.getpid()), "boot_id": _boot_id(),
            "user": _user(), "command": " ".join(sys.argv)[:300], "token": uuid.uuid4().hex}


def _user() -> str | None:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return None


def _same_host(info: dict) -> bool:
    return info.get("host") == socket.gethostname()


def _this_process(info: dict | None) -> bool:
    """A lock written by this very process (for another path: a copied run directory, a moved one)."""
    return (info is not None and _same_host(info) and info.get("pid") == os.getpid()
            and info.get("process_start") == process_start(os.getpid()))


def _alive(info: dict) -> bool:
    """Whether the process that holds the lock ``info`` (of this host) still runs."""
    boot = _boot_id()
    if info.get("boot_id") and boot and info["boot_id"] != boot:
        return False  # the machine has restarted since
    try:
        pid = int(info["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except (KeyError, ValueError, TypeError, OSError):
        return True  # a lock that names no usable PID: treated as held (refused, never taken over)
    recorded, now = info.get("process_start"), process_start(pid)
    return not (recorded and now and recorded != now)  # another process with a reused PID: gone


def _read(path: Path) -> tuple[dict | None, os.stat_result] | None:
    """(its content, None when unreadable; its stat) or None when there is no lock file."""
    for attempt in range(20):
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            try:
                return None, path.stat()
            except OSError:
                return None
        try:
            info = json.loads(text)
            if isinstance(info, dict):
                return info, st
        except ValueError:
            pass
        if time.time() - st.st_mtime > YOUNG_S:
            return None, st
        time.sleep(0.1)  # being written by the process that just created it
    return None, st


def describe(info: dict | None, st: os.stat_result | None) -> str:
    """"PID 12345 on host gpu-07 (this host), since 2026-05-09 14:03:12 UTC"."""
    if info is None:
        return "an unknown trainer (the lock file cannot be read)"
    host = info.get("host", "?")
    here = " (this host)" if host == socket.gethostname() else ""
    user = f" of user {info['user']}" if info.get("user") else ""
    text = f"PID {info.get('pid', '?')}{user} on host {host}{here}, running since {info.get('since', '?')}"
    if st is not None and not here:
        text += f", last seen {_ago(time.time() - st.st_mtime)} ago"
    return text


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def _stale(info: dict | None, st: os.stat_result | None) -> str | None:
    """Why the lock is stale (the notice's reason), or None while its holder may be alive."""
    if info is not None and _same_host(info):
        return None if _alive(info) else "that process is gone"
    age = time.time() - st.st_mtime if st is not None else 0.0
    if age > STALE_AFTER_S:
        return f"it was last refreshed {_ago(age)} ago (a live holder refreshes it every {HEARTBEAT_S:.0f} s)"
    return None


def _held_message(directory: Path, path: Path, info: dict | None, st) -> str:
    who = describe(info, st)
    if info is not None and _same_host(info):
        what = f"wait for it to finish or stop it (kill {info.get('pid')})"
    else:
        what = (f"wait for it to finish or stop it there; if no trainer runs there any more, delete '{path}' "
                f"(it is taken over by itself once it has not been refreshed for {STALE_AFTER_S / 60:.0f} min)")
    return (f"run directory '{directory}' is in use by another trainer: {who} (lock file '{path}'); {what}, "
            "or choose another log.out_dir")


def holder(directory: str | os.PathLike) -> str | None:
    """Read-only: the one-line refusal when another live process holds ``directory``'s lock, else None
    (no lock, a stale one, or one this process holds)."""
    directory = Path(directory)
    path = directory.resolve() / LOCK_FILE
    found = _read(path)
    if found is None:
        return None
    info, st = found
    if _this_process(info) or _stale(info, st):
        return None
    return _held_message(directory, path, info, st)


# --------------------------------------------------------------------------- the lock this process holds


_held: dict[str, "RunLock"] = {}  # lock path -> the lock this process holds there
_registry = threading.Lock()
_heartbeat: threading.Thread | None = None
_wake = threading.Event()


class RunLock:
    """A held run-directory lock (``acquire`` makes one); ``release()`` removes the file."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info, self.pid = path, info, os.getpid()

    @property
    def token(self) -> str:
        return self.info["token"]

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self, moved_to: str | os.PathLike | None = None) -> None:
        """Remove the lock file if it is still this lock (``moved_to``: the directory it was moved into with
        the whole run directory, e.g. by --overwrite). Idempotent; a forked child never removes its parent's."""
        if os.getpid() != self.pid:
            return
        with _registry:
            if _held.get(str(self.path)) is self:
                del _held[str(self.path)]
        path = Path(moved_to) / LOCK_FILE if moved_to is not None else self.path
        found = _read(path)
        if found is not None and found[0] is not None and found[0].get("token") == self.token:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def release(directory: str | os.PathLike) -> None:
    """Release the lock this process holds on run directory ``directory``, if it holds one (e.g. when a run
    that ran inside a longer-lived process is done; at exit this happens by itself)."""
    with _registry:
        lock = _held.get(str(Path(directory).resolve() / LOCK_FILE))
    if lock is not None:
        lock.release()


def _mine(path: Path, info: dict | None) -> RunLock | None:
    with _registry:
        lock = _held.get(str(path))
    if lock is not None and info is not None and info.get("token") == lock.token:
        return lock
    return None


def acquire(directory: str | os.PathLike, notify=_say) -> RunLock:
    """Take the lock of run directory ``directory`` (which must exist), or raise ``RunLocked``. ``notify``
    receives the one-line notice when a stale lock is taken over."""
    directory = Path(directory)
    path = directory.resolve() / LOCK_FILE
    for attempt in range(10):
        info = _identity()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            found = _read(path)
            if found is None:
                continue  # released meanwhile: try again
            held, st = found
            mine = _mine(path, held)
            if mine is not None:
                return mine
            if _this_process(held):  # this process's own lock, not registered for this path: renew it
                _remove_stale(path, held, st)
                continue
            reason = _stale(held, st)
            if reason is None:
                raise RunLocked(_held_message(directory, path, held, st)) from None
            if _remove_stale(path, held, st):
                notify(f"taking over the stale lock '{path}' of {describe(held, None)}: {reason}")
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        lock = RunLock(path, info)
        with _registry:
            _held[str(path)] = lock
        _start_keeping()
        return lock
    raise RunLocked(f"run directory '{directory}': its lock file '{path}' kept changing while this trainer tried "
                    "to take it (several trainers starting at once?); start again")


def _remove_stale(path: Path, info: dict | None, st) -> bool:
    """Remove the stale lock ``info`` (read with stat ``st``), and only it: it is renamed aside first, and
    put back should another process have replaced it in the meantime. True when it was removed."""
    aside = path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another process removed it first
    try:
        now = aside.stat()
        if st is not None and (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
            return True
        try:
            os.link(aside, path)  # not the stale lock: put it back, unless a new one is there already
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return False
    finally:
        aside.unlink(missing_ok=True)


# --------------------------------------------------------------------------- exit, signals, heartbeat


def release_all() -> None:
    """Release every lock this process holds (at exit)."""
    with _registry:
        locks = list(_held.values())
    for lock in locks:
        try:
            lock.release()
        except OSError:
            pass


def _on_signal(signum, frame) -> None:
    """A signal whose default action would end the process without exit handlers: release, then die of it."""
    release_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _keep() -> None:
    """The heartbeat: refresh each held lock's modification time; restore a deleted one; stop the run when
    another process has taken it over."""
    while not _wake.wait(HEARTBEAT_S):
        with _registry:
            locks = list(_held.values())
        for lock in locks:
            if lock.pid != os.getpid():
                continue
            try:
                found = _read(lock.path)
                if found is None:
                    if lock.path.parent.is_dir():  # deleted by hand: put it back
                        fd = os.open(lock.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                        with os.fdopen(fd, "w", encoding="utf-8") as f:
                            json.dump(lock.info, f)
                    continue
                if found[0] is not None and found[0].get("token") == lock.token:
                    os.utime(lock.path)
                    continue
                with _registry:
                    _held.pop(str(lock.path), None)
                print(f"[fdfo] the lock of run directory '{lock.path.parent}' is now held by "
                      f"{describe(*found)}: stopping this trainer, so that two never write one run",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            except OSError:
                continue  # a file system hiccup: the next beat tries again


def _start_keeping() -> None:
    global _heartbeat
    with _registry:
        if _heartbeat is not None and _heartbeat.is_alive():
            return
        _heartbeat = threading.Thread(target=_keep, name="fdfo-run-lock", daemon=True)
        _heartbeat.start()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, _on_signal)
            except (ValueError, OSError):
                pass


def _after_fork_in_child() -> None:
    """A forked child holds no lock (its parent does) and must not wait on a lock object copied mid-use."""
    global _registry, _heartbeat, _wake
    _registry, _heartbeat, _wake = threading.Lock(), None, threading.Event()
    _held.clear()


atexit.register(release_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
