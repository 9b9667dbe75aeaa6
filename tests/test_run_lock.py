"""fdfo.run_lock: one trainer per run directory. Real processes race for a lock, die by kill -9, SIGTERM and
a normal exit; the trainer's start-up (run_dir.plan / prepare, fdfo/train.py) refuses a directory another
trainer holds before any model is loaded. Each holder is a small Python process (no torch): seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fdfo import run_lock
from fdfo.run_lock import LOCK_FILE, RunLocked

ROOT = Path(__file__).resolve().parents[1]

# Takes the lock of argv[1] once argv[2] exists (so that several start at the same instant), says so, then
# sleeps argv[3] seconds and exits normally. A refusal: the one line on stderr, exit status 3.
HOLDER = """
import os, signal, sys, time
# Ctrl-C as in a terminal: a test suite started in the background by a non-interactive shell passes its
# processes SIGINT ignored, and Python then never raises KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
from fdfo import run_lock
if len(sys.argv) > 4:
    run_lock.HEARTBEAT_S = float(sys.argv[4])
    from fdfo import interrupts
    interrupts.install()  # the trainer's own SIGTERM handling
go = sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.005)
try:
    lock = run_lock.acquire(sys.argv[1])
except run_lock.RunLocked as exc:
    print(f"fdfo: error: {{exc}}", file=sys.stderr, flush=True)
    sys.exit(3)
print("held", os.getpid(), flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def holder_script(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=str(ROOT)))
    return script


def start(script, directory, go, seconds, *extra):
    return subprocess.Popen([sys.executable, str(script), str(directory), str(go), str(seconds), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_held(proc) -> int:
    line = proc.stdout.readline()
    assert line.startswith("held"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return int(line.split()[1])


def lock_of(directory) -> dict:
    return json.loads((Path(directory) / LOCK_FILE).read_text())


def test_two_trainers_started_together_exactly_one_wins(tmp_path, holder_script):
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    procs = [start(holder_script, run, go, 1) for _ in range(2)]
    time.sleep(0.3)  # both are waiting for the start signal
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append((p.returncode, out, err, p.pid))
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] == 3]
    assert len(winners) == 1 and len(losers) == 1, results
    err = losers[0][2]
    assert err.count("\n") == 1, err  # one line
    winner_pid = winners[0][3]
    assert f"PID {winner_pid}" in err and f"on host {socket.gethostname()} (this host)" in err and "since" in err
    assert f"kill {winner_pid}" in err and "another log.out_dir" in err and str(run / LOCK_FILE) in err
    assert not (run / LOCK_FILE).exists()  # the winner released it as it exited


def test_a_lock_left_by_kill_9_is_taken_over_with_a_notice(tmp_path, holder_script):
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    go.touch()
    first = start(holder_script, run, go, 60)
    pid = wait_held(first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert lock_of(run)["pid"] == pid  # kill -9 runs no exit handler: the lock stays behind
    second = start(holder_script, run, go, 0)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    notice = [line for line in out.splitlines() if "stale" in line]
    assert len(notice) == 1 and f"PID {pid}" in notice[0] and "that process is gone" in notice[0], out
    assert not (run / LOCK_FILE).exists()


@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGTERM-trainer", "SIGINT"])
def test_the_lock_is_gone_after_exit_and_after_a_signal(tmp_path, holder_script, how):
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    go.touch()
    # "SIGTERM-trainer": with fdfo.interrupts installed (SIGTERM raises, as in the trainer); "SIGTERM": a plain
    # process (the lock's own handler releases it, then the process dies of the signal).
    extra = [30] if how == "SIGTERM-trainer" else []
    proc = start(holder_script, run, go, 1 if how == "exit" else 60, *extra)
    wait_held(proc)
    assert lock_of(run)["pid"] == proc.pid
    if how != "exit":
        proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
    proc.communicate(timeout=60)
    # (an unhandled KeyboardInterrupt ends Python by SIGINT, after the exit handlers)
    assert proc.returncode in {"exit": (0,), "SIGTERM": (-signal.SIGTERM,), "SIGINT": (-signal.SIGINT,),
                               "SIGTERM-trainer": (1, -signal.SIGINT)}[how], proc.returncode
    assert not (run / LOCK_FILE).exists()


def test_a_holder_whose_lock_is_taken_over_stops(tmp_path, holder_script):
    """Should another process take the lock over (a wrong verdict of staleness), the holder stops its run at its
    next heartbeat rather than write beside the other."""
    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    go.touch()
    proc = start(holder_script, run, go, 60, 0.2)  # heartbeat every 0.2 s, the trainer's SIGTERM handling
    wait_held(proc)
    other = dict(lock_of(run), host="elsewhere", pid=4242, token="someone-else")
    (run / LOCK_FILE).write_text(json.dumps(other))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "is now held by PID 4242" in err and "stopping this trainer" in err, err
    assert lock_of(run)["token"] == "someone-else"  # the stopped holder left the other's lock alone


def foreign_lock(run: Path, **changes) -> Path:
    info = {"host": "gpu-node-17", "pid": 31337, "since": "2026-05-09 14:03:12 UTC", "since_unix": 0,
            "process_start": "ticks:1", "boot_id": "x", "user": "alice", "token": "theirs", **changes}
    path = run / LOCK_FILE
    path.write_text(json.dumps(info))
    return path


def test_a_lock_of_another_host_is_refused_until_it_goes_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = foreign_lock(run)
    with pytest.raises(RunLocked) as info:
        run_lock.acquire(run)
    message = str(info.value)
    assert "\n" not in message and "PID 31337 of user alice on host gpu-node-17, running since 2026-05-09" in message
    assert "last seen" in message and f"delete '{path.resolve()}'" in message
    assert run_lock.holder(run) == message  # what plan() says, read-only
    # Not refreshed for longer than STALE_AFTER_S: its host is taken to be gone.
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    assert run_lock.holder(run) is None
    said = []
    lock = run_lock.acquire(run, notify=said.append)
    try:
        assert len(said) == 1 and "taking over the stale lock" in said[0] and "gpu-node-17" in said[0]
        assert "last refreshed" in said[0]
        assert lock_of(run)["pid"] == os.getpid()
    finally:
        lock.release()
    assert not path.exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """A lock of this host whose PID now belongs to another process (its start time differs) is stale."""
    run = tmp_path / "run"
    run.mkdir()
    foreign_lock(run, host=socket.gethostname(), pid=os.getppid(), process_start="ticks:0",
                 boot_id=run_lock._boot_id())
    said = []
    with run_lock.acquire(run, notify=said.append):
        assert len(said) == 1 and "that process is gone" in said[0]
    assert not (run / LOCK_FILE).exists()
    # The same PID with its real start time: alive, refused.
    foreign_lock(run, host=socket.gethostname(), pid=os.getppid(), process_start=run_lock.process_start(os.getppid()),
                 boot_id=run_lock._boot_id())
    with pytest.raises(RunLocked, match=f"kill {os.getppid()}"):
        run_lock.acquire(run)


def test_one_process_takes_its_own_lock_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run_lock.acquire(run)
    assert run_lock.acquire(run) is lock and run_lock.holder(run) is None
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / LOCK_FILE).write_text((run / LOCK_FILE).read_text())  # a run directory copied with its lock
    said = []
    other = run_lock.acquire(copy, notify=said.append)
    assert other is not lock and not said and lock_of(copy)["token"] != lock.token
    run_lock.release(run)
    other.release()
    assert not (run / LOCK_FILE).exists() and not (copy / LOCK_FILE).exists()


# --------------------------------------------------------------------------- the trainer's start-up


def test_the_trainer_refuses_a_run_directory_another_trainer_holds(tmp_path, holder_script, capsys,
                                                                   monkeypatch, tiny_pipeline_dir):
    import yaml

    from fdfo import trainer
    from fdfo.run_dir import RunDirError, plan, prepare
    from fdfo.settings import build_config
    from fdfo.train import main
    from tests.test_train import QUIET, tiny_run

    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    go.touch()
    proc = start(holder_script, run, go, 60)
    try:
        pid = wait_held(proc)
        cfg = build_config({"log": {"out_dir": str(run)}})
        for kwargs in ({}, {"resume": "auto"}, {"overwrite": True}):
            with pytest.raises(RunDirError, match=f"in use by another trainer: PID {pid} "):
                plan(cfg, **kwargs)
        # prepare (the authority: plan only looks) takes the lock atomically, also when plan found it free.
        start_ = plan(build_config({"log": {"out_dir": str(tmp_path / "free")}}))
        start_.out_dir = run
        with pytest.raises(RunDirError, match=f"PID {pid} "):
            prepare(start_)

        def refuse(*args, **kwargs):
            raise AssertionError("a model was loaded before the busy directory was reported")

        monkeypatch.setattr(trainer, "load_flow_model", refuse)
        config = tmp_path / "c.yaml"
        rewards = tmp_path / "rewards"  # (never loaded: the refusal comes first)
        config.write_text(yaml.safe_dump(tiny_run(run, tiny_pipeline_dir, rewards, **QUIET).to_dict()))
        capsys.readouterr()
        assert main(["--config", str(config), "--resume"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fdfo: error: run directory") and f"PID {pid}" in err, err
    finally:
        proc.kill()
        proc.wait()


def test_only_global_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from fdfo import distributed
    from fdfo.run_dir import plan, prepare
    from fdfo.settings import build_config

    run = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    start_ = prepare(plan(build_config({"log": {"out_dir": str(run)}})))
    assert start_.lock is None and not (run / LOCK_FILE).exists()  # rank 0 makes it, not this one
    # A stale lock is left for rank 0 to take over: another rank never removes or replaces it.
    run.mkdir()
    path = foreign_lock(run)
    old = os.stat(path).st_mtime - run_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    start_ = prepare(plan(build_config({"log": {"out_dir": str(run)}}), resume="auto"))
    assert start_.lock is None and lock_of(run)["token"] == "theirs"
