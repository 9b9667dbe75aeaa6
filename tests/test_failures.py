"""Failure behaviour of a training run, end to end on the tiny SD3 pipeline: a changed learning rate
on resume, non-finite rewards in every epoch, a torn metrics log, user mistakes caught before any
model is loaded, Ctrl-C, a killed launcher, and the files a run leaves behind."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import free_port
from tests.test_train import QUIET, ROOT, lora_weights, tiny_run


def write_config(path: Path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the trainer starts loading a model (the check must come before)."""
    from fdfo import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(trainer, "load_flow_model", refuse)


def test_a_learning_rate_given_on_resume_is_the_one_used(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    sections = dict(QUIET, checkpoint={"every": 1}, train={"epochs": 1})
    Trainer(tiny_run(tmp_path / "a", tiny_pipeline_dir, digit_reward_dir, **sections)).run()
    checkpoint = tmp_path / "a" / "checkpoints" / "epoch_0001"
    finals = {}
    for lr in (1e-3, random.uniform(2e-2, 5e-2)):
        cfg = tiny_run(tmp_path / f"b{lr}", tiny_pipeline_dir, digit_reward_dir, **dict(sections, train={
            "epochs": 2, "learning_rate": lr, "weight_decay": 0.5}))
        t = Trainer(cfg, resume=str(checkpoint))
        groups = t.engine.module.optimizer.param_groups
        assert all(g["lr"] == lr and g["weight_decay"] == 0.5 for g in groups)
        assert len(t.engine.module.optimizer.state) > 0  # the moments come from the checkpoint
        before = lora_weights(t)
        t.run()
        finals[lr] = {k: v - before[k] for k, v in lora_weights(t).items()}
    small, large = finals.values()
    # The same checkpoint, the same batch: the updates differ only through the rate (they were bit-identical
    # when the saved rate was used), and Adam's first step of the epoch scales with it.
    ratio = sum(float(v.abs().sum()) for v in large.values()) / sum(float(v.abs().sum()) for v in small.values())
    assert ratio > 10


def test_a_run_whose_epochs_are_all_skipped_fails(tmp_path, tiny_pipeline_dir, digit_reward_dir, monkeypatch,
                                                  capsys):
    from fdfo import rewards
    from fdfo.train import main

    def nan_reward(path, cache_dir, device, **options):
        return lambda prompts, images: torch.full((len(prompts),), float("nan"))

    monkeypatch.setitem(rewards.REGISTRY, "nan_reward", nan_reward)
    cfg = tiny_run(tmp_path / "n", tiny_pipeline_dir, digit_reward_dir, **dict(QUIET, train={"epochs": 2}),
                   reward={"weights": {"nan_reward": 1.0}, "paths": {}})
    with pytest.warns(UserWarning, match="non-finite reward"):
        assert main(["--config", write_config(tmp_path / "n.yaml", cfg)]) == 1
    err = capsys.readouterr().err
    assert "every epoch" in err and "skipped for non-finite rewards" in err and "Traceback" not in err


def test_mistakes_are_reported_before_any_model_is_loaded(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                          no_model_loading, capsys):
    from fdfo.train import main

    def run(name, **sections):
        cfg = tiny_run(tmp_path / "run", tiny_pipeline_dir, digit_reward_dir, **dict(QUIET, **sections))
        rc = main(["--config", write_config(tmp_path / f"{name}.yaml", cfg)])
        return rc, capsys.readouterr().err

    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"a cat\nna\xefve\n")
    for name, path, message in [("empty", empty, "holds no prompts"), ("latin1", latin1, "not UTF-8"),
                                ("missing", tmp_path / "nope.txt", "does not exist")]:
        rc, err = run(name, data={"prompts": str(path)})
        assert rc != 0 and str(path) in err and message in err and "Traceback" not in err, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = run("file_out", log={"out_dir": str(afile), "progress": False, "plot_every": 0})
    assert rc == 1 and "is an existing file" in err

    # A directory that holds a run: refused without --resume / --overwrite; its files untouched.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')
    rc, err = run("again")
    assert rc == 1 and "already holds a run" in err and "--overwrite" in err
    assert (run_dir / "metrics.jsonl").read_text() == '{"kind": "epoch", "epoch": 1}\n'


def test_resume_with_a_changed_lora_rank_is_refused_and_changes_nothing(tmp_path, tiny_pipeline_dir,
                                                                        digit_reward_dir, capsys):
    from fdfo.train import main

    cfg = tiny_run(tmp_path / "r", tiny_pipeline_dir, digit_reward_dir, **dict(QUIET, checkpoint={"every": 1},
                                                                               train={"epochs": 1}))
    path = write_config(tmp_path / "r.yaml", cfg)
    assert main(["--config", path]) == 0
    saved = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--config", path, "--resume", "--lora.rank", "8", "--train.epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora.rank: 4 -> 8" in err
    assert main(["--config", path, "--resume"]) == 0  # already at train.epochs: complete, nothing to do
    assert "the run is complete" in capsys.readouterr().out
    assert main(["--config", path, "--resume", "--train.epochs", "0"]) == 2  # (train.epochs must be positive)
    assert {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()} == saved


def test_resume_drops_a_torn_metrics_line(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    sections = dict(QUIET, checkpoint={"every": 1})
    Trainer(tiny_run(tmp_path / "t", tiny_pipeline_dir, digit_reward_dir, **dict(sections, train={"epochs": 1}))).run()
    metrics = tmp_path / "t" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "step", "epoch": 2, "loss": 0.1')  # what a full disk left mid-line
    with pytest.warns(UserWarning, match="dropped 1 incomplete line"):
        t = Trainer(tiny_run(tmp_path / "t", tiny_pipeline_dir, digit_reward_dir,
                             **dict(sections, train={"epochs": 2})), resume="auto")
    t.run()
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1, 2]


def test_checkpoint_files_follow_the_umask(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    old = os.umask(0o022)
    try:
        Trainer(tiny_run(tmp_path / "m", tiny_pipeline_dir, digit_reward_dir,
                         **dict(QUIET, checkpoint={"every": 1}, train={"epochs": 1}))).run()
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# --------------------------------------------------------------------------- signals (subprocesses)


def _start(cmd, env, log):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, log_path, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(Path(log_path).read_text()[-3000:])
        time.sleep(0.2)


def test_ctrl_c_stops_cleanly_with_the_last_checkpoint_intact(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    cfg = tiny_run(tmp_path / "c", tiny_pipeline_dir, digit_reward_dir,
                   **dict(QUIET, checkpoint={"every": 1}, train={"epochs": 1000}))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = _start([sys.executable, "fdfo/train.py", "--config", write_config(tmp_path / "c.yaml", cfg)], env, log)
        latest = tmp_path / "c" / "checkpoints" / "latest"
        _wait_for(latest.is_file, proc, log_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    out = log_path.read_text()
    assert "Traceback" not in out and "fdfo: stopped by SIGINT; the last complete checkpoint is" in out, out[-3000:]
    # The run continues from there.
    from fdfo.settings import with_overrides
    from fdfo.trainer import Trainer

    epoch = int((tmp_path / "c" / "checkpoints" / "latest").read_text()[len("epoch_"):])
    cfg = with_overrides(cfg, {"train": {"epochs": epoch + 1}})
    t = Trainer(cfg, resume="auto")
    assert t.epoch == epoch
    t.run()


def _is_trainer(args: list[str]) -> bool:
    """python [-u] fdfo/train.py ..., not a launcher whose arguments name it."""
    script = next((i for i, a in enumerate(args) if a.endswith("fdfo/train.py")), None)
    return script is not None and not any("deepspeed" in a for a in args[:script])


def test_killing_the_deepspeed_launcher_stops_the_trainer_and_frees_shared_memory(tmp_path, tiny_pipeline_dir,
                                                                                   digit_reward_dir):
    psutil = pytest.importorskip("psutil")
    cfg = tiny_run(tmp_path / "l", tiny_pipeline_dir, digit_reward_dir,
                   **dict(QUIET, checkpoint={"every": 1}, train={"epochs": 1000}))
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    launcher = Path(sys.executable).with_name("deepspeed")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = _start([str(launcher), "--num_gpus", "1", "--master_port", port, "fdfo/train.py", "--config",
                       write_config(tmp_path / "l.yaml", cfg)], env, log)
        latest = tmp_path / "l" / "checkpoints" / "latest"
        _wait_for(latest.is_file, proc, log_path)
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_trainer(p.cmdline())]
        assert trainers, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
        buffer = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
        proc.send_signal(signal.SIGTERM)  # the `deepspeed` command alone, as a scheduler or `kill` would
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(trainers, timeout=60)
        for p in alive:
            p.kill()
        assert not alive, "the trainer kept running after its launcher was killed\n" + log_path.read_text()[-3000:]
    assert "stopping this rank" in log_path.read_text()
    assert not buffer.exists()
