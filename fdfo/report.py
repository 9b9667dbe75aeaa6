"""Run reporting: JSONL metrics, optional wandb/tensorboard, reward-curve and sample-grid PNGs.

Only rank 0 writes. Every line of metrics.jsonl is one JSON object with a
``kind`` of "step", "epoch" or "eval".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


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
                  pairs: int) -> Path | None:
        """Pairs side by side (branch a | branch b), each labelled with its reward, one pair per row."""
        if not self.enabled:
            return None
        from PIL import Image, ImageDraw

        pairs = min(pairs, images.shape[0] // 2)
        imgs = images[: 2 * pairs].float().clamp(0, 1)
        if imgs.shape[1] == 1:
            imgs = imgs.repeat(1, 3, 1, 1)
        h, w = imgs.shape[-2:]
        scale = max(1, math.ceil(96 / max(h, w)))  # upscale tiny images so that they can be seen
        cell_w, cell_h, label_h, text_w = w * scale, h * scale, 14, 220
        canvas = Image.new("RGB", (text_w + 2 * cell_w + 12, pairs * (cell_h + label_h + 6) + 4), "white")
        draw = ImageDraw.Draw(canvas)
        for i in range(pairs):
            y = 4 + i * (cell_h + label_h + 6)
            draw.text((4, y + cell_h // 2), prompts[2 * i][:36], fill="black")
            for b in range(2):
                arr = (imgs[2 * i + b].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
                tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
                x = text_w + b * (cell_w + 8)
                canvas.paste(tile, (x, y))
                r = float(rewards[2 * i + b])
                best = r >= float(rewards[2 * i + 1 - b])
                draw.text((x, y + cell_h + 1), f"R={r:.3f}", fill="green" if best else "gray")
        canvas.save(path)
        return path


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
