"""wandb and TensorBoard (stand-ins that record their calls; nothing reaches the network): scalars and
sample grids at their steps, the same wandb run after a resume, and the pictures of a run. (A tracker that
is not installed: tests/test_start_checks.py.)"""

from __future__ import annotations

import json
import random
import sys
import types

import numpy as np
import pytest
import torch

from fdfo.settings import build_config
from tests.test_train import tiny_run


class FakeRun:
    def __init__(self, step: int):
        self.step, self.logged, self.finished = step, [], False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


class FakeImage:
    def __init__(self, picture):
        self.size = picture.size


class FakeWriter:
    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step, self.scalars, self.images, self.closed = log_dir, purge_step, [], [], False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_image(self, tag: str, array: np.ndarray, step: int, dataformats: str) -> None:
        self.images.append((tag, array.shape, step, dataformats))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_trackers(monkeypatch):
    """Stand-ins for wandb and torch.utils.tensorboard: ``inits`` (wandb.init's keywords), ``runs`` and
    ``writers``, in order. A run resumed through wandb.init starts at step 3, as a wandb run that holds
    steps 0-2 would."""
    state = types.SimpleNamespace(inits=[], runs=[], writers=[])

    def init(**kwargs):
        state.inits.append(kwargs)
        state.runs.append(FakeRun(3 if any(k["id"] == kwargs["id"] for k in state.inits[:-1]) else 0))
        return state.runs[-1]

    def writer(log_dir, purge_step=None):
        state.writers.append(FakeWriter(log_dir, purge_step))
        return state.writers[-1]

    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = writer
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=FakeImage))
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return state


def logged_config(tmp_path, **log):
    return build_config({"name": "tracked", "log": {"out_dir": str(tmp_path), "wandb": True, "tensorboard": True,
                                                    "wandb_project": "proj", **log}})


def test_scalars_and_pictures_reach_both_trackers_at_their_steps(tmp_path, fake_trackers):
    from fdfo.report import RunReport

    report = RunReport(tmp_path, logged_config(tmp_path), enabled=True)
    report.log("step", {"epoch": 1, "step": 2, "loss": torch.tensor(0.5)}, step=2)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    report.save_grid(images, torch.tensor([0.1, 0.9, 0.4, 0.3]), ["one", "one", "two", "two"],
                     tmp_path / "pairs.png", rows=2, group=2, step=2)
    grid = report.eval_grid(["one", "two", "one"])
    grid.add([0, 1, 2], images[:3], torch.tensor([0.2, 0.3, 0.4]))
    report.save_eval_grid(grid, epoch=1, step=2)
    report.close()

    (init,) = fake_trackers.inits
    assert init["project"] == "proj" and init["name"] == "tracked" and init["resume"] == "allow"
    assert init["dir"] == str(tmp_path) and init["config"]["log"]["wandb"] is True
    assert (tmp_path / "wandb_id").read_text().strip() == init["id"]
    (run,) = fake_trackers.runs
    assert run.logged[0] == (2, {"step/epoch": 1, "step/step": 2, "step/loss": 0.5})
    pictures = {next(iter(values)): (step, values) for step, values in run.logged[1:]}
    assert set(pictures) == {"samples/pairs", "eval/samples"}
    assert all(step == 2 and isinstance(v[k], FakeImage) for k, (step, v) in pictures.items())
    assert run.finished

    (writer,) = fake_trackers.writers
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert ("step/loss", 0.5, 2) in writer.scalars
    shapes = {tag: (shape, step, fmt) for tag, shape, step, fmt in writer.images}
    from PIL import Image

    for tag, name in (("samples/pairs", "pairs.png"), ("eval/samples", "samples/eval_epoch_0001.png")):
        width, height = Image.open(tmp_path / name).size
        assert shapes[tag] == ((height, width, 3), 2, "HWC")


def test_a_resume_continues_the_same_wandb_run(tmp_path, fake_trackers):
    from fdfo.report import RunReport

    cfg = logged_config(tmp_path, tensorboard=False)
    RunReport(tmp_path, cfg, enabled=True).close()
    resumed = RunReport(tmp_path, cfg, enabled=True, resumed=True)
    first, second = fake_trackers.inits
    assert second["id"] == first["id"] and second["resume"] == "allow"
    # The steps the wandb run already holds (0-2) are repeats of a resumed run: not sent again.
    for step in (2, 3):
        resumed.log("epoch", {"epoch": step, "reward_mean": 0.5}, step=step)
    resumed.close()
    assert [step for step, _ in fake_trackers.runs[1].logged] == [3]
    # A new run in the directory (not a resume) is a new wandb run.
    RunReport(tmp_path, cfg, enabled=True).close()
    assert fake_trackers.inits[2]["id"] != first["id"]
    assert (tmp_path / "wandb_id").read_text().strip() == fake_trackers.inits[2]["id"]


def test_a_resume_purges_the_tensorboard_steps_past_its_checkpoint(tmp_path, fake_trackers):
    from fdfo.report import RunReport

    cfg = logged_config(tmp_path, wandb=False)
    first = RunReport(tmp_path, cfg, enabled=True)
    for step in range(1, 7):
        first.log("step", {"loss": 1.0 / step}, step=step)
    first.close()
    checkpoint_step = random.randint(1, 5)
    resumed = RunReport(tmp_path, cfg, enabled=True, resumed=True)
    resumed.resume([], epoch=1, step=checkpoint_step)
    resumed.log("step", {"loss": 0.25}, step=checkpoint_step + 1)
    resumed.close()
    assert [w.purge_step for w in fake_trackers.writers] == [None, checkpoint_step + 1]
    assert fake_trackers.writers[1].scalars == [("step/loss", 0.25, checkpoint_step + 1)]


def test_tensorboard_shows_each_step_of_a_resumed_run_once(tmp_path):
    """With the real TensorBoard: the steps an interrupted run logged past its checkpoint read back as the
    resumed run logged them, once each (the logging extra; skipped where it is not installed)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fdfo.report import RunReport

    cfg = logged_config(tmp_path, wandb=False)
    first = RunReport(tmp_path, cfg, enabled=True)
    for step in range(1, 9):
        first.log("step", {"loss": float(step)}, step=step)
    first.close()
    checkpoint_step = random.randint(2, 6)
    resumed = RunReport(tmp_path, cfg, enabled=True, resumed=True)
    resumed.resume([], epoch=1, step=checkpoint_step)
    for step in range(checkpoint_step + 1, 10):
        resumed.log("step", {"loss": -float(step)}, step=step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("step/loss")]
    assert got == [(s, float(s)) for s in range(1, checkpoint_step + 1)] + [
        (s, -float(s)) for s in range(checkpoint_step + 1, 10)]


def test_a_run_saves_its_pictures_and_sends_them_to_the_trackers(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                                  fake_trackers):
    """One epoch, shorter than log.plot_every: the base model's and the last evaluation's grids, the last
    epoch's pair grid and the reward curve all the same."""
    from PIL import Image

    from fdfo.trainer import Trainer

    run = tmp_path / "run"
    cfg = tiny_run(run, tiny_pipeline_dir, digit_reward_dir, train={"epochs": 1},
                   log={"plot_every": 5, "wandb": True, "tensorboard": True}, checkpoint={"every": 0})
    trainer = Trainer(cfg)
    trainer.run()
    steps = trainer.global_step
    for name in ("samples/eval_epoch_0000.png", "samples/eval_epoch_0001.png", "samples/epoch_0001.png",
                 "reward_curve.png"):
        assert Image.open(run / name).size[0] > 200, name
    images = [(tag, step) for tag, _, step, _ in fake_trackers.writers[0].images]
    assert images == [("eval/samples", 0), ("samples/pairs", steps), ("eval/samples", steps)]
    logged = [(step, key) for step, values in fake_trackers.runs[0].logged for key in values]
    assert (0, "eval/eval/digit_judge_accuracy") in logged and (steps, "epoch/reward_mean") in logged
    assert (0, "eval/samples") in logged and (steps, "samples/pairs") in logged


def test_a_resumed_run_tells_tensorboard_its_checkpoint_step(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                            fake_trackers):
    """Two epochs, then a resume from the first epoch's checkpoint in the same directory: TensorBoard purges
    from the step after that checkpoint's, and the resumed run logs nothing at or before it."""
    from fdfo.trainer import Trainer

    run = tmp_path / "run"
    cfg = tiny_run(run, tiny_pipeline_dir, digit_reward_dir, train={"epochs": 2}, log={"tensorboard": True},
                   checkpoint={"every": 1})
    first = Trainer(cfg)
    first.run()
    epoch_1_step = json.loads((run / "checkpoints" / "epoch_0001" / "trainer.json").read_text())["global_step"]
    assert 0 < epoch_1_step < first.global_step
    resumed = Trainer(cfg, resume=str(run / "checkpoints" / "epoch_0001"))
    resumed.run()
    writers = fake_trackers.writers
    assert [w.purge_step for w in writers] == [None, epoch_1_step + 1]
    assert min(step for _, _, step in writers[1].scalars) == epoch_1_step + 1
    assert max(step for _, _, step in writers[1].scalars) == first.global_step
