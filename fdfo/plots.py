"""The reward curve (``reward_curve.png``): one panel per metric against epochs, each on its own y axis.

    training reward      the epoch's mean, and a band of ± one standard deviation
    reward/NAME          each term of a weighted reward (when it has two or more)
    eval/...             each evaluation metric (fixed prompts and seeds; epoch 0 is the base model),
                         eval/pixel_diversity among them

The band is clipped to the range the reward can take, where that is known (``fdfo.rewards.RANGES``):
mean ± std of a probability stays inside [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

COLUMNS = 3  # panels a row


def panels(history: list[dict]) -> list[tuple[str, str]]:
    """(record kind, key) of each panel, in order: the training reward, its terms, the evaluation's metrics."""
    epochs = [r for r in history if r["kind"] == "epoch"]
    terms = sorted({k for r in epochs for k in r if k.startswith("reward/")})
    evals = list(dict.fromkeys(k for r in history if r["kind"] == "eval" for k in r if k.startswith("eval/")))
    return [("epoch", "reward_mean"), *(("epoch", k) for k in terms if len(terms) > 1), *(("eval", k) for k in evals)]


def band(mean: np.ndarray, std: np.ndarray, limits: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean − std, mean + std), clipped to ``limits`` when the metric's range is known."""
    low, high = mean - std, mean + std
    return (low, high) if limits is None else (np.clip(low, *limits), np.clip(high, *limits))


def plot_curves(history: list[dict], reward_range: tuple[float, float] | None, path: Path) -> Path:
    """Draw ``history`` (the run's epoch and eval records) into ``path``; ``reward_range``: the training
    reward's (``fdfo.rewards.weighted_range``), None when not known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shown = panels(history)
    cols = min(COLUMNS, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, shown):
        points = [(r["epoch"], r[key], r.get("reward_std")) for r in history
                  if r["kind"] == kind and isinstance(r.get(key), (int, float))]
        x = np.array([p[0] for p in points], dtype=float)
        y = np.array([p[1] for p in points], dtype=float)
        if key == "reward_mean":
            ax.set_title("training reward (mean ± std)")
            ax.plot(x, y, marker="." if len(x) > 1 else "o")
            if points:
                ax.fill_between(x, *band(y, np.array([p[2] or 0.0 for p in points]), reward_range), alpha=0.25)
        else:
            ax.set_title(key)
            ax.plot(x, y, marker="o", color="C1" if kind == "eval" else "C2")
        ax.set_xlabel("epoch (0: the base model; fixed prompts and seeds)" if kind == "eval" else "epoch",
                      fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
