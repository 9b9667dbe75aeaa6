"""benchmarks/convergence.py on synthetic runs (metrics.jsonl written here, nothing trained): the grid,
the selection rule, images and seconds to reach the target, the seeds table."""

import json

import pytest

from benchmarks import convergence as cv

EPOCH_S = [3.0, 3.5, 4.0]  # epochs 1-3
EVAL_S = [1.0, 1.5, 2.0, 2.0]  # evaluations at epochs 0-3


def write_run(out, method, overrides, seed, accuracy, diversity, epochs=3):
    """A finished run as the script leaves it: metrics.jsonl (evaluation every epoch) and done.json."""
    run_dir = out / cv.run_dir_name(method, overrides, seed)
    run_dir.mkdir(parents=True)
    lines = []
    for e in range(epochs + 1):
        if e:
            lines.append({"kind": "epoch", "epoch": e, "reward_mean": accuracy[e] - 0.1, "reward_std": 0.1,
                          "images_sampled": 128 * e, "epoch_s": EPOCH_S[e - 1]})
        lines.append({"kind": "eval", "epoch": e, "eval/reward": accuracy[e] - 0.2,
                      "eval/digit_judge_accuracy": accuracy[e], "eval/pixel_diversity": diversity[e],
                      "seconds": EVAL_S[e]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cmd = cv.command(method, overrides, seed, epochs, run_dir, [])
    (run_dir / "done.json").write_text(json.dumps({"seconds": 1.0, "cmd": cmd}))
    return run_dir


def sweep_runs(out):
    fdfo_ok = write_run(out, "fdfo", {"train.learning_rate": "0.001"}, 0,
                        [0.70, 0.80, 0.92, 0.93], [0.20, 0.19, 0.18, 0.17])  # diversity 0.85 × base
    write_run(out, "fdfo", {"train.learning_rate": "0.003"}, 0,  # the most accurate, but collapsed
              [0.70, 0.90, 0.97, 0.99], [0.20, 0.10, 0.05, 0.02])
    write_run(out, "flow_grpo", {"flow_grpo.clip_range": "0.001"}, 0, [0.70, 0.75, 0.80, 0.85], [0.20] * 4)
    write_run(out, "flow_grpo", {"flow_grpo.clip_range": "0.01"}, 0, [0.70, 0.72, 0.74, 0.76], [0.20, 0.2, 0.19, 0.18])
    return fdfo_ok


def test_grid_plan_names_and_values():
    runs = cv.plan(["fdfo", "flow_grpo"], ["fdfo:train.learning_rate=3e-4,1e-3", "fdfo:fdfo.clip_range=0.03,0.1,0.3",
                                           "flow_grpo:flow_grpo.clip_range=1e-4,1e-2", "eval.every=1"],
                   ["flow_grpo:train.learning_rate=3e-3"], [0, 1])
    fdfo = [r for r in runs if r[0] == "fdfo"]
    grpo = [r for r in runs if r[0] == "flow_grpo"]
    assert len(fdfo) == 2 * 3 * 2 and len(grpo) == 2 * 2  # cartesian product per method, times seeds
    assert grpo[0][1] == {"eval.every": "1", "flow_grpo.clip_range": "0.0001", "train.learning_rate": "0.003"}
    names = {cv.run_dir_name(*r) for r in runs}
    assert len(names) == len(runs)  # one directory per run
    assert "fdfo__eval.every=1__fdfo.clip_range=0.03__train.learning_rate=0.0003__seed1" in names
    # 1e-3 and 0.001 are the same setting, hence the same directory.
    assert cv.plan(["fdfo"], ["fdfo:train.learning_rate=1e-3"], [], [0]) == \
        cv.plan(["fdfo"], [], ["fdfo:train.learning_rate=0.001"], [0])
    cmd = cv.command("fdfo", grpo[0][1], 0, 5, cv.ROOT / "x", [])
    assert cmd[cmd.index("--flow_grpo.clip_range") + 1] == "0.0001"
    for bad in (["fdfo:lr=1"], ["sd3:train.seed=1"], ["fdfo:train.seed="]):
        with pytest.raises(SystemExit):
            cv.plan(["fdfo"], bad, [], [0])
    with pytest.raises(SystemExit, match="both"):
        cv.plan(["fdfo"], ["train.seed=1,2"], ["fdfo:train.seed=3"], [0])


def test_reach_and_seconds_by_hand(tmp_path):
    run_dir = sweep_runs(tmp_path)
    result = cv.load(run_dir, "fdfo", {"train.learning_rate": "0.001"}, 0)
    hit = cv.reach(result, 0.9)
    # First evaluation at ≥ 0.9: epoch 2, after 256 images; seconds = base evaluation 1.0 + epoch 1 3.0 +
    # its evaluation 1.5 + epoch 2 3.5 + its evaluation 2.0.
    assert hit["epoch"] == 2 and hit["images"] == 256 and hit["seconds"] == pytest.approx(11.0)
    assert cv.reach(result, 0.95) is None
    assert cv.accuracy_at(result, 300) == 0.92 and cv.accuracy_at(result, 384) == 0.93
    assert cv.diversity_ratio(result) == pytest.approx(0.85)


def test_select_skips_the_collapsed_setting(tmp_path, capsys):
    sweep_runs(tmp_path)
    cv.main(["--out", str(tmp_path), "--epochs", "3", "--select", "--grid",
             "fdfo:train.learning_rate=1e-3,3e-3", "flow_grpo:flow_grpo.clip_range=1e-3,1e-2"])
    text = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| fdfo") or
            line.startswith("| flow_grpo")}
    assert "collapsed" in rows["train.learning_rate=0.003"] and "selected" not in rows["train.learning_rate=0.003"]
    assert "**selected**" in rows["train.learning_rate=0.001"]
    assert "**selected**" in rows["flow_grpo.clip_range=0.001"] and "selected" not in rows["flow_grpo.clip_range=0.01"]
    assert "| 256 | 11 |" in rows["train.learning_rate=0.001"]  # images and seconds to reach 90%
    assert "| never | never |" in rows["flow_grpo.clip_range=0.001"]
    assert (f"seeds run: python benchmarks/convergence.py --epochs 3 --seeds 0 1 2 --out {tmp_path} --set "
            "fdfo:train.learning_rate=0.001 flow_grpo:flow_grpo.clip_range=0.001") in text
    assert (tmp_path / "convergence.png").is_file()
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4


def test_seeds_table(tmp_path, capsys):
    sweep_runs(tmp_path)
    write_run(tmp_path, "fdfo", {"train.learning_rate": "0.001"}, 1, [0.70, 0.85, 0.88, 0.95],
              [0.20, 0.20, 0.19, 0.19])
    cv.main(["--out", str(tmp_path), "--epochs", "3", "--methods", "fdfo", "--seeds", "0", "1",
             "--set", "fdfo:train.learning_rate=0.001", "--at-images", "256"])
    text = capsys.readouterr().out
    assert "judge acc after 256 images" in text
    row = next(line for line in text.splitlines() if line.startswith("| fdfo"))
    # after 256 images: 0.92 and 0.88; reach 90%: epoch 2 (256 images, 11 s) and epoch 3 (384 images,
    # 11 + 4.0 + 2.0 = 17 s); final diversity 0.85 and 0.95 of the base's.
    assert row.split(" | ")[2:] == ["0, 1", "0.700 ± 0.000", "0.900 ± 0.028", "256, 384", "11, 17", "0.90 ± 0.07",
                                    "0.740 ± 0.014 |"]


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    sweep_runs(tmp_path)
    with pytest.raises(SystemExit, match="other settings"):
        cv.main(["--out", str(tmp_path), "--epochs", "5", "--methods", "fdfo", "--seeds", "0",
                 "--set", "fdfo:train.learning_rate=0.001"])
