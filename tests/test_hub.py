"""A hub model on a node whose hub is switched off or out of reach: the cached snapshot, or one line at once,
never a wait on the network."""

from __future__ import annotations

import random
import socket
import time

import pytest

from fdfo import hub


def _cache(root, repo_id: str, files: dict[str, str]) -> str:
    """A hub cache holding ``repo_id`` at a random commit (the layout huggingface_hub writes)."""
    commit = "%040x" % random.getrandbits(160)
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (snap / name).write_text(text)
    return str(snap)


@pytest.fixture
def unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda address=None: False)


def test_the_probe_tells_an_open_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.reachable(("127.0.0.1", port))
    assert hub.reachable(("127.0.0.1", port))  # asked once per process and host
    hub.reachable.cache_clear()
    t0 = time.monotonic()
    assert not hub.reachable(("127.0.0.1", port))  # closed now: refused at once
    assert time.monotonic() - t0 < hub.PROBE_S


def test_a_cached_model_is_used_from_the_cache_when_the_hub_is_out_of_reach(tmp_path, unreachable):
    repo_id = f"owner/model-{random.randrange(10**6)}"
    snap = _cache(tmp_path, repo_id, {"model_index.json": "{}"})
    assert hub.resolve(repo_id, "model.path", "fix", cache_dir=str(tmp_path)) == snap


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", None])
def test_a_missing_model_is_one_line_at_once(tmp_path, monkeypatch, switch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if switch:
        monkeypatch.setenv(switch, "1")
    else:
        monkeypatch.setattr(hub, "reachable", lambda address=None: False)
    repo_id = f"owner/absent-{random.randrange(10**6)}"
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        hub.resolve(repo_id, "reward 'pickscore'", "set reward.paths.pickscore", cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 2.0
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"reward 'pickscore': '{repo_id}' is not in the local model cache")
    assert ("HF_HUB_OFFLINE" in line) == bool(switch) and line.endswith("set reward.paths.pickscore")


def test_a_reward_metric_on_an_offline_node_is_not_available_at_once(tmp_path, monkeypatch):
    """The evaluation tools' metrics: a hub reward that is not cached is 'not available' with the reason, at
    once (it used to wait on the network for close to a minute)."""
    from fdfo.metrics import build_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    metric, note = build_metric("pickscore", None, "cpu", batch_size=2, cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 5.0
    assert metric is None and "not in the local model cache" in note and "HF_HUB_OFFLINE" in note, note
