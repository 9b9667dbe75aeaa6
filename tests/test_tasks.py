"""The registry of built-in tasks: names, errors, the cache root, and what builtin:digits resolves to."""

from __future__ import annotations

import json

import pytest

from fdfo import tasks
from fdfo.prompts import load_prompts


def test_names_and_lookup():
    assert tasks.names() == ["builtin:digits"]
    assert tasks.is_builtin("builtin:digits") and tasks.is_builtin("builtin:nope")
    assert not tasks.is_builtin("prompts/examples.txt") and not tasks.is_builtin(None)
    task = tasks.get("builtin:digits")
    assert task.name == "digits" and tasks.get("digits") is task
    for call in (tasks.get, tasks.prompts, tasks.preset, load_prompts, tasks.resolve_model_path):
        with pytest.raises(FileNotFoundError, match=r"unknown built-in 'builtin:mnist'; valid: builtin:digits"):
            call("builtin:mnist")


def test_prompts():
    words = "zero one two three four five six seven eight nine".split()
    prompts = load_prompts("builtin:digits")
    assert prompts == tasks.prompts("builtin:digits") == [f"a handwritten digit {w}" for w in words]
    prompts.append("a handwritten digit ten")  # a copy
    assert len(load_prompts("builtin:digits")) == 10


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFO_CACHE", str(tmp_path / "env"))
    assert tasks.cache_root() == tmp_path / "env"
    assert tasks.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"  # model.cache_dir wins
    monkeypatch.delenv("FDFO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tasks.cache_root() == tmp_path / "home" / ".cache" / "fdfo"


def test_model_path_is_the_cached_base(tmp_path):
    """builtin:digits resolves to the base in the cache (put there untrained, so nothing pretrains);
    any other model.path is returned as given."""
    from fdfo.tasks.digits import BASE_DIR_NAME
    from fdfo.tasks.digits.pretrain import digits_pipeline

    hub_id = "stabilityai/stable-diffusion-3.5-medium"
    assert tasks.resolve_model_path(hub_id) == hub_id and tasks.resolve_model_path(str(tmp_path)) == str(tmp_path)
    root = tmp_path / "cache"
    digits_pipeline(seed=0).save_pretrained(root / BASE_DIR_NAME)
    before = sorted(p.name for p in root.iterdir())
    assert tasks.resolve_model_path("builtin:digits", str(root), progress=False) == str(root / BASE_DIR_NAME)
    assert sorted(p.name for p in root.iterdir()) == before
    assert json.loads((root / BASE_DIR_NAME / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusion3Pipeline"


def test_every_task_is_complete():
    from fdfo.settings import build_config

    for spec in tasks.names():
        task = tasks.get(spec)
        assert task.prompts() and task.reward_factories
        cfg = build_config(tasks.preset(spec))
        assert cfg.model.path == spec  # the default job trains the task's own base
        assert set(cfg.reward.weights) | set(cfg.eval.metrics) <= set(task.reward_factories)
