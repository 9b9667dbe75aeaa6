"""Reward models behind one protocol: ``score(prompts, images) -> Tensor[B]``.

Images are float tensors [B, C, H, W] in [0, 1]. The training reward is a
weighted sum of named rewards (``reward.weights``), each loaded from
``reward.paths[name]`` (a local directory or a hub id; absent = the published
weights, or for a built-in task's reward its own models, also named ``builtin``).

    name                  what                                               range
    pickscore             PickScore (CLIP-H/14, Pick-a-Pic)                  ±100, ~18-23
    vlm_alignment         Qwen2.5-VL: P(Yes) that the image matches          [0, 100]
    clip_score            100·max(cos, 0), CLIP ViT-L/14                     [0, 100]
    clip_score_h14        the same with CLIP ViT-H/14 (LAION-2B)             [0, 100]
    hpsv2                 100·cos under HPSv2 (only where weights are given) ±100
    digit_probability     the digits task's CNN probability of the digit     [0, 1]
    digit_judge_accuracy  the digits task's held-out judge is right          {0, 1}
    remote                the scores of a reward server at reward.paths.remote (fdfo.rewards.remote)
    module.path:Name      a reward from outside the package (fdfo.rewards.plugin)

Published presets (docs/algorithm.md §2): ``pickscore``, ``vlm_alignment`` and
``combined`` (PickScore ×1 + VLM ×0.1, the default); ``preset_weights(name)``.

Diversity metrics of the evaluation (not rewards: they compare a prompt's images with
each other) are image embedders, ``embed_images(images) -> unit vectors [B, D]``; a
prompt's diversity is ``mean_pairwise_distance`` of its images' embeddings, the mean
over pairs of (1 − cos). ``build_diversity(name, path, device)`` loads one:

    name                what                                             weights
    dreamsim_diversity  DreamSim distance (DINO + CLIP + OpenCLIP        a local DreamSim cache only
                        ensemble): the published diversity figure        (never downloaded)
    clip_diversity      1 − cos of CLIP image embeddings (not DreamSim)  a CLIPModel (default ViT-L/14)
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch

from fdfo.rewards import plugin
from fdfo.rewards.base import RewardUnavailable, checked_scores, mean_pairwise_distance, report_nonfinite


class Reward(Protocol):
    def __call__(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor: ...


PRESETS: dict[str, dict[str, float]] = {
    "pickscore": {"pickscore": 1.0},
    "vlm_alignment": {"vlm_alignment": 1.0},
    "combined": {"pickscore": 1.0, "vlm_alignment": 0.1},
}


def preset_weights(name: str) -> dict[str, float]:
    """reward.weights of a published preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown reward preset '{name}'; available presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _pretrained(module: str, cls: str) -> Callable:
    """Factory of a pretrained reward: its options are ``batch_size`` and ``dtype``."""

    def factory(path: str | None, cache_dir: str | None, device, *, batch_size: int | None = None,
                dtype: torch.dtype | str | None = None):
        import importlib

        options = {k: v for k, v in (("batch_size", batch_size), ("dtype", dtype)) if v is not None}
        return getattr(importlib.import_module(module), cls)(path, device=device, **options)

    return factory


def _remote(path: str | None, cache_dir: str | None, device, *, batch_size: int | None = None):
    """Factory of the ``remote`` reward: ``path`` is the server's URL (the scores land on the images' device)."""
    from fdfo.rewards.remote import RemoteReward

    return RemoteReward(path, **({"batch_size": batch_size} if batch_size is not None else {}))


# name -> factory(path or None, cache_dir, device, **options) -> Reward. The built-in tasks'
# rewards (digit_probability, ...) come from their task (fdfo.tasks), loaded when first asked for.
REGISTRY: dict[str, Callable] = {
    "pickscore": _pretrained("fdfo.rewards.pickscore", "PickScore"),
    "vlm_alignment": _pretrained("fdfo.rewards.vlm", "VLMYesNoReward"),
    "clip_score": _pretrained("fdfo.rewards.clip_score", "ClipScore"),
    "clip_score_h14": _pretrained("fdfo.rewards.clip_score", "ClipScoreH14"),
    "hpsv2": _pretrained("fdfo.rewards.clip_score", "HPSv2"),
    "remote": _remote,
}


# name -> (module, class) of the image embedders behind the evaluation's diversity metrics.
DIVERSITY_METRICS: dict[str, tuple[str, str]] = {
    "dreamsim_diversity": ("fdfo.rewards.dreamsim", "DreamSimDiversity"),
    "clip_diversity": ("fdfo.rewards.clip_score", "ClipImageDiversity"),
}


# The range of each built-in reward's score (the table above; pickscore's with the published weights), for
# the reward curve, whose band stays inside it. A name not here (a plugin's, remote) has no known range.
RANGES: dict[str, tuple[float, float]] = {
    "pickscore": (-100.0, 100.0), "vlm_alignment": (0.0, 100.0), "clip_score": (0.0, 100.0),
    "clip_score_h14": (0.0, 100.0), "hpsv2": (-100.0, 100.0), "digit_probability": (0.0, 1.0),
    "digit_judge_accuracy": (0.0, 1.0),
}


def weighted_range(weights: dict[str, float]) -> tuple[float, float] | None:
    """The range of Σ_k w_k·R_k from its terms' ranges; None when a term's range is not known."""
    if not weights or any(name not in RANGES for name in weights):
        return None
    ends = [sorted((w * RANGES[name][0], w * RANGES[name][1])) for name, w in weights.items()]
    return sum(lo for lo, _ in ends), sum(hi for _, hi in ends)


def build_diversity(name: str, path: str | None, device: torch.device | str, /, *, batch_size: int | None = None):
    """Load diversity metric ``name``'s image embedder (its ``note`` describes the figure).

    ``path``: its weights (None: clip_diversity's default CLIP; dreamsim_diversity has no default and
    raises RewardUnavailable, reported as not available).
    """
    import importlib

    if name not in DIVERSITY_METRICS:
        raise ValueError(f"unknown diversity metric '{name}'; available: {', '.join(DIVERSITY_METRICS)}")
    module, cls = DIVERSITY_METRICS[name]
    options = {"batch_size": batch_size} if batch_size is not None else {}
    return getattr(importlib.import_module(module), cls)(path, device=device, **options)


def reward_factories() -> dict[str, Callable]:
    """Every reward name -> its factory: the registry's and the built-in tasks'."""
    from fdfo import tasks

    return {**tasks.reward_factories(), **REGISTRY}


def _option_names(factory: Callable) -> set[str] | None:
    """The keyword options a factory takes (None: any, for a factory that takes **options)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY}


def build_reward(name: str, path: str | None, device: torch.device | str, /, cache_dir: str | None = None,
                 **options) -> Reward:
    """Load reward ``name`` onto ``device``; options (batch_size, dtype) go to its factory.

    ``path`` is where its weights are (None: the default ones); an option the reward does not
    take is an error that names it and lists the ones it takes. A name ``module.path:Name`` is a
    reward from outside the package (``fdfo.rewards.plugin``).
    """
    factories = reward_factories()
    if plugin.is_spec(name):
        factory = plugin.factory(name)
    elif name in factories:
        factory = factories[name]
    else:
        raise ValueError(f"unknown reward '{name}'; available rewards: {', '.join(sorted(factories))}, "
                         "or module.path:Name for one of your own")
    valid = _option_names(factory)
    unknown = sorted(set(options) - valid) if valid is not None else []
    if unknown:
        raise ValueError(f"reward '{name}' takes no option '{unknown[0]}'; its options: "
                         f"{', '.join(sorted(valid)) or 'none'}")
    return factory(path, cache_dir, device, **options)


class WeightedReward:
    """R = Σ_k w_k·R_k; also returns each term so that it can be logged.

    A term that is NaN/inf for some image is reported with its prompt (a warning);
    the total is then non-finite too, and the trainer skips the batch. A term that does not
    give one score per image is an error naming it.
    """

    def __init__(self, terms: dict[str, tuple[float, Reward]]):
        self.terms = terms

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: checked_scores(name, fn(prompts, images), len(prompts)).float()
                 for name, (_, fn) in self.terms.items()}
        for name, value in parts.items():
            report_nonfinite(name, prompts, value)
        total = sum(self.terms[name][0] * value for name, value in parts.items())
        return total, parts


def build_weighted_reward(weights: dict[str, float], paths: dict[str, str], device: torch.device,
                          cache_dir: str | None = None,
                          options: dict[str, dict] | None = None) -> WeightedReward:
    """options: reward name -> keyword options of its factory (e.g. {"vlm_alignment": {"batch_size": 2}})."""
    options = options or {}
    return WeightedReward({name: (w, build_reward(name, paths.get(name), device, cache_dir, **options.get(name, {})))
                           for name, w in weights.items()})


__all__ = ["DIVERSITY_METRICS", "PRESETS", "RANGES", "REGISTRY", "Reward", "RewardUnavailable", "WeightedReward",
           "build_diversity", "build_reward", "build_weighted_reward", "mean_pairwise_distance", "preset_weights",
           "report_nonfinite", "reward_factories", "weighted_range"]
