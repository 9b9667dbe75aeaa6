"""Reward models behind one protocol: ``score(prompts, images) -> Tensor[B]``.

Images are float tensors [B, C, H, W] in [0, 1]. The training reward is a
weighted sum of named rewards (``reward.weights``), each loaded from
``reward.paths[name]`` (``builtin`` for the digits task's own models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch


class Reward(Protocol):
    def __call__(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor: ...


def _digits_dir(path: str | None, cache_dir: str | None) -> Path:
    if path in (None, "builtin"):
        from fdfo.models import cache_root
        from fdfo.pretrain import ensure_digits_rewards

        return ensure_digits_rewards(cache_root(cache_dir))
    return Path(path)


def _digit_probability(path, cache_dir, device):
    from fdfo.rewards.digits import DigitProbabilityReward

    return DigitProbabilityReward(_digits_dir(path, cache_dir)).to(device)


def _digit_judge(path, cache_dir, device):
    from fdfo.rewards.digits import DigitJudgeAccuracy

    return DigitJudgeAccuracy(_digits_dir(path, cache_dir)).to(device)


# name -> factory(path or None, cache_dir, device) -> Reward
REGISTRY: dict[str, Callable] = {
    "digit_probability": _digit_probability,
    "digit_judge_accuracy": _digit_judge,
}


def build_reward(name: str, path: str | None, device: torch.device, cache_dir: str | None = None) -> Reward:
    if name not in REGISTRY:
        raise ValueError(f"unknown reward '{name}'; available rewards: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](path, cache_dir, device)


class WeightedReward:
    """R = Σ_k w_k·R_k; also returns each term so that it can be logged."""

    def __init__(self, terms: dict[str, tuple[float, Reward]]):
        self.terms = terms

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: fn(prompts, images).float() for name, (_, fn) in self.terms.items()}
        total = sum(self.terms[name][0] * value for name, value in parts.items())
        return total, parts


def build_weighted_reward(weights: dict[str, float], paths: dict[str, str], device: torch.device,
                          cache_dir: str | None = None) -> WeightedReward:
    return WeightedReward({name: (w, build_reward(name, paths.get(name), device, cache_dir))
                           for name, w in weights.items()})
