"""The metrics of an evaluation by name: which names exist, where each one's weights are, and the
metric itself, built, or why it is not available.

A metric is a reward that ``fdfo.rewards.build_reward`` knows (a scorer of images) or a diversity metric
(``fdfo.rewards.DIVERSITY_METRICS``: an image embedder whose figure compares the repeats of a prompt).
A metric whose weights are missing or do not load is not an error: the evaluation reports it as not
available, with the reason, and goes on with the others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdfo.rewards import DIVERSITY_METRICS, RewardUnavailable, build_diversity, build_reward


def check_metric_names(names: list[str]) -> None:
    """A one-line error for the first name that is neither a reward nor a diversity metric. A reward from
    outside the package (``module.path:Name``, as a run's reward.weights may hold) is resolved here, so
    that a spec that does not import is refused before any model loads."""
    from fdfo.rewards import plugin, reward_factories

    known = [*sorted(reward_factories()), *DIVERSITY_METRICS]
    for name in names:
        if plugin.is_spec(name):
            plugin.resolve(name)
        elif name not in known:
            raise ValueError(f"unknown metric '{name}'; available metrics: {', '.join(known)}, "
                             "or module.path:Name for a reward of your own")


def metric_paths(specs: list[str], metrics: list[str], run_config: dict | None) -> dict[str, str]:
    """Weights of each metric: ``--path NAME=DIR``, else the run config's reward.paths (else the metric's
    default). A malformed spec, a metric not evaluated, or a local directory that does not exist: one line."""
    paths = {k: v for k, v in ((run_config or {}).get("reward", {}).get("paths", {}) or {}).items() if k in metrics}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not eq or not name or not value:
            raise ValueError(f"--path '{spec}' must look like NAME=DIR")
        if name not in metrics:
            raise ValueError(f"--path '{spec}' names metric '{name}', which is not evaluated here "
                             f"({', '.join(metrics)}); check its spelling or add it to --metrics")
        local = Path(value).expanduser()
        if value != "builtin" and not local.exists() and (value.startswith((".", "/", "~")) or value.count("/") != 1):
            raise FileNotFoundError(f"--path '{spec}': '{value}' does not exist; give the directory of the "
                                    f"metric's weights (or a hub id owner/name)")
        paths[name] = value
    return paths


def build_metric(name: str, path: str | None, device: torch.device, *, batch_size: int,
                 cache_dir: str | None = None):
    """(scorer or image embedder, None), or (None, why it is not available): weights that were not given
    or that do not load leave the metric out of the results with that note instead of stopping the run."""
    try:
        if name in DIVERSITY_METRICS:
            return build_diversity(name, path, device, batch_size=batch_size), None
        return build_reward(name, path, device, cache_dir, batch_size=batch_size), None
    except RewardUnavailable as exc:
        return None, "not available: " + str(exc).split("not available: ", 1)[-1]
    except (OSError, ValueError, RuntimeError) as exc:  # weights that do not load: the results say why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"not available: {first}"


def build_metrics(names: list[str], paths: dict[str, str], device: torch.device, *, batch_size: int,
                  cache_dir: str | None = None) -> tuple[dict, dict]:
    """Metric name -> scorer or image embedder (those available); and name -> note (what a diversity
    metric's figure is, or why a metric is not available)."""
    metrics, notes = {}, {}
    for name in names:
        metric, note = build_metric(name, paths.get(name), device, batch_size=batch_size, cache_dir=cache_dir)
        if metric is not None:
            metrics[name] = metric
            note = getattr(metric, "note", None)
        if note:
            notes[name] = note
    return metrics, notes


def diversity_note(metric: str) -> str:
    """What a diversity figure is (its class's ``note``), without loading its weights."""
    import importlib

    module, cls = DIVERSITY_METRICS[metric]
    return getattr(getattr(importlib.import_module(module), cls), "note", "")
