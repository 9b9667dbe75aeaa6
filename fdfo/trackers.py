"""Weights & Biases and TensorBoard: a run's scalars and pictures, each at the step it belongs to.

    log.wandb: true        a wandb run in project log.wandb_project, named after the run; its files under
                           <out_dir>/wandb (WANDB_MODE=offline keeps it there for ``wandb sync`` later)
    log.tensorboard: true  event files in <out_dir>/tensorboard

Both need the ``logging`` extra. ``check_installed`` answers a missing one in one line before the run
directory or any model is touched (``fdfo.run_dir.plan`` calls it).

A wandb run's id is kept in the run directory (``wandb_id``) when it starts, and a resumed run passes
it back, so the resumed epochs continue the same wandb run. The records a resume repeats (the epochs
after its checkpoint that the interrupted run had already logged; they repeat exactly) are not sent
again: wandb takes only steps past the ones it holds, and TensorBoard is told to purge the steps past
the checkpoint's (``purge_step``), so its curves show each step once, as the resumed run logged it.
"""

from __future__ import annotations

import importlib.util
import secrets
import sys
from pathlib import Path

import numpy as np

from fdfo import atomic
from fdfo.errors import ConfigError

EXTRA = 'pip install -e ".[logging]"'
WANDB_ID_FILE = "wandb_id"
# log.<key> -> the module it needs
MODULES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def check_installed(log) -> None:
    """One line naming the extra to install when ``log`` (the LogConfig) asks for a tracker that is missing."""
    missing = [key for key, module in MODULES.items() if getattr(log, key) and not _installed(module)]
    if missing:
        why = " and ".join(f"log.{key} is true but {MODULES[key]} is not installed" for key in missing)
        keys = " and ".join(f"log.{key}" for key in missing)
        raise ConfigError(f"{why}: install the logging extra ({EXTRA}) or set {keys} to false")


def _installed(module: str) -> bool:
    if module in sys.modules:  # (already imported; None: blocked)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


class Trackers:
    """The trackers ``cfg.log`` asks for, started in ``out_dir``; ``resumed``: continue the run whose
    wandb id the directory holds."""

    def __init__(self, out_dir: Path, cfg, resumed: bool):
        self._wandb = self._run = self._tb = None
        self._tb_dir = Path(out_dir) / "tensorboard" if cfg.log.tensorboard else None
        self._tb_purge: int | None = None  # a resumed run's first step: TensorBoard hides what lies past it
        self._wandb_from = 0  # the first step wandb takes (past the steps a resumed wandb run holds)
        if cfg.log.wandb:
            import wandb

            id_file = Path(out_dir) / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
            if not run_id:
                run_id = secrets.token_hex(6)
                atomic.write_text(id_file, run_id + "\n")
            self._wandb = wandb
            self._run = wandb.init(project=cfg.log.wandb_project, name=cfg.name, config=cfg.to_dict(),
                                   dir=str(out_dir), id=run_id, resume="allow")
            self._wandb_from = int(getattr(self._run, "step", 0) or 0) if resumed else 0

    def resume(self, step: int) -> None:
        """The run goes on from a checkpoint taken at global step ``step``: what the interrupted run logged
        after it is logged again, so TensorBoard purges the steps from ``step + 1`` on (the event file is
        opened on the first record, with that purge step)."""
        assert self._tb is None, "resume() comes before anything is logged (the event file opens with the purge)"
        self._tb_purge = step + 1

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir), purge_step=self._tb_purge)
        return self._tb

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._run is not None and step >= self._wandb_from:
            self._run.log(values, step=step)
        if (writer := self._writer()) is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    def picture(self, tag: str, picture, step: int) -> None:
        """A PIL image under ``tag``."""
        if self._run is not None and step >= self._wandb_from:
            self._run.log({tag: self._wandb.Image(picture)}, step=step)
        if (writer := self._writer()) is not None:
            writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
        if self._tb is not None:
            self._tb.close()
