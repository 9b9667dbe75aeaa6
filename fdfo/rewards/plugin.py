"""Rewards from outside the package: a reward name of the form ``module.path:Name``.

``Name`` is a class or a factory in the importable module ``module.path``. It is called once per rank
with those of the keyword arguments a built-in reward's factory gets that it names (``path``: its
``reward.paths`` entry or None, ``cache_dir``, ``device``, ``batch_size``; one that takes ``**options``
gets them all), and what it returns is the reward: ``reward(prompts, images [B, C, H, W] in [0, 1]) ->
Tensor [B]``. It is then scored as every built-in reward model is (``fdfo.rewards.base.FrozenRewardModel``):
in chunks of ``batch_size``, the images moved to ``device``, the scores float32 on the images' device,
a NaN score for an image with a NaN/inf pixel, and one score per image or an error naming the reward.

A spec that does not import, names nothing, or names something that is not a class or factory of this
shape is a ``ConfigError`` that names the spec and the fix, raised when the config is checked.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

import torch
from torch import Tensor

from fdfo.errors import ConfigError
from fdfo.rewards.base import FrozenRewardModel

SPEC_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# What a factory may take, by name (the keyword arguments of a built-in reward's factory).
ARGUMENTS = ("path", "cache_dir", "device", "batch_size")
DEFAULT_BATCH_SIZE = 8  # (reward.batch_size's default: the trainer always gives its own)


def is_spec(name: str) -> bool:
    """Whether a reward name names an outside reward (it holds a ':'); built-in names never do."""
    return ":" in name


def resolve(spec: str) -> Callable:
    """The class or factory ``spec`` names, checked: importable, there, callable, and asking for no
    argument beyond ``ARGUMENTS``. A ConfigError saying what is wrong and how to fix it otherwise."""
    if not SPEC_RE.fullmatch(spec):
        raise ConfigError(f"reward '{spec}' must look like module.path:Name (a class or factory in an "
                          "importable module)")
    module_name, _, attribute = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward '{spec}': module '{module_name}' does not import ({exc}); check the spelling, "
                          "or put the folder that holds it on PYTHONPATH") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward '{spec}': '{module_name}' has no '{attribute}'; name a class or factory "
                              f"defined there")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward '{spec}' is not a class or factory but a {type(obj).__name__}; name a class or "
                          "a function that returns reward(prompts, images) -> Tensor [B]")
    missing = [name for name, p in _parameters(obj).items() if p.default is p.empty and (
        p.kind is p.POSITIONAL_ONLY or p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in ARGUMENTS)]
    if missing:
        raise ConfigError(f"reward '{spec}' needs argument '{missing[0]}', which a reward's factory is not given "
                          f"(it is given those of {', '.join(ARGUMENTS)} that it names): give it a default, or "
                          "name a class or factory that returns the scoring function")
    return obj


def _parameters(obj: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):  # a callable without a signature (a builtin): it is given nothing
        return {}


def _arguments(obj: Callable, offered: dict) -> dict:
    """Those of ``offered`` that ``obj`` names (all of them when it takes ``**options``)."""
    params = _parameters(obj)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {name: value for name, value in offered.items()
            if name in params and params[name].kind in (params[name].POSITIONAL_OR_KEYWORD, params[name].KEYWORD_ONLY)}


class PluginReward(FrozenRewardModel):
    """An outside reward scored as the built-in reward models are: see the module docstring."""

    def __init__(self, spec: str, reward: Callable, device: torch.device | str, batch_size: int):
        super().__init__(device, None, batch_size)
        self.name, self.reward = spec, reward

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        return self.reward(prompts, images.to(self.device))


def factory(spec: str) -> Callable:
    """The factory of the outside reward ``spec``, shaped as a built-in one's (``fdfo.rewards.REGISTRY``)."""

    def build(path: str | None, cache_dir: str | None, device, *, batch_size: int | None = None) -> PluginReward:
        obj = resolve(spec)
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        reward = obj(**_arguments(obj, {"path": path, "cache_dir": cache_dir, "device": device,
                                        "batch_size": batch_size}))
        if not callable(reward):
            raise ConfigError(f"reward '{spec}' returned a {type(reward).__name__}, which is not a reward; it must "
                              "return (or, a class, be) a callable reward(prompts, images) -> Tensor [B]")
        return PluginReward(spec, reward, device, batch_size)

    return build
