"""The parts a run depends on can fail: a reward model that cannot load, raises while scoring or returns the
wrong number of scores, an out-of-memory error inside an epoch, and a resumed state that verifies but is not
what the run left (the resume guard). Each ends the run with one line naming the part and the last complete
checkpoint, and nothing of the failed epoch is written."""

from __future__ import annotations

import random

import pytest
import torch

from fdfo import integrity
from tests.test_failures import write_config
from tests.test_train import QUIET, tiny_run

ROWS_PER_EPOCH = 8  # the tiny job: 4 pairs of 2 rows


def _checkpoints(run) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _run_main(tmp_path, name, cfg, capsys) -> tuple[int, str]:
    from fdfo.train import main

    code = main(["--config", write_config(tmp_path / f"{name}.yaml", cfg)])
    return code, capsys.readouterr().err


def _sections(epochs: int) -> dict:
    return dict(QUIET, checkpoint={"every": 1}, train={"epochs": epochs})


def _run_with_reward(tmp_path, name, factory, epochs, pipeline, reward_dir, monkeypatch, capsys, **reward):
    """``fdfo.train`` on the tiny job with ``factory`` as its only reward: (run directory, exit code, stderr,
    its last line)."""
    from fdfo import rewards

    monkeypatch.setitem(rewards.REGISTRY, name, factory)
    run = tmp_path / name
    cfg = tiny_run(run, pipeline, reward_dir, **_sections(epochs),
                   reward={"weights": {name: 1.0}, "paths": {}, **reward})
    code, err = _run_main(tmp_path, name, cfg, capsys)
    return run, code, err, err.strip().splitlines()[-1]


def test_a_reward_that_raises_while_scoring_stops_at_the_last_checkpoint(tmp_path, tiny_pipeline_dir,
                                                                         digit_reward_dir, monkeypatch, capsys):
    seen = [0]
    message = f"connection reset by the scoring service {random.randrange(10**6)}"

    def flaky(path, cache_dir, device, **options):
        def score(prompts, images):
            seen[0] += len(prompts)
            if seen[0] > ROWS_PER_EPOCH:  # the second epoch's first call
                raise ConnectionError(message)
            return images.float().mean(dim=(1, 2, 3))
        return score

    run, code, err, line = _run_with_reward(tmp_path, "flaky", flaky, 3, tiny_pipeline_dir, digit_reward_dir,
                                            monkeypatch, capsys)
    assert code == 1
    assert "epoch 2: the reward failed" in line and f"ConnectionError: {message}" in line, line
    assert f"last complete checkpoint is '{run / 'checkpoints' / 'epoch_0001'}'" in line, line
    assert "Traceback" not in err
    assert _checkpoints(run) == ["epoch_0001", "latest"]  # nothing of epoch 2, no partial checkpoint


@pytest.mark.parametrize("overlap", [True, False])
def test_a_reward_with_the_wrong_number_of_scores_is_never_trained_on(tmp_path, tiny_pipeline_dir,
                                                                      digit_reward_dir, monkeypatch, capsys,
                                                                      overlap):
    def short(path, cache_dir, device, **options):
        return lambda prompts, images: torch.rand(len(prompts) - 1)

    run, code, err, line = _run_with_reward(tmp_path, "short", short, 2, tiny_pipeline_dir, digit_reward_dir,
                                            monkeypatch, capsys, overlap=overlap, batch_size=3)
    assert code == 1
    assert "epoch 1: the reward failed" in line and "'short'" in line and "for 3 images" in line, line
    assert "no checkpoint was written yet" in line and "Traceback" not in err
    assert _checkpoints(run) == []


def test_a_reward_model_that_cannot_load_is_one_line(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                     monkeypatch, capsys):
    def broken(path, cache_dir, device, **options):
        raise OSError("Unable to load weights from checkpoint file 'model.safetensors' (header too large)")

    _, code, err, line = _run_with_reward(tmp_path, "broken", broken, 1, tiny_pipeline_dir, digit_reward_dir,
                                          monkeypatch, capsys)
    assert code == 1
    assert "loading the reward model(s) 'broken' failed (OSError: Unable to load weights" in line, line
    assert "reward.paths" in line and "no checkpoint was written yet" in line and "Traceback" not in err


@pytest.mark.parametrize("phase", ["training", "sampling"])
def test_out_of_memory_inside_an_epoch_names_the_settings_that_lower_memory(tmp_path, tiny_pipeline_dir,
                                                                             digit_reward_dir, phase):
    from fdfo.errors import TrainingError
    from fdfo.trainer import Trainer

    run = tmp_path / phase
    t = Trainer(tiny_run(run, tiny_pipeline_dir, digit_reward_dir, **_sections(3)))
    armed = [False]

    def hook(module, args):
        if armed[0] and torch.is_grad_enabled() == (phase == "training"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t.model.transformer.register_forward_pre_hook(hook)
    original = t.train_epoch

    def epoch(n):
        armed[0] = n == 1  # the second epoch
        return original(n)

    t.train_epoch = epoch
    with pytest.raises(TrainingError) as info:
        t.run()
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("epoch 2 ran out of memory (OutOfMemoryError: CUDA out of memory"), line
    assert "train.micro_batch_rows (now 4)" in line and "sampling.micro_batch_pairs (now 2)" in line, line
    assert "train.gradient_checkpointing true" in line and "train.trajectory_device host" in line, line
    assert f"last complete checkpoint is '{run / 'checkpoints' / 'epoch_0001'}'" in line, line
    assert _checkpoints(run) == ["epoch_0001", "latest"]


def _perturb_adam(checkpoint) -> int:
    """Adam's moments in ``checkpoint`` replaced by ones the run never had, then the manifest
    rewritten so that every file verifies: only the resume guard can tell."""
    changed = 0
    for path in sorted((checkpoint / "state").rglob("*optim_states.pt")) + sorted(
            (checkpoint / "state").rglob("*model_states.pt")):
        blob = torch.load(path, map_location="cpu", weights_only=False)
        opt = blob.get("optimizer") if isinstance(blob, dict) else None
        states = (opt or {}).get("state", {}) if isinstance(opt, dict) else {}
        for st in states.values():
            if "exp_avg_sq" in st:  # moments of order 1 over 1e-8: the next step moves every weight by ~1e4 lr
                st["exp_avg"].copy_(torch.randn_like(st["exp_avg"]))
                st["exp_avg_sq"].fill_(1e-8)
                changed += 1
        if changed:
            torch.save(blob, path)
            break
    integrity.seal(checkpoint, skip=("state_universal",))
    assert integrity.verify(checkpoint).good
    return changed


def test_the_resume_guard_stops_a_resumed_state_that_jumped(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.errors import TrainingError
    from fdfo.trainer import Trainer

    run = tmp_path / "g"
    Trainer(tiny_run(run, tiny_pipeline_dir, digit_reward_dir, **_sections(4))).run()
    good = run / "checkpoints" / "epoch_0003"  # three trained epochs to compare with

    # A clean resume repeats the run: the guard lets it through.
    Trainer(tiny_run(tmp_path / "clean", tiny_pipeline_dir, digit_reward_dir, **_sections(4)), resume=str(good)).run()

    assert _perturb_adam(good) > 0
    with pytest.raises(TrainingError) as info:
        Trainer(tiny_run(tmp_path / "bad", tiny_pipeline_dir, digit_reward_dir, **_sections(4)),
                resume=str(good)).run()
    line = str(info.value)
    assert f"epoch 4, the first after resuming from '{good}', jumped" in line, line
    # (with the run's trust region the wrecked update shows as clipping: the clipped elements carry no gradient)
    assert any(f"{name} " in line for name in ("clipfrac", "grad_norm", "policy_loss")), line
    assert "--checkpoint.resume_guard 0" in line, line
    assert _checkpoints(tmp_path / "bad") == []  # nothing of the jumped epoch was written

    # Opted out, the same resume trains on (and writes its checkpoint).
    Trainer(tiny_run(tmp_path / "optout", tiny_pipeline_dir, digit_reward_dir,
                     **dict(_sections(4), checkpoint={"every": 1, "resume_guard": 0})), resume=str(good)).run()
    assert "epoch_0004" in _checkpoints(tmp_path / "optout")


def _history(n: int) -> list[dict]:
    history = [{"kind": "epoch", "epoch": i + 1, "policy_loss": -random.uniform(1e-4, 1e-3),
                "grad_norm": random.uniform(0.5, 2.0), "clipfrac": random.uniform(0.0, 0.05)} for i in range(n)]
    history.insert(min(n, 2), {"kind": "eval", "epoch": 2, "grad_norm": 1e9})  # evaluations are not epochs
    return history


def test_the_guard_compares_with_the_largest_recent_values():
    from fdfo.resume_guard import CLIP_JUMP, ResumeGuard, reference

    history = _history(7)
    epochs = [h for h in history if h["kind"] == "epoch"]
    ref = reference(history)
    for name in ("grad_norm", "clipfrac"):
        assert ref[name] == max(r[name] for r in epochs[-5:])
    assert ref["policy_loss"] == max(abs(r["policy_loss"]) for r in epochs[-5:])
    ok = {"epoch": 8, "policy_loss": ref["policy_loss"] * 90, "grad_norm": ref["grad_norm"] * 90, "clipfrac": 0.3}
    ResumeGuard("c", history, 100.0).check(ok)  # under 100x, clip fraction under the jump
    for name, value in (("grad_norm", ref["grad_norm"] * 110), ("policy_loss", -ref["policy_loss"] * 110),
                        ("clipfrac", CLIP_JUMP)):
        with pytest.raises(Exception, match=name):
            ResumeGuard("c", history, 100.0).check(dict(ok, **{name: value}))
    busy = [dict(h, clipfrac=0.2) if h["kind"] == "epoch" else h for h in history]
    ResumeGuard("c", busy, 100.0).check(dict(ok, clipfrac=0.45))  # a run that clipped a fifth already
    ResumeGuard("c", history, 0).check(dict(ok, grad_norm=1e9))  # 0 = off
    ResumeGuard("c", _history(2), 100.0).check(dict(ok, grad_norm=1e9))  # too short a history to compare
    guard = ResumeGuard("c", history, 100.0)
    guard.check(dict(ok, skipped=True, grad_norm=1e9))  # a skipped epoch is not the one compared
    with pytest.raises(Exception, match="grad_norm"):
        guard.check(dict(ok, grad_norm=1e9))
    guard.check(dict(ok, grad_norm=1e9))  # one check per resume
