"""Progress a person can read: whole lines (no carriage-return frames) when output is not a terminal, counts
and the time left, the trainer's `epoch N/total` line, and the image counts of generation."""

from __future__ import annotations

import io
import random

import pytest
import torch

from fdfo import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (45, "45 s"), (61, "1 min 01 s"), (750, "12 min 30 s"),
                                           (7500, "2 h 05 min")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress.duration(seconds) == text


def test_the_time_left_is_the_rate_so_far():
    done, total = random.randint(1, 50), random.randint(60, 200)
    elapsed = random.uniform(5, 50)
    assert progress.eta(elapsed, done, total) == progress.duration(elapsed / done * (total - done))
    assert progress.eta(elapsed, 0, total) is None  # nothing done: no rate yet


def test_a_log_file_gets_whole_lines(monkeypatch):
    monkeypatch.delenv("FDFO_PROGRESS", raising=False)
    log = io.StringIO()  # not a terminal
    total = random.randint(5, 12)
    bar = progress.bar(total=total, desc="generate", unit="images", leave=True, every_s=0.0, stream=log)
    assert isinstance(bar, progress.Lines)
    for _ in range(total):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == total + 1  # one per update (every_s 0) and the final one
    assert lines[1].startswith(f"generate: 2/{total} images ({100 * 2 / total:.0f}%), ") and "left" in lines[1]
    assert lines[-1].startswith(f"generate: {total}/{total} images (100%)") and "left" not in lines[-1]


def test_lines_keep_quiet_between_intervals_and_iterate(monkeypatch):
    monkeypatch.delenv("FDFO_PROGRESS", raising=False)
    log = io.StringIO()
    items = list(range(random.randint(3, 9)))
    assert list(progress.bar(items, desc="steps", every_s=3600, stream=log)) == items
    assert log.getvalue() == ""  # a short task without leave: nothing
    bar = progress.bar(items, desc="steps", every_s=3600, leave=True, stream=log)
    bar.set_postfix(loss="0.123")
    assert list(bar) == items and log.getvalue() == f"steps: {len(items)}/{len(items)} (100%), 0 s, loss=0.123\n"


def test_a_terminal_gets_tqdm_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("FDFO_PROGRESS", raising=False)
    assert not isinstance(progress.bar(total=3, stream=Terminal()), progress.Lines)
    monkeypatch.setenv("FDFO_PROGRESS", "lines")
    assert isinstance(progress.bar(total=3, stream=Terminal()), progress.Lines)
    monkeypatch.setenv("FDFO_PROGRESS", "bar")
    assert not isinstance(progress.bar(total=3, stream=io.StringIO()), progress.Lines)
    assert list(progress.bar(range(4), enabled=False)) == [0, 1, 2, 3]  # off: still iterates


def test_the_epoch_line_counts_epochs_and_a_log_has_no_frames(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                               capsys, monkeypatch):
    from fdfo.trainer import Trainer

    monkeypatch.delenv("FDFO_PROGRESS", raising=False)
    from tests.test_train import QUIET, tiny_run

    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # every update a line, so that the frames would show
    cfg = tiny_run(tmp_path / "p", tiny_pipeline_dir, digit_reward_dir,
                   **dict(QUIET, log={"plot_every": 0, "progress": True}, train={"epochs": 3}))
    Trainer(cfg).run()
    err = capsys.readouterr()
    text = err.out + err.err
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if "epoch=" in line and "reward_mean=" in line]
    assert [line.split("epoch=")[1].split()[0] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert "left" in epochs[0] and "left" in epochs[1] and "left" not in epochs[2]


def test_generation_reports_its_image_count(capsys, monkeypatch):
    from fdfo import inference

    monkeypatch.delenv("FDFO_PROGRESS", raising=False)

    class Model:
        latent_shape = (4, 2, 2)
        device = torch.device("cpu")

        def sigmas(self, steps):
            return torch.linspace(1, 0, steps + 1)

        def encode(self, prompts):
            return None

        def velocity(self, x, t, cond, guidance, uncond):
            return torch.zeros_like(x)

        def decode(self, x0):
            return torch.rand(x0.shape[0], 3, 4, 4)

    monkeypatch.setattr(inference, "seed_latents", lambda model, seeds: torch.randn(len(seeds), 4, 2, 2))
    n = random.randint(3, 7)
    images = inference.generate_images(Model(), ["a"] * n, list(range(n)), steps=2, batch_size=2,
                                       show_progress="generate")
    assert images.shape[0] == n
    err = capsys.readouterr().err
    assert f"generate: {n}/{n} images (100%)" in err and "\r" not in err
