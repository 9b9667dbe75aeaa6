"""Run reporting: JSONL metrics, optional wandb/tensorboard, reward-curve and sample-grid PNGs.

Only rank 0 writes. Every line of metrics.jsonl is one JSON object with a
``kind`` of "step", "epoch" or "eval". The trackers (``fdfo.trackers``) get the numbers of
every record and the sample grids as pictures, at the step each belongs to:

    samples/epoch_XXXX.png       the epoch's pairs (or groups) with their rewards ("samples/pairs")
    samples/eval_epoch_XXXX.png  an evaluation's fixed prompts and seeds ("eval/samples"; 0000: the base model)
    reward_curve.png             one panel per metric (``fdfo.plots``)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from fdfo import distributed, plots
from fdfo.images import image_grid, quantize
from fdfo.rewards import weighted_range
from fdfo.trackers import Trackers

GRID_COLUMNS = 8  # images a row of a sample grid, at most


class RunReport:
    def __init__(self, out_dir: Path, cfg, enabled: bool, resumed: bool = False):
        """``resumed``: a run continued from a checkpoint (metrics.jsonl and the wandb run go on)."""
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.history: list[dict] = []
        self.grid_rows = cfg.log.grid_pairs if cfg.log.plot_every else 0  # rows of a sample grid; 0: none
        self._reward_range = weighted_range(cfg.reward.weights)  # the reward curve's band stays inside it
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self._file = open(self.out_dir / "metrics.jsonl", "a" if resumed else "w")
        self._trackers = Trackers(self.out_dir, cfg, resumed)

    def resume(self, history: list[dict], epoch: int, step: int) -> None:
        """Continue a run from a checkpoint of ``epoch`` taken at global step ``step``: its history, and
        metrics.jsonl without the lines of later epochs (which the resumed run writes again), so the log
        has no duplicates; the trackers likewise keep nothing past ``step`` twice."""
        self.history = list(history)
        if not self.enabled:
            return
        self._trackers.resume(step)
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
        self._trackers.scalars(numeric, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._trackers.close()

    # ------------------------------------------------------------------ pictures

    def plot_curves(self, path: Path | None = None) -> Path | None:
        """The reward curve: training reward (mean ± std) and every eval metric against epochs, a panel each."""
        if not self.enabled:
            return None
        return plots.plot_curves(self.history, self._reward_range, path or self.out_dir / "reward_curve.png")

    def save_grid(self, images: torch.Tensor, rewards: torch.Tensor, prompts: list[str], path: Path,
                  rows: int, group: int, max_columns: int = GRID_COLUMNS, step: int = 0) -> None:
        """One sampling unit per row: ``group`` consecutive images of one prompt (a pair: branch a |
        branch b; a Flow-GRPO group: its first ``max_columns`` images), each labelled with its reward,
        the best of the row marked "best". Saved to ``path`` and sent to the trackers at ``step``."""
        rows = min(rows, images.shape[0] // group)
        if not self.enabled or rows < 1:
            return
        cols = min(group, max_columns)
        r = [[float(rewards[i * group + c]) for c in range(cols)] for i in range(rows)]
        cells = [[images[i * group + c] for c in range(cols)] for i in range(rows)]
        captions = [[f"R={x:.3f}" + (" best" if x >= max(row) else "") for x in row] for row in r]
        headers = ["branch a", "branch b"] if group == 2 else [f"#{c + 1}" for c in range(cols)]
        picture = image_grid(cells, [prompts[i * group] for i in range(rows)], headers, captions)
        picture.save(path)
        self._trackers.picture("samples/pairs", picture, step)

    def eval_grid(self, prompts: list[str]) -> EvalGrid | None:
        """The grid of an evaluation whose images have ``prompts`` (all of them, over every rank); None
        where no grid is written (log.plot_every or log.grid_pairs 0). The same on every rank: each adds
        the images it draws."""
        return EvalGrid(prompts, self.grid_rows) if self.grid_rows else None

    def save_eval_grid(self, grid: EvalGrid, epoch: int, step: int) -> Path | None:
        """``samples/eval_epoch_XXXX.png`` of the evaluation after ``epoch`` (0: the base model), also sent
        to the trackers at ``step``. Every rank calls it: the cells come together on rank 0, which writes
        the picture and returns its path (None elsewhere)."""
        parts = distributed.gather_to_rank0(grid.images)
        if not self.enabled or parts is None:
            return None
        for images in parts:
            grid.images.update(images)
        path = self.out_dir / "samples" / f"eval_epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = grid.draw()
        picture.save(path)
        self._trackers.picture("eval/samples", picture, step)
        return path


class EvalGrid:
    """An evaluation's picture, the same cells at every evaluation so that epochs compare by eye: a row
    per prompt (the first ``rows`` distinct prompts, in the evaluation's order), its images left to right
    in that order (each with its fixed seed; ``columns`` at most), each labelled with its reward.

    ``prompts``: those of all the evaluation's images, in order. ``add`` keeps the images that have a
    cell, on the CPU as 8-bit pixels (what the picture shows), so that gathering a grid's cells from the
    ranks that drew them moves little."""

    def __init__(self, prompts: list[str], rows: int, columns: int = GRID_COLUMNS):
        self.prompts = list(dict.fromkeys(prompts))[:rows]
        row_of = {q: r for r, q in enumerate(self.prompts)}
        filled = [0] * len(self.prompts)
        self.cells: dict[int, tuple[int, int]] = {}  # image index -> (row, column)
        for i, q in enumerate(prompts):
            if q in row_of and filled[row_of[q]] < columns:
                self.cells[i] = (row_of[q], filled[row_of[q]])
                filled[row_of[q]] += 1
        self.columns = max(filled, default=0)
        self.images: dict[int, tuple[torch.Tensor, float]] = {}  # image index -> (uint8 [C, H, W], reward)

    def add(self, indices: list[int], images: torch.Tensor, rewards: torch.Tensor) -> None:
        """Images [B, C, H, W] in [0, 1] of the evaluation's images ``indices``, with their rewards [B]."""
        for k, i in enumerate(indices):
            if i in self.cells:
                self.images[i] = (quantize(images[k]).cpu(), float(rewards[k]))

    def draw(self):
        """The grid as a PIL image (a cell whose image was not added stays blank)."""
        cells = [[None] * self.columns for _ in self.prompts]
        captions = [[""] * self.columns for _ in self.prompts]
        for i, (image, reward) in self.images.items():
            r, c = self.cells[i]
            cells[r][c], captions[r][c] = image, f"R={reward:.3f}"
        return image_grid(cells, self.prompts, [f"seed #{c + 1}" for c in range(self.columns)], captions)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v
