"""The generate and evaluate commands end to end on a tiny SD3 pipeline with a trained-looking LoRA checkpoint
(laid out as the trainer writes it), digit metrics, a tiny CLIP for CLIP score and diversity, and two ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.settings import build_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit three"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_dir, digit_reward_dir):
    """runs/<name>/checkpoints/epoch_0001/{adapter/, trainer.json} + latest, like fdfo.checkpoint writes them."""
    from fdfo.models import SD3FlowModel

    model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=16)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=g)
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / "epoch_0001"
    model.save_lora(ckpt / "adapter")
    cfg = build_config({
        "model": {"path": str(tiny_pipeline_dir), "resolution": 16, "max_sequence_length": 16},
        "sampling": {"steps": 4},
        "reward": {"weights": {"digit_probability": 1.0}, "paths": {"digit_probability": str(digit_reward_dir),
                                                                   "digit_judge_accuracy": str(digit_reward_dir)}},
        "eval": {"metrics": ["digit_judge_accuracy"]},
    })
    (ckpt / "trainer.json").write_text(json.dumps({"epoch": 1, "global_step": 4, "config": cfg.to_dict()}))
    (run / "checkpoints" / "latest").write_text("epoch_0001")
    return run


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from fdfo.rewards.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "digits.txt"
    path.write_text("# three digit prompts\n" + "\n".join(DIGITS) + "\n")
    return path


def test_generate_grid_files_and_reproducible_seeds(run_dir, tiny_pipeline_dir, tmp_path):
    from PIL import Image

    from fdfo.generate import main

    out = tmp_path / "gen"
    assert main(["--adapter", str(run_dir), "--prompt", *DIGITS[:2], "--seeds", "0", "5", "--batch-size", "3",
                 "--out", str(out)]) == 0
    info = json.loads((out / "generation.json").read_text())
    assert info["model"] == str(tiny_pipeline_dir) and info["steps"] == 4 and info["resolution"] == [16, 16]
    assert info["adapter"].endswith("epoch_0001/adapter")
    assert [(f["prompt"], f["seed"]) for f in info["images"]] == [(p, s) for p in DIGITS[:2] for s in (0, 5)]
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == ["p0000_s0.png", "p0000_s5.png", "p0001_s0.png", "p0001_s5.png"]
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 96 and grid.height > 2 * 96

    # The same (prompt, seed) gives the same image alone, from a prompt file, with another batch size.
    single = tmp_path / "single"
    prompts = tmp_path / "p.txt"
    prompts.write_text(DIGITS[1] + "\n")
    assert main(["--adapter", str(run_dir / "checkpoints" / "epoch_0001"), "--prompts", str(prompts),
                 "--seeds", "5", "--batch-size", "1", "--out", str(single)]) == 0
    a = Image.open(out / "images" / "p0001_s5.png").tobytes()
    assert Image.open(single / "images" / "p0000_s5.png").tobytes() == a

    # Without the adapter (base model only) the image differs: the checkpoint was applied.
    base = tmp_path / "base"
    assert main(["--model", str(tiny_pipeline_dir), "--prompt", DIGITS[1], "--seeds", "5", "--steps", "4",
                 "--resolution", "16", "--max-sequence-length", "16", "--out", str(base)]) == 0
    assert Image.open(base / "images" / "p0000_s5.png").tobytes() != a


def test_training_sample_grid_is_the_generate_grid(tmp_path):
    """The trainer's sample grid (RunReport.save_grid) is drawn by the image_grid generate uses: same pixels."""
    from PIL import Image

    from fdfo.images import image_grid
    from fdfo.report import RunReport

    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.2, 0.7, 0.5, 0.5, 0.9, 0.1])
    prompts = [p for p in DIGITS for _ in range(2)]
    report = RunReport(tmp_path, build_config({}), enabled=True)
    report.save_grid(images, rewards, prompts, tmp_path / "grid.png", rows=8, group=2)
    expected = image_grid([[images[0], images[1]], [images[2], images[3]], [images[4], images[5]]], DIGITS,
                          ["branch a", "branch b"], [["R=0.200", "R=0.700 best"], ["R=0.500 best", "R=0.500 best"],
                                                     ["R=0.900 best", "R=0.100"]])
    assert Image.open(tmp_path / "grid.png").tobytes() == expected.tobytes()
    # Flow-GRPO: one group of 3 per row, at most 2 shown; the best of the shown ones is marked.
    report.save_grid(images, rewards, [p for p in DIGITS[:2] for _ in range(3)], tmp_path / "groups.png", rows=8,
                     group=3, max_columns=2)
    expected = image_grid([[images[0], images[1]], [images[3], images[4]]], DIGITS[:2], ["#1", "#2"],
                          [["R=0.200", "R=0.700 best"], ["R=0.500", "R=0.900 best"]])
    assert Image.open(tmp_path / "groups.png").tobytes() == expected.tobytes()
    report.save_grid(images[:1], rewards[:1], prompts[:1], tmp_path / "none.png", rows=8, group=2)
    assert not (tmp_path / "none.png").exists()  # not even one whole pair
    report.close()


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    from fdfo.generate import main

    assert main(["--adapter", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def evaluate_args(run_dir, prompt_file, clip_dir, digit_reward_dir, out):
    return ["--adapter", str(run_dir), "--prompts", str(prompt_file), "--repeats", "2", "--batch-size", "4",
            "--metrics", "digit_probability", "digit_judge_accuracy", "clip_score", "hpsv2", "clip_diversity",
            "dreamsim_diversity", "--path", f"clip_score={clip_dir}", f"clip_diversity={clip_dir}",
            "--report-prompts", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def single_process_results(run_dir, prompt_file, clip_dir, digit_reward_dir, tmp_path_factory):
    from fdfo.evaluate import main

    out = tmp_path_factory.mktemp("eval1")
    assert main(evaluate_args(run_dir, prompt_file, clip_dir, digit_reward_dir, out)) == 0
    return out


def test_evaluate_results_json_and_report(single_process_results):
    out = single_process_results
    res = json.loads((out / "results.json").read_text())
    assert res["prompts"] == 3 and res["repeats"] == 2 and res["seeds"] == [0, 1] and res["world_size"] == 1
    assert set(res["metrics"]) == {"digit_probability", "digit_judge_accuracy", "clip_score", "clip_diversity"}
    assert res["notes"]["hpsv2"].startswith("not available")
    assert res["notes"]["dreamsim_diversity"].startswith("not available: no weights given")
    assert "CLIP image embeddings" in res["notes"]["clip_diversity"]
    for name, entry in res["metrics"].items():
        assert set(entry) == {"base", "checkpoint", "delta"}
        assert entry["delta"] == pytest.approx(entry["checkpoint"] - entry["base"])
    for v in ("base", "checkpoint"):
        assert 0 <= res["metrics"]["digit_judge_accuracy"][v] <= 1
        assert 0 <= res["metrics"]["clip_score"][v] <= 100
        assert 0 <= res["metrics"]["clip_diversity"][v] <= 2
        # Equal repeats per prompt: the overall mean is the mean of the per-prompt means.
        for name in res["metrics"]:
            per = [row[v][name] for row in res["per_prompt"]]
            assert res["metrics"][name][v] == pytest.approx(sum(per) / len(per), abs=1e-6)
    assert [row["prompt"] for row in res["per_prompt"]] == DIGITS
    assert res["metrics"]["clip_diversity"]["base"] > 0  # two seeds give two different images
    assert (out / "report.png").is_file()
    html = (out / "report.html").read_text()
    assert "a handwritten digit one" in html and "images/checkpoint/p0001_s1.png" in html
    assert sorted(p.name for p in (out / "images" / "base").iterdir()) == [
        "p0000_s0.png", "p0000_s1.png", "p0001_s0.png", "p0001_s1.png"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_on_two_ranks_matches_one_process(single_process_results, run_dir, prompt_file, clip_dir,
                                                   digit_reward_dir, tmp_path):
    out = tmp_path / "eval2"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fdfo.evaluate", *evaluate_args(run_dir, prompt_file, clip_dir,
                                                                     digit_reward_dir, out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    one = json.loads((single_process_results / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["world_size"] == 2
    for name, entry in one["metrics"].items():
        for v, value in entry.items():
            assert two["metrics"][name][v] == pytest.approx(value, abs=1e-4), (name, v)
    for a, b in zip(one["per_prompt"], two["per_prompt"]):
        for v in ("base", "checkpoint"):
            assert b[v] == pytest.approx(a[v], abs=1e-4)


def test_builtin_digits_model_generate_and_evaluate(tmp_path, digit_reward_dir):
    """`--model builtin:digits` end to end: the cached built-in base (here an untrained one, put where
    the digits task caches it, so no minutes of pretraining) and the built-in digit metrics."""
    from PIL import Image

    from fdfo import evaluate, generate, tasks
    from tests.conftest import install_untrained_digits

    install_untrained_digits(tasks.cache_root(), digit_reward_dir, tmp_path / "adapter")

    assert generate.main(["--model", "builtin:digits", "--adapter", str(tmp_path / "adapter"), "--prompts",
                          "builtin:digits", "--seeds", "0", "1", "--out", str(tmp_path / "gen")]) == 0
    info = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert len(info["images"]) == 20 and info["steps"] == 10 and info["resolution"] == [16, 16]
    assert Image.open(tmp_path / "gen" / "images" / "p0009_s1.png").mode == "L"  # one grey channel

    out = tmp_path / "eval"
    assert evaluate.main(["--model", "builtin:digits", "--adapter", str(tmp_path / "adapter"), "--prompts",
                          "builtin:digits", "--metrics", "digit_probability", "digit_judge_accuracy",
                          "--repeats", "1", "--reward-device", "cpu", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["prompts"] == 10 and res["steps"] == 10
    for entry in res["metrics"].values():
        assert 0 <= entry["base"] <= 1 and 0 <= entry["checkpoint"] <= 1
    assert (out / "report.png").is_file() and (out / "report.html").is_file()


def test_evaluate_scores_a_run_trained_on_an_outside_reward(run_dir, prompt_file, tmp_path):
    """A run whose reward.weights names a reward of the user's own (module.path:Name) is evaluated on it by
    default: the metric is that reward's score of each saved image (recomputed here from the PNGs)."""
    import shutil

    import numpy as np
    from PIL import Image

    from fdfo.evaluate import main
    from tests.test_reward_plugins import SPEC

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state_file = run / "checkpoints" / "epoch_0001" / "trainer.json"
    state = json.loads(state_file.read_text())
    state["config"]["reward"]["weights"] = {SPEC: 1.0}
    state["config"]["eval"]["metrics"] = []
    state_file.write_text(json.dumps(state))
    out = tmp_path / "eval"
    assert main(["--adapter", str(run), "--prompts", str(prompt_file), "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["metrics"]) == [SPEC]
    for variant in ("base", "checkpoint"):
        # Brightness: the image's mean value plus 0.01 per prompt character (PNGs hold it to 1/255).
        want = [float(np.asarray(Image.open(out / "images" / variant / f"p{i:04d}_s0.png"), dtype=np.float64).mean())
                / 255 + len(p) / 100 for i, p in enumerate(DIGITS)]
        assert res["metrics"][SPEC][variant] == pytest.approx(sum(want) / len(want), abs=2 / 255)
    assert res["metrics"][SPEC]["base"] != res["metrics"][SPEC]["checkpoint"]


def test_an_outside_metric_that_does_not_import_is_refused_before_loading(run_dir, prompt_file, tmp_path, capsys):
    from fdfo.evaluate import main

    assert main(["--adapter", str(run_dir), "--prompts", str(prompt_file), "--metrics", "no_such_module:Reward",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "module 'no_such_module' does not import" in err and "PYTHONPATH" in err
