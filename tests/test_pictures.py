"""The run's pictures: the reward curve's panels and clipped bands, the evaluation grid's fixed cells, and
labels set in a font that keeps the spaces between words."""

from __future__ import annotations

import numpy as np
import torch

from fdfo.settings import build_config


def test_a_known_range_clips_the_band_and_an_unknown_one_leaves_it():
    from fdfo.plots import band
    from fdfo.rewards import weighted_range

    assert weighted_range({"digit_probability": 1.0}) == (0.0, 1.0)
    assert weighted_range({"pickscore": 1.0, "vlm_alignment": -0.1}) == (-110.0, 100.0)
    assert weighted_range({"pickscore": 1.0, "my.module:Reward": 1.0}) is None
    mean, std = np.array([0.1, 0.5, 0.95]), np.array([0.2, 0.1, 0.2])
    low, high = band(mean, std, (0.0, 1.0))
    np.testing.assert_allclose(low, [0.0, 0.4, 0.75])
    np.testing.assert_allclose(high, [0.3, 0.6, 1.0])
    low, high = band(mean, std, None)
    np.testing.assert_allclose(low, [-0.1, 0.4, 0.75])
    np.testing.assert_allclose(high, [0.3, 0.6, 1.15])


def test_the_reward_curve_has_a_panel_per_metric(tmp_path, monkeypatch):
    import matplotlib.figure

    from fdfo.plots import panels
    from fdfo.report import RunReport

    report = RunReport(tmp_path, build_config({}), enabled=True)
    report.log("eval", {"epoch": 0, "eval/reward": 20.0, "eval/pickscore": 20.0, "seconds": 1.0}, step=0)
    for epoch in (1, 2):
        report.log("epoch", {"epoch": epoch, "reward_mean": 20.0 + epoch, "reward_std": 1.0,
                             "reward/pickscore": 20.0, "reward/vlm_alignment": 50.0}, step=epoch)
    report.log("eval", {"epoch": 2, "eval/reward": 22.0, "eval/pickscore": 21.0, "eval/pixel_diversity": 0.2,
                        "seconds": 1.0}, step=2)
    expected = [("epoch", "reward_mean"), ("epoch", "reward/pickscore"), ("epoch", "reward/vlm_alignment"),
                ("eval", "eval/reward"), ("eval", "eval/pickscore"), ("eval", "eval/pixel_diversity")]
    assert panels(report.history) == expected
    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: titles.extend(ax.get_title() for ax in fig.axes if ax.axison))
    report.plot_curves()
    assert titles == ["training reward (mean ± std)", "reward/pickscore", "reward/vlm_alignment",
                      "eval/reward", "eval/pickscore", "eval/pixel_diversity"]
    monkeypatch.undo()
    assert report.plot_curves().is_file()
    report.close()


def test_the_drawn_band_of_a_probability_stays_in_0_1(tmp_path, monkeypatch):
    import matplotlib.figure

    from fdfo.report import RunReport

    report = RunReport(tmp_path, build_config({"reward": {"weights": {"digit_probability": 1.0}}}), enabled=True)
    for epoch, mean in ((1, 0.1), (2, 0.9)):
        report.log("epoch", {"epoch": epoch, "reward_mean": mean, "reward_std": 0.3}, step=epoch)
    edges = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: edges.extend(
        fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]))
    report.plot_curves()
    report.close()
    assert min(edges) == 0.0 and max(edges) == 1.0


def test_the_evaluation_grid_keeps_fixed_cells(tmp_path):
    from PIL import Image

    from fdfo.images import image_grid
    from fdfo.report import EvalGrid, RunReport

    prompts = ["one", "two", "three", "one", "two", "three", "one"]
    grid = EvalGrid(prompts, rows=2, columns=2)
    assert grid.prompts == ["one", "two"]
    assert grid.cells == {0: (0, 0), 1: (1, 0), 3: (0, 1), 4: (1, 1)}
    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid.add([0, 1, 2], images[:3], torch.tensor([0.5, 0.25, 1.0]))
    grid.add([3], images[3:4], torch.tensor([0.125]))  # image 4 never comes: its cell stays blank
    expected = image_grid([[images[0], images[3]], [images[1], None]], ["one", "two"], ["seed #1", "seed #2"],
                          [["R=0.500", "R=0.125"], ["R=0.250", ""]])
    report = RunReport(tmp_path, build_config({"log": {"grid_pairs": 2}}), enabled=True)
    path = report.save_eval_grid(grid, epoch=3, step=0)
    assert path == tmp_path / "samples" / "eval_epoch_0003.png"
    assert Image.open(path).tobytes() == expected.tobytes()
    assert report.eval_grid(prompts).prompts == ["one", "two"]
    report.close()
    for log in ({"plot_every": 0}, {"grid_pairs": 0}):  # no pictures, or no rows
        off = RunReport(tmp_path / "off", build_config({"log": log}), enabled=True)
        assert off.eval_grid(prompts) is None
        off.close()


def test_labels_keep_the_spaces_between_words():
    from PIL import Image, ImageDraw

    from fdfo.images import label_font

    font = label_font()
    assert font.getlength("a handwritten digit") > font.getlength("ahandwrittendigit") + 2 * font.getlength("i")

    def ink(text):
        canvas = Image.new("L", (200, 16), 255)
        ImageDraw.Draw(canvas).text((0, 0), text, fill=0, font=font)
        columns = (np.asarray(canvas) < 128).any(axis=0)
        return np.flatnonzero(columns)

    spaced, joined = ink("digit seven"), ink("digitseven")
    assert spaced[-1] - joined[-1] >= 2  # the space takes room
    assert len(np.setdiff1d(np.arange(spaced[0], spaced[-1]), spaced)) > len(
        np.setdiff1d(np.arange(joined[0], joined[-1]), joined))  # and leaves an empty gap
