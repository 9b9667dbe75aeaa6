"""Built-in tasks: everything a ``builtin:NAME`` stands for, in one registry.

A task is a small, self-contained text-to-image problem that needs no download:
its prompt set, a base model that it builds once and caches, its reward models
and the run config of its default job. One name serves every place that takes
a path or a file:

    model.path: builtin:digits      the task's base model (a local diffusers directory)
    data.prompts: builtin:digits    the task's prompts
    --config builtin:digits         the task's default job (``preset``)
    reward.paths.NAME: builtin      the task's own weights of reward NAME (also when absent)

Built-in files live under ``cache_root``: model.cache_dir, else $FDFO_CACHE, else
~/.cache/fdfo. A task module is imported only when its name is asked for.
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PREFIX = "builtin:"
# name -> the module whose TASK defines it
_MODULES: dict[str, str] = {"digits": "fdfo.tasks.digits"}


@dataclass(frozen=True)
class Task:
    name: str
    prompts: Callable[[], list[str]]
    # (cache root, progress) -> local diffusers pipeline directory, built on first use
    model_path: Callable[[Path, bool], str]
    # reward name -> factory(path or None, cache_dir, device, **options) -> Reward
    reward_factories: dict[str, Callable]
    # the run config of the task's default job (a partial config over the dataclass defaults)
    preset: dict
    # the model family of its base model (fdfo.models: FlowModel.family), known before the model is built
    family: str = "sd3"
    # (cache root) -> None, or FileNotFoundError naming what building its cached files would lack
    check_build: Callable[[Path], None] = lambda root: None


def names() -> list[str]:
    """Every built-in name, ``builtin:`` included."""
    return [PREFIX + name for name in _MODULES]


def is_builtin(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def get(spec: str) -> Task:
    """The task of ``builtin:NAME`` (or of a bare NAME); an unknown name lists the valid ones."""
    name = spec[len(PREFIX):] if is_builtin(spec) else spec
    if name not in _MODULES:
        raise FileNotFoundError(f"unknown built-in '{spec}'; valid: {', '.join(names())}")
    return importlib.import_module(_MODULES[name]).TASK


def cache_root(cache_dir: str | None = None) -> Path:
    """Where built-in models live: model.cache_dir, else $FDFO_CACHE, else ~/.cache/fdfo."""
    return Path(cache_dir or os.environ.get("FDFO_CACHE") or Path.home() / ".cache" / "fdfo").expanduser()


def resolve_model_path(path: str, cache_dir: str | None = None, progress: bool = True) -> str:
    """``model.path`` as something ``from_pretrained`` reads: a built-in task's cached base
    (built on first use), or the path or hub id unchanged."""
    if not is_builtin(path):
        return path
    return get(path).model_path(cache_root(cache_dir), progress)


def check_build(path: str, cache_dir: str | None = None) -> None:
    """Before a run starts: a built-in model that is not cached yet can be built here (a clear
    FileNotFoundError otherwise); any other path passes."""
    if is_builtin(path):
        get(path).check_build(cache_root(cache_dir))


def prompts(spec: str) -> list[str]:
    """The prompts of a built-in task."""
    return list(get(spec).prompts())


def preset(spec: str) -> dict:
    """The run config of a built-in task's default job (a fresh copy: callers may change it)."""
    return copy.deepcopy(get(spec).preset)


def reward_factories() -> dict[str, Callable]:
    """Reward name -> factory of every built-in task's rewards (loads the task modules)."""
    out: dict[str, Callable] = {}
    for spec in names():
        out.update(get(spec).reward_factories)
    return out


__all__ = ["PREFIX", "Task", "cache_root", "check_build", "get", "is_builtin", "names", "preset", "prompts",
           "resolve_model_path", "reward_factories"]
