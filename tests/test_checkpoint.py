"""fdfo.checkpoint: the layout, `latest`, `keep_last` pruning and RNG state, with a stand-in engine.

The DeepSpeed side (sharded state, universal conversion, exact resume) is exercised end to end
by tests/test_train.py and tests/test_distributed.py; here the manager's own logic is checked
in isolation, one process, no process group.
"""

import errno
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fdfo.checkpoint import LATEST, CheckpointError, CheckpointManager, rng_state, set_rng_state


class FakeEngine:
    """Writes what the real engine writes, minus DeepSpeed: a state file per tag and an adapter."""

    def __init__(self):
        self.saved = []

    def save_state(self, directory: Path, tag: str, client_state: dict) -> None:
        (directory / tag).mkdir()
        torch.save({"trainer": client_state}, directory / tag / "mp_rank_00_model_states.pt")
        self.saved.append(client_state["epoch"])

    def load_state(self, directory: Path, tag: str, universal: bool = False) -> dict:
        return torch.load(directory / tag / "mp_rank_00_model_states.pt", weights_only=False)["trainer"]

    def export(self, directory: Path) -> None:
        (directory / "adapter").mkdir()
        (directory / "adapter" / "weights").write_text("w")


def manager(tmp_path, every=1, keep_last=0):
    return CheckpointManager(tmp_path, SimpleNamespace(every=every, keep_last=keep_last), FakeEngine())


def save(m, epoch):
    return m.save(epoch, {"epoch": epoch, "global_step": 4 * epoch, "history": [{"epoch": epoch}]})


def names(m):
    return [p.name for p in m.checkpoints()]


def test_layout_latest_and_due(tmp_path):
    m = manager(tmp_path, every=5)
    assert m.latest() is None
    assert [e for e in range(1, 13) if m.due(e, last=e == 12)] == [5, 10, 12]
    assert not manager(tmp_path, every=0).due(5, last=True)
    path = save(m, 5)
    assert path == tmp_path / "checkpoints" / "epoch_0005"
    assert sorted(p.name for p in path.iterdir()) == ["adapter", "manifest.json", "state", "trainer.json"]
    assert json.loads((path / "trainer.json").read_text()) == {"epoch": 5, "global_step": 20}  # no history
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "epoch_0005"
    assert m.latest() == path
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_keep_last_prunes_the_oldest_and_never_the_latest(tmp_path):
    m = manager(tmp_path, keep_last=2)
    for epoch in (1, 2, 9998, 9999, 10000):  # "epoch_10000" sorts before "epoch_9999" as a string
        save(m, epoch)
    assert names(m) == ["epoch_9999", "epoch_10000"]
    # A user points `latest` at an older checkpoint (to resume from it): pruning keeps it as well.
    (tmp_path / "checkpoints" / LATEST).write_text("epoch_9999")
    m.keep_last = 1
    assert [p.name for p in m.prune()] == []
    assert names(m) == ["epoch_9999", "epoch_10000"]
    save(m, 10001)  # latest -> epoch_10001 again: now only it remains
    assert names(m) == ["epoch_10001"]
    # keep_last 0 keeps everything.
    m0 = manager(tmp_path / "all")
    for epoch in range(1, 5):
        save(m0, epoch)
    assert len(names(m0)) == 4


def test_a_half_deleted_checkpoint_is_never_listed_and_is_cleared(tmp_path):
    m = manager(tmp_path, keep_last=1)
    save(m, 1)
    # What a crash in the middle of pruning leaves: the renamed-aside directory.
    stale = tmp_path / "checkpoints" / "epoch_0001.deleting"
    (tmp_path / "checkpoints" / "epoch_0001").rename(stale)
    assert names(m) == []
    save(m, 2)
    assert names(m) == ["epoch_0002"] and not stale.exists()


def test_load_restores_trainer_state_and_rng(tmp_path):
    m = manager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save(m, 7)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = m.load(m.latest())
    assert state == {"epoch": 7, "global_step": 28, "history": [{"epoch": 7}]}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    with pytest.raises(FileNotFoundError, match="not an fdfo checkpoint"):
        m.load(tmp_path)


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.randn(4)
    torch.randn(10)
    set_rng_state(state)
    assert torch.equal(torch.randn(4), a)


class FullDiskEngine(FakeEngine):
    """Writes part of the state, then fails as torch.save does on a full disk."""

    def save_state(self, directory: Path, tag: str, client_state: dict) -> None:
        (directory / tag).mkdir()
        (directory / tag / "part").write_bytes(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")


def test_a_failed_write_leaves_nothing_partial_and_says_which_checkpoint_is_usable(tmp_path):
    m = manager(tmp_path)
    save(m, 1)
    m.engine = FullDiskEngine()
    with pytest.raises(CheckpointError) as info:
        save(m, 2)
    message = str(info.value)
    assert "epoch_0002" in message and "file write failed" in message and "MiB free" in message
    assert "the latest checkpoint is still" in message and "epoch_0001" in message and "--resume" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001", LATEST]
    assert m.latest() == tmp_path / "checkpoints" / "epoch_0001"

    # An OSError (ENOSPC while writing trainer.json) names the cause and the file.
    m.engine = FakeEngine()

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    from fdfo import atomic

    original = atomic.write_text
    atomic.write_text = no_space
    try:
        with pytest.raises(CheckpointError, match="No space left on device .*trainer.json"):
            save(m, 2)
    finally:
        atomic.write_text = original
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0001", LATEST]


# kill -9 at each point of a save with checkpoint.keep_last=1: pruning must never remove the checkpoint
# `latest` names, and the run directory must always hold a loadable latest checkpoint.
KILL_POINTS = ["state", "export", "trainer.json", "replace_dir", "latest", "prune"]

_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}]
from tests.test_checkpoint import FakeEngine, manager, save
from fdfo import atomic, checkpoint

root, point, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
m = manager(root, keep_last=1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hook(name, fn):
    def wrapped(*args, **kwargs):
        if name == point and m.dying:
            die()
        return fn(*args, **kwargs)
    return wrapped

m.dying = False
m.engine.save_state = hook("state", m.engine.save_state)
m.engine.export = hook("export", m.engine.export)
write_text, replace_dir = atomic.write_text, atomic.replace_dir
atomic.write_text = lambda path, text: hook("latest" if Path(path).name == "latest" else "trainer.json",
                                             write_text)(path, text)
atomic.replace_dir = hook("replace_dir", replace_dir)
remove_dir = atomic.remove_dir

def remove_then_die(path):  # kill -9 in the middle of a deletion: renamed aside, not yet deleted
    os.replace(path, Path(str(path) + ".deleting"))
    die()

for epoch in range(1, epochs + 1):
    m.dying = epoch == epochs
    if m.dying and point == "prune":
        atomic.remove_dir = remove_then_die
    save(m, epoch)
"""


@pytest.mark.parametrize("point", KILL_POINTS)
def test_keep_last_under_kill_9(tmp_path, point):
    import subprocess
    import sys

    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT.format(root=str(Path(__file__).resolve().parents[1])))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(run), point, "3"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    m = manager(run, keep_last=1)
    latest = m.latest()
    assert latest is not None and latest in m.checkpoints(), (point, m.checkpoints())
    # The latest checkpoint is loadable, and it is epoch 2 unless the kill came after `latest` moved on.
    assert m.load(latest)["epoch"] == (3 if point == "prune" else 2)
    # The next save prunes down to one and clears what the kill left.
    save(m, 4)
    assert names(m) == ["epoch_0004"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0004", LATEST]
