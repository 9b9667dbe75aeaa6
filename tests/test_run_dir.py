"""fdfo.run_dir: what a run does with its directory before any model is loaded (new, overwrite, resume).

Checkpoints here are stand-ins with the files the decision reads (trainer.json, state/): the
resume itself is exercised end to end in tests/test_train.py and tests/test_failures.py.
"""

import errno
import json
import os
import random
import tempfile

import pytest

from fdfo.settings import RunConfig, build_config
from fdfo.run_dir import RunComplete, RunDirError, compare_configs, plan, prepare


def config(out_dir, **sections) -> RunConfig:
    layers = {"log": {"out_dir": str(out_dir)}, "train": {"epochs": 6}}
    for section, values in sections.items():
        layers.setdefault(section, {}).update(values)
    return build_config(layers)


def fake_checkpoint(out_dir, epoch, cfg: RunConfig, zero_stage=0, latest=True):
    path = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
    (path / "state").mkdir(parents=True)
    (path / "trainer.json").write_text(json.dumps({"epoch": epoch, "global_step": 4 * epoch,
                                                   "zero_stage": zero_stage, "config": cfg.to_dict()}))
    if latest:
        (out_dir / "checkpoints" / "latest").write_text(path.name)
    (out_dir / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')
    return path


def test_a_new_run_needs_an_empty_directory(tmp_path):
    run = tmp_path / "run"
    assert plan(config(run)).checkpoint is None  # absent: fine
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # not a run's file: still fine
    assert plan(config(run)).move_aside is None
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match="already holds a run \\(metrics.jsonl\\).*--resume.*--overwrite"):
        plan(config(run))


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 2, config(run))
    start = prepare(plan(config(run), overwrite=True))
    assert start.checkpoint is None and run.is_dir() and [p.name for p in run.iterdir()] == ["fdfo.lock"]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert (aside / "checkpoints" / "epoch_0002" / "trainer.json").is_file()  # nothing deleted
    with pytest.raises(RunDirError, match="contradict"):
        plan(config(run), resume="auto", overwrite=True)


def test_resume_auto_without_a_checkpoint_is_a_new_run_with_a_notice(tmp_path, capsys):
    start = plan(config(tmp_path / "run"), resume="auto")
    assert start.checkpoint is None
    assert "no checkpoint in" in capsys.readouterr().out


def test_resume_finds_the_latest_or_a_given_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = config(run)
    first = fake_checkpoint(run, 2, cfg)
    second = fake_checkpoint(run, 4, cfg)
    assert plan(cfg, resume="auto").checkpoint == second
    assert plan(cfg, resume=str(run)).checkpoint == second  # a run directory: its latest
    assert plan(cfg, resume=str(first)).checkpoint == first
    with pytest.raises(RunDirError, match="does not exist"):
        plan(cfg, resume=str(tmp_path / "nope"))
    with pytest.raises(RunDirError, match="not a complete fdfo checkpoint"):
        plan(cfg, resume=str(run / "checkpoints"))
    # A checkpoint of another run resumes into an empty directory only.
    other = config(tmp_path / "other")
    assert plan(other, resume=str(second)).checkpoint == second
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="another run"):
        plan(other, resume=str(second))


def test_resume_at_or_past_train_epochs(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 6, config(run))
    with pytest.raises(RunComplete, match="epoch 6 = train.epochs"):
        plan(config(run), resume="auto")
    with pytest.raises(RunDirError, match="epoch 6, past train.epochs=3.*above 6"):
        plan(config(run, train={"epochs": 3}), resume="auto")
    assert plan(config(run, train={"epochs": 7}), resume="auto").checkpoint is not None


def test_a_change_the_saved_state_cannot_take_is_refused_naming_the_keys(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 2, config(run, lora={"rank": 16}))
    rank = random.choice([4, 8, 64])
    with pytest.raises(RunDirError) as info:
        plan(config(run, lora={"rank": rank}, train={"algorithm": "flow_grpo"}), resume="auto")
    message = str(info.value)
    assert f"lora.rank: 16 -> {rank}" in message and "train.algorithm: 'fdfo' -> 'flow_grpo'" in message
    assert "\n" not in message
    with pytest.raises(RunDirError, match="ZeRO stage: 0 -> 3"):
        plan(config(run, lora={"rank": 16}, deepspeed={"zero_stage": 3}), resume="auto")
    # Other changes are allowed, listed, and used.
    lr = random.uniform(1e-6, 1e-4)
    start = prepare(plan(config(run, lora={"rank": 16}, train={"learning_rate": lr, "epochs": 6}), resume="auto"))
    assert any(c.startswith("train.learning_rate: 3e-05 -> ") for c in start.changes)


def test_compare_configs_reaches_into_mappings():
    old = build_config().to_dict()
    new = build_config().to_dict()
    new["reward"]["weights"] = {"pickscore": 1.0, "vlm_alignment": 0.2}
    new["lora"]["target_modules"] = ["to_q"]
    fixed, other = compare_configs(old, new)
    assert fixed == [f"lora.target_modules: {old['lora']['target_modules']!r} -> ['to_q']"]
    assert other == ["reward.weights.vlm_alignment: 0.1 -> 0.2"]


def test_an_unusable_out_dir_is_refused(tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(RunDirError, match="is an existing file, not a directory"):
        plan(config(afile))
    with pytest.raises(RunDirError, match="cannot be created"):
        plan(config(afile / "run"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:  # a read-only file system (staged: mounting one needs privileges)
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(RunDirError, match="cannot be written \\(Read-only file system"):
            plan(config(tmp_path / "run"))
    if os.geteuid() == 0:
        pytest.skip("root writes into directories without write permission: that case cannot be staged")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(RunDirError, match="cannot be written"):
            plan(config(locked / "run"))
    finally:
        locked.chmod(0o755)


def test_the_default_lora_targets_are_written_out_so_earlier_runs_resume(tiny_pipeline_dir):
    """lora.target_modules null is the family's default, made explicit before the run directory is touched:
    a run saved with the explicit list (as every run was before null was the default) resumes unchanged."""
    from fdfo.models import SD3FlowModel
    from fdfo.trainer import settle_model_settings

    given = build_config({"model": {"path": str(tiny_pipeline_dir)}})
    assert given.lora.target_modules is None
    cfg, adapter_dir, family = settle_model_settings(given)
    assert cfg.lora.target_modules == list(SD3FlowModel.LORA_TARGETS) and given.lora.target_modules is None
    assert adapter_dir is None and family is SD3FlowModel
    earlier = build_config({"model": {"path": str(tiny_pipeline_dir)},
                            "lora": {"target_modules": list(SD3FlowModel.LORA_TARGETS)}}).to_dict()
    assert compare_configs(earlier, cfg.to_dict()) == ([], [])
