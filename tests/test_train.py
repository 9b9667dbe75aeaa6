"""End-to-end training of a tiny SD3 pipeline loaded with from_pretrained: epochs, checkpoints,
exact resume, adapter export, bad input."""

import json
import math
import random
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo.settings import build_config, with_overrides
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(out_dir, pipeline_dir, reward_dir, **sections):
    overrides = {
        "name": "tiny",
        "model": {"path": str(pipeline_dir), "resolution": 16, "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8.0},
        "sampling": {"steps": 4, "micro_batch_pairs": 2},
        "train": {"epochs": 2, "micro_batch_rows": 4, "learning_rate": 1e-3},
        "data": {"prompts": "builtin:digits"},
        "reward": {"weights": {"digit_probability": 1.0}},
        "eval": {"every": 1, "num_images": 6, "metrics": ["digit_judge_accuracy"]},
        "log": {"out_dir": str(out_dir), "plot_every": 1, "grid_pairs": 2, "progress": False},
        "checkpoint": {"every": 1},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    names = set(overrides["reward"]["weights"]) | set(overrides["eval"]["metrics"])
    overrides["reward"].setdefault("paths", {n: str(reward_dir) for n in names if n.startswith("digit_")})
    # FDFO's epoch, as the test job's defaults: a run that picks Flow-GRPO leaves them unread.
    return build_config(overrides, under={"fdfo": {"pairs_per_epoch": 4, "optimizer_steps_per_epoch": 2}})


# Sections for a run that only trains: no evaluation, plots, progress bars or checkpoints.
QUIET = dict(eval={"every": 0, "metrics": []}, log={"plot_every": 0, "progress": False}, checkpoint={"every": 0})


def lora_weights(trainer):
    return {k: v.clone() for k, v in trainer.model.lora_state_dict().items()}


KEYS = ("reward_mean", "reward_std", "policy_loss", "clipfrac", "ratio", "loss", "grad_norm")


def test_two_epochs_checkpoint_exact_resume_and_adapter(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from diffusers import StableDiffusion3Pipeline

    from fdfo.trainer import Trainer

    a = Trainer(tiny_run(tmp_path / "a", tiny_pipeline_dir, digit_reward_dir))
    start = lora_weights(a)
    history = a.run()
    final_a = lora_weights(a)
    assert any(not torch.equal(start[k], final_a[k]) for k in start), "training did not change the adapter"

    run = tmp_path / "a"
    epochs = [r for r in history if r["kind"] == "epoch"]
    evals = [r for r in history if r["kind"] == "eval"]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["epoch"] for r in evals] == [0, 1, 2]
    assert all(0 <= r["eval/digit_judge_accuracy"] <= 1 for r in evals)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "step" for r in lines) == 4  # 2 optimizer steps x 2 epochs
    epoch_lines = [r for r in lines if r["kind"] == "epoch"]
    assert len(epoch_lines) == 2
    assert all(r["pairs_per_s"] > 0 and math.isfinite(r["policy_loss"]) for r in epoch_lines)
    assert (run / "reward_curve.png").is_file() and (run / "samples" / "epoch_0002.png").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "epoch_0002"
    assert not list((run / "checkpoints").glob("*.tmp"))

    # Resume from epoch 1 into a new directory: epoch 2 must repeat exactly.
    b = Trainer(tiny_run(tmp_path / "b", tiny_pipeline_dir, digit_reward_dir),
                resume=str(run / "checkpoints" / "epoch_0001"))
    assert b.epoch == 1
    history_b = b.run()
    final_b = lora_weights(b)
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], rtol=0, atol=0)
    ep2_a = next(r for r in history if r["kind"] == "epoch" and r["epoch"] == 2)
    ep2_b = next(r for r in history_b if r["kind"] == "epoch" and r["epoch"] == 2)
    for k in KEYS:
        assert ep2_a[k] == ep2_b[k], k

    # The exported adapter loads into a stock diffusers pipeline and reproduces the trained transformer.
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_pipeline_dir))
    pipe.load_lora_weights(str(run / "checkpoints" / "epoch_0002" / "adapter"))
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, *b.model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = b.model.encode(["a handwritten digit one", "a handwritten digit two"])
    with torch.no_grad():
        expected = b.model.velocity(x, sigma, cond)
        got = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                               pooled_projections=cond.pooled, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_nan_rewards_skip_the_batch_and_checkpoints_stay_finite(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                               monkeypatch):
    from fdfo import rewards
    from fdfo.trainer import Trainer, TrainingError

    def nan_reward(path, cache_dir, device, **options):
        def score(prompts, images):
            out = torch.rand(len(prompts))
            out[1] = float("nan")
            return out
        return score

    monkeypatch.setitem(rewards.REGISTRY, "nan_reward", nan_reward)
    cfg = tiny_run(tmp_path / "n", tiny_pipeline_dir, digit_reward_dir, train={"epochs": 1},
                   reward={"weights": {"nan_reward": 1.0}, "paths": {}}, eval={"every": 0, "metrics": []})
    t = Trainer(cfg)
    before = lora_weights(t)
    with pytest.warns(UserWarning, match="non-finite reward"), pytest.raises(TrainingError, match="skipped"):
        t.run()  # its only epoch was skipped: the run reports that it trained nothing
    (epoch,) = [r for r in t.report.history if r["kind"] == "epoch"]
    assert epoch["skipped"] is True and epoch["nonfinite_rewards"] == 1
    after = lora_weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt = tmp_path / "n" / "checkpoints" / "epoch_0001" / "adapter" / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt)).values())


def test_empty_and_missing_prompt_files(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.prompts import load_prompts

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompts; put one prompt per line"):
        load_prompts(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"a cat\nna\xefve\n")
    with pytest.raises(ValueError, match="not UTF-8 text \\(bad byte on line 2\\)"):
        load_prompts(str(bad))
    good = tmp_path / "good.txt"
    good.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(good)) == ["a cat", "a dog"]


def test_cli_reports_config_errors(capsys):
    from fdfo.train import main

    assert main(["--train.learning_rte", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rte'" in err and "learning_rate" in err
    assert main(["--print-config", "--train.epochs", "3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_cli_reports_a_missing_model_path(tmp_path, capsys):
    from fdfo.train import main

    rc = main(["--model.path", str(tmp_path / "missing-model"), "--log.out_dir", str(tmp_path / "r"),
               "--log.progress", "false"])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_deepspeed_launcher_runs_the_entry_point(tmp_path, tiny_pipeline_dir, digit_reward_dir, stand_in_kernels):
    """`deepspeed fdfo/train.py --config ...` end to end (one rank on this machine's accelerator or CPU),
    from the repository root with a stand-in `kernels` distribution on the path: the `import kernels`
    of transformers and diffusers gets it, never a folder of the repository (tests/test_name_clash.py)."""
    import yaml

    cfg = tiny_run(tmp_path / "ds", tiny_pipeline_dir, digit_reward_dir, train={"epochs": 1},
                   eval={"every": 0, "metrics": []}, checkpoint={"every": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    site, real_kernels_installed = stand_in_kernels
    marker = tmp_path / "kernels-imported-from"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1",
               PYTHONPATH=str(site), FDFO_STAND_IN_MARKER=str(marker))
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.run([str(launcher), "--num_gpus", "1", "--master_port", free_port(), "fdfo/train.py",
                           "--config", str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ds" / "checkpoints" / "epoch_0001" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert "built successfully" not in proc.stdout  # DeepSpeed's op line, on every run but the first
    if real_kernels_installed:  # transformers and diffusers import it only then
        imported = set(marker.read_text().split())
        assert imported == {str(site / "kernels" / "__init__.py")}


def test_flow_grpo_in_the_same_trainer(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    cfg = tiny_run(tmp_path / "g", tiny_pipeline_dir, digit_reward_dir,
                   train={"algorithm": "flow_grpo", "epochs": 1, "micro_batch_rows": 3},
                   flow_grpo={"group_size": 2, "groups_per_epoch": 2, "kl_beta": 0.01},
                   eval={"every": 0, "metrics": []}, checkpoint={"every": 0})
    t = Trainer(cfg)
    before = lora_weights(t)
    t.run()
    lines = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    assert len(steps) == 2
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-4)  # first update: the sampling policy itself
    assert "kl" in steps[0] and steps[0]["kl"] >= 0
    (epoch,) = [r for r in lines if r["kind"] == "epoch"]
    assert epoch["images_sampled"] == 4
    after = lora_weights(t)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_triton_kernels_train_like_the_torch_reference(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """train.kernels: triton (the interpreter on CPU) gives the same update as the PyTorch references."""
    pytest.importorskip("triton")
    from fdfo.trainer import Trainer

    finals = {}
    for backend in ("torch", "triton"):
        cfg = tiny_run(tmp_path / backend, tiny_pipeline_dir, digit_reward_dir,
                       train={"epochs": 1, "kernels": backend}, eval={"every": 0, "metrics": []},
                       checkpoint={"every": 0})
        t = Trainer(cfg)
        t.run()
        finals[backend] = lora_weights(t)
    for k in finals["torch"]:
        torch.testing.assert_close(finals["triton"][k], finals["torch"][k], rtol=1e-4, atol=1e-6)


def test_model_compile_takes_the_eager_step(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """model.compile: the transformer is compiled in place once (fdfo.compilation), for sampling and for
    training through the DeepSpeed engine, and one epoch takes the step eager training takes, up to the
    compiler's reassociation of sums."""
    from fdfo.trainer import Trainer

    records, weights = {}, {}
    for mode in (False, True):
        cfg = tiny_run(tmp_path / str(mode), tiny_pipeline_dir, digit_reward_dir, **QUIET)
        cfg = with_overrides(cfg, {"model": {"compile": mode}})
        t = Trainer(cfg)
        assert (t.model.compiled is not None) == mode
        assert not mode or t.model.compiled.module is t.engine.module.module
        start = lora_weights(t)
        records[mode] = t.train_epoch(0)
        weights[mode] = lora_weights(t)
        stats = t.model.compile_stats()
        assert (stats["compiled"] and stats["compile_s"] > 0) if mode else stats == {}
    assert any(not torch.equal(weights[True][k], start[k]) for k in start)
    assert records[True]["reward_mean"] == pytest.approx(records[False]["reward_mean"], rel=1e-5)
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-3, atol=1e-6)


def test_a_prompt_path_that_is_a_directory_or_unreadable(tmp_path, monkeypatch):
    from fdfo.errors import ConfigError
    from fdfo.prompts import load_prompts

    with pytest.raises(ConfigError, match="is a directory"):
        load_prompts(str(tmp_path))
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")

    def denied(self, *args, **kwargs):  # (staged: root reads files whatever their mode)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match="cannot be read \\(Permission denied\\)"):
        load_prompts(str(path))


def test_grad_norm_before_clipping_is_logged_at_zero_stage_0(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """Each step's logged grad_norm is the 2-norm of the averaged gradient just before the optimizer
    step (measured here independently, in float64), also when the clip (1e-8) bites."""
    from fdfo.trainer import Trainer

    t = Trainer(tiny_run(tmp_path / "g", tiny_pipeline_dir, digit_reward_dir, **dict(QUIET, train={
        "epochs": 1, "grad_clip": 1e-8})))
    assert t.engine.zero_stage == 0
    engine, seen = t.engine.module, []
    step = engine.step

    def measured_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            grads = [p.grad.double() for p in t.model.trainable_parameters()]
            seen.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
        return step(*args, **kwargs)

    engine.step = measured_step
    t.run()
    logged = [json.loads(x)["grad_norm"] for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "step"]
    assert len(logged) == len(seen) == 2
    assert logged == pytest.approx(seen, rel=1e-5)
    assert min(seen) > 1e-8  # the clip bit: the norm logged is the one before clipping


def test_the_adapter_initialisation_does_not_depend_on_earlier_draws(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                                     monkeypatch):
    """A first run builds and caches a built-in base model while it loads, which draws from the global
    generator; the adapter must start the same whether or not that happened."""
    from fdfo import trainer
    from fdfo.trainer import Trainer

    a = lora_weights(Trainer(tiny_run(tmp_path / "a", tiny_pipeline_dir, digit_reward_dir, **QUIET)))
    load = trainer.load_flow_model

    def load_after_pretraining(*args, **kwargs):
        torch.rand(random.randrange(1, 1000))  # what pretraining the base model in this process draws
        return load(*args, **kwargs)

    monkeypatch.setattr(trainer, "load_flow_model", load_after_pretraining)
    b = lora_weights(Trainer(tiny_run(tmp_path / "b", tiny_pipeline_dir, digit_reward_dir, **QUIET)))
    assert any(v.abs().sum() > 0 for v in a.values())
    for k in a:
        assert torch.equal(a[k], b[k]), k
