"""Run reporting: JSONL metrics, optional wandb/tensorboard, reward-curve and sample-grid PNGs.

Only rank 0 writes. Every line of metrics.jsonl is one JSON object with a
``kind`` of "step", "epoch" or "eval".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from fdfo.images import image_grid


class RunReport:
    def __init__(self, out_dir: Path, cfg, enabled: bool, resumed: bool = False):
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.history: list[dict] = []
        self._wandb = self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self._file = open(self.out_dir / "metrics.jsonl", "a" if resumed else "w")
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("log.wandb is true but wandb is not installed: pip install wandb") from exc
            self._wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.name, config=cfg.to_dict(),
                                     dir=str(self.out_dir))
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("log.tensorboard is true but tensorboard is not installed: "
                                  "pip install tensorboard") from exc
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def resume(self, history: list[dict], epoch: int) -> None:
        """Continue a run from a checkpoint of ``epoch``: its history, and metrics.jsonl without the
        lines of later epochs (which the resumed run writes again), so the log has no duplicates."""
        self.history = list(history)
        if not self.enabled:
            return
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        keep, torn = [], 0
        for line in filter(None, lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short (a full disk, a killed process): dropped
                torn += 1
                continue
            if record.get("epoch", 0) <= epoch:
                keep.append(line)
        if torn:
            warnings.warn(f"{path}: dropped {torn} incomplete line(s) that an interrupted write left")
        self._file.seek(0)
        self._file.truncate()
        self._file.write("".join(line + "\n" for line in keep))
        self._file.flush()

    def log(self, kind: str, record: dict, step: int) -> None:
        record = {"kind": kind, **{k: _plain(v) for k, v in record.items()}}
        if kind in ("epoch", "eval"):
            self.history.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "kind"}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._wandb is not None:
                self._wandb.finish()
            if self._tb is not None:
                self._tb.close()

    # ------------------------------------------------------------------ pictures

    def plot_curves(self, path: Path | None = None) -> Path | None:
        """Training reward (mean ± std) and every eval metric against epochs."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r for r in self.history if r["kind"] == "epoch" and r.get("reward_mean") is not None]
        evals = [r for r in self.history if r["kind"] == "eval"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        if epochs:
            x = np.array([r["epoch"] for r in epochs])
            m = np.array([r["reward_mean"] for r in epochs])
            s = np.array([r["reward_std"] for r in epochs])
            axes[0].plot(x, m, label="reward mean")
            axes[0].fill_between(x, m - s, m + s, alpha=0.2, label="± std")
        axes[0].set(xlabel="epoch", ylabel="training reward", title="reward")
        axes[0].legend(loc="lower right")
        names = sorted({k for r in evals for k in r if k not in ("kind", "epoch", "seconds", "step")})
        for name in names:
            pts = [(r["epoch"], r[name]) for r in evals if isinstance(r.get(name), (int, float))]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=name)
        axes[1].set(xlabel="epoch", title="evaluation (fixed prompts and seeds)")
        if names:
            axes[1].legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = path or self.out_dir / "reward_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def save_grid(self, images: torch.Tensor, rewards: torch.Tensor, prompts: list[str], path: Path,
                  rows: int, group: int, max_columns: int = 8) -> None:
        """One sampling unit per row: ``group`` consecutive images of one prompt (a pair: branch a |
        branch b; a Flow-GRPO group: its first ``max_columns`` images), each labelled with its reward,
        the best of the row marked "best"."""
        rows = min(rows, images.shape[0] // group)
        if not self.enabled or rows < 1:
            return
        cols = min(group, max_columns)
        r = [[float(rewards[i * group + c]) for c in range(cols)] for i in range(rows)]
        cells = [[images[i * group + c] for c in range(cols)] for i in range(rows)]
        captions = [[f"R={x:.3f}" + (" best" if x >= max(row) else "") for x in row] for row in r]
        headers = ["branch a", "branch b"] if group == 2 else [f"#{c + 1}" for c in range(cols)]
        image_grid(cells, [prompts[i * group] for i in range(rows)], headers, captions).save(path)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
