"""fdfo.checkpoint: the layout, `latest`, `keep_last` pruning and RNG state, with a stand-in engine.

The DeepSpeed side (sharded state, universal conversion, exact resume) is exercised end to end
by tests/test_train.py and tests/test_distributed.py; here the manager's own logic is checked
in isolation, one process, no process group.
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fdfo.checkpoint import LATEST, CheckpointManager, rng_state, set_rng_state


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
    assert m.latest() is None and m.find("auto") is None
    assert [e for e in range(1, 13) if m.due(e, last=e == 12)] == [5, 10, 12]
    assert not manager(tmp_path, every=0).due(5, last=True)
    path = save(m, 5)
    assert path == tmp_path / "checkpoints" / "epoch_0005"
    assert sorted(p.name for p in path.iterdir()) == ["adapter", "state", "trainer.json"]
    assert json.loads((path / "trainer.json").read_text()) == {"epoch": 5, "global_step": 20}  # no history
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "epoch_0005"
    assert m.find("auto") == path and m.find(str(path)) == path
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.find(str(tmp_path / "nope"))


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
    state = m.load(m.find("auto"))
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
