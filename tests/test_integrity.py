"""Checksummed checkpoints (fdfo.integrity): every checkpoint of a real tiny run carries a manifest; a bit flip
or a truncated file is refused in one line that names the file and the newest checkpoint that verifies,
before any model is loaded; `python -m fdfo.checkpoint verify` tells good from bad; a checkpoint written
before manifests still loads, with a notice; the exported adapter and the universal conversion are covered.

One run is trained for the module (2 epochs, a checkpoint each); each test damages a copy of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fdfo import integrity
from fdfo.checkpoint import CheckpointDamaged, check_resume, check_universal, convert_to_universal, main as cli
from tests.conftest import _DIST_ENV
from tests.test_train import QUIET, ROOT, tiny_run

STATE_FILE = "state/mp_rank_00_model_states.pt"
ADAPTER_FILE = "adapter/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir, digit_reward_dir):
    from fdfo import run_lock
    from fdfo.trainer import Trainer

    root = tmp_path_factory.mktemp("integrity")
    env = {k: os.environ.get(k) for k in _DIST_ENV}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FDFO_CACHE", str(root / "cache"))
        cfg = tiny_run(root / "run", tiny_pipeline_dir, digit_reward_dir,
                       **dict(QUIET, checkpoint={"every": 1}, train={"epochs": 2}))
        Trainer(cfg).run()
    for k, v in env.items():  # (as conftest's _no_leaked_rendezvous does for a test)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    run_lock.release(root / "run")
    return SimpleNamespace(run=root / "run", pipeline=tiny_pipeline_dir, rewards=digit_reward_dir)


def copy_of(trained, tmp_path, epochs=3):
    """A copy of the trained run, and the config file that continues it to ``epochs``."""
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    cfg = tiny_run(run, trained.pipeline, trained.rewards, **dict(QUIET, checkpoint={"every": 1},
                                                                 train={"epochs": epochs}))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return run, cfg, str(path)


def flip_middle(path: Path, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def no_model_loading(monkeypatch):
    from fdfo import trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the damaged checkpoint was reported")

    monkeypatch.setattr(trainer, "load_flow_model", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("fdfo: error: "), err
    return err.strip()


def test_every_checkpoint_carries_a_manifest_that_verifies(trained, capsys):
    ckpt = trained.run / "checkpoints" / "epoch_0002"
    manifest = json.loads((ckpt / integrity.MANIFEST).read_text())
    assert manifest["checksum"] == "crc32" and {STATE_FILE, ADAPTER_FILE, "trainer.json"} <= set(manifest["files"])
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {integrity.MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert all(e["size"] == (ckpt / rel).stat().st_size for rel, e in manifest["files"].items())
    assert cli(["verify", str(trained.run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{trained.run / 'checkpoints' / 'epoch_0001'}  good",
                   f"{ckpt}  good  (latest)",
                   f"newest good: {ckpt} (continue the run from it with --resume {ckpt})"]


def test_resume_from_a_bit_flipped_checkpoint_is_refused_naming_the_file(trained, tmp_path, capsys, monkeypatch):
    from fdfo import trainer
    from fdfo.train import main

    run, cfg, config = copy_of(trained, tmp_path)
    bad, good = run / "checkpoints" / "epoch_0002", run / "checkpoints" / "epoch_0001"
    flip_middle(bad / STATE_FILE)
    with monkeypatch.context() as m:
        m.setattr(trainer, "load_flow_model", lambda *a, **k: pytest.fail("a model was loaded first"))
        capsys.readouterr()
        assert main(["--config", config, "--resume"]) == 1
    err = one_error_line(capsys)
    assert f"checkpoint '{bad}' is damaged: '{bad / STATE_FILE}' does not match the manifest: hash differs" in err
    assert f"the newest checkpoint of this run that verifies is '{good}'" in err and f"--resume {good}" in err

    # The verify command says the same, and its exit status says that one is bad.
    proc = subprocess.run([sys.executable, "-m", "fdfo.checkpoint", "verify", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{good}  good"
    assert lines[1].startswith(f"{bad}  BAD: '{STATE_FILE}' does not match the manifest: hash differs")
    assert lines[1].endswith("(latest)") and lines[2].startswith(f"newest good: {good} ")

    # And the checkpoint it names resumes.
    from fdfo.trainer import Trainer

    t = Trainer(cfg, resume=str(good))
    assert t.epoch == 1


def test_a_truncated_checkpoint_is_refused_without_a_torch_traceback(trained, tmp_path, capsys, no_model_loading):
    from fdfo.train import main

    run, _, config = copy_of(trained, tmp_path)
    bad = run / "checkpoints" / "epoch_0002"
    state = bad / STATE_FILE
    size = state.stat().st_size
    with open(state, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert main(["--config", config, "--resume"]) == 1
    err = one_error_line(capsys)
    assert f"'{state}' has {size // 2} bytes, the manifest records {size}: size differs (truncated)" in err
    assert "PytorchStreamReader" not in err and f"--resume {run / 'checkpoints' / 'epoch_0001'}" in err
    state.unlink()
    assert main(["--config", config, "--resume", str(bad)]) == 1  # a file gone: "missing"
    assert f"'{state}' is missing" in one_error_line(capsys)
    shutil.copy(trained.run / "checkpoints" / "epoch_0002" / STATE_FILE, state)
    (bad / "trainer.json").unlink()  # (one that plan reads itself)
    assert main(["--config", config, "--resume"]) == 1
    assert f"'{bad / 'trainer.json'}' is missing" in one_error_line(capsys)


def test_a_checkpoint_without_a_manifest_resumes_with_a_notice(trained, tmp_path, capsys):
    from fdfo.trainer import Trainer

    run, cfg, _ = copy_of(trained, tmp_path)
    legacy = run / "checkpoints" / "epoch_0002"
    (legacy / integrity.MANIFEST).unlink()  # as written before this change
    capsys.readouterr()
    t = Trainer(cfg, resume="auto")
    assert t.epoch == 2
    notices = [line for line in capsys.readouterr().out.splitlines() if "has no manifest" in line]
    assert notices == [f"[fdfo] checkpoint '{legacy}' has no manifest (it was written before fdfo checksummed its "
                       "checkpoints): its files cannot be verified; resuming from it as it is"]


def test_a_truncated_checkpoint_without_a_manifest_is_one_line_too(trained, tmp_path, capsys):
    """Without a manifest the damage shows only when torch reads the file: still one line naming it."""
    from fdfo.train import main

    run, _, config = copy_of(trained, tmp_path)
    legacy = run / "checkpoints" / "epoch_0002"
    (legacy / integrity.MANIFEST).unlink()
    state = legacy / STATE_FILE
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)
    capsys.readouterr()
    assert main(["--config", config, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fdfo: error: checkpoint '{legacy}' is damaged: '{state}' cannot be read: it is not a "
                           "complete torch file (cut short or damaged; torch: "), err
    assert f"--resume {run / 'checkpoints' / 'epoch_0001'}" in line


def test_the_exported_adapter_is_verified_where_it_is_loaded(trained, tmp_path, capsys):
    from fdfo.generate import main as generate
    from fdfo.trained_checkpoint import resolve_checkpoint

    run, _, _ = copy_of(trained, tmp_path)
    bad, good = run / "checkpoints" / "epoch_0002", run / "checkpoints" / "epoch_0001"
    flip_middle(bad / ADAPTER_FILE)
    for given in (run, bad, bad / "adapter"):
        with pytest.raises(CheckpointDamaged) as info:
            resolve_checkpoint(given)
        message = str(info.value)
        assert f"'{bad / ADAPTER_FILE}' does not match the manifest: hash differs" in message, message
        assert f"use it with --adapter {good}" in message and "\n" not in message
    assert resolve_checkpoint(good).path == good / "adapter"
    capsys.readouterr()
    assert generate(["--adapter", str(run), "--prompt", "x", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fdfo.generate: error: checkpoint '{bad}' is damaged"), err

    # A resume does not read the exported weights: it goes on, with a warning not to use them.
    said = []
    check_resume(bad, notify=said.append)
    assert len(said) == 1 and f"'{bad / ADAPTER_FILE}'" in said[0] and "do not use its adapter/" in said[0]

    # A checkpoint from before manifests: loaded, with a notice.
    (good / integrity.MANIFEST).unlink()
    assert resolve_checkpoint(good).path == good / "adapter"
    assert f"checkpoint '{good}' has no manifest" in capsys.readouterr().out


def test_the_universal_conversion_has_a_manifest_of_its_own(trained, tmp_path, monkeypatch, capsys):
    from deepspeed.checkpoint import ds_to_universal

    run, _, _ = copy_of(trained, tmp_path)
    ckpt = run / "checkpoints" / "epoch_0002"

    def fake_conversion(args):  # what ds_to_universal writes, in miniature
        out = Path(args.output_folder)
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(os.urandom(4096))
        (out / "mp_rank_00_model_states.pt").write_bytes(os.urandom(512))
        (out.parent / "latest_universal").write_text("state_universal")

    monkeypatch.setattr(ds_to_universal, "main", fake_conversion)
    universal = ckpt / "state_universal"
    convert_to_universal(ckpt / "state", universal)
    assert integrity.verify(universal).good and check_universal(ckpt) is None
    assert integrity.verify(ckpt, skip=("state_universal",)).good  # the checkpoint's own manifest is unchanged
    flip_middle(universal / "zero" / "w" / "fp32.pt")
    message = check_universal(ckpt)
    assert f"'{universal / 'zero/w/fp32.pt'}' does not match the manifest: hash differs" in message
    assert f"delete '{universal}' and resume again" in message and "\n" not in message
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"{universal}  BAD: 'zero/w/fp32.pt'" in out and f"newest good: {ckpt} " in out
    (universal / integrity.MANIFEST).unlink()  # converted before manifests
    said = []
    assert check_universal(ckpt, notify=said.append) is None and "has no manifest" in said[0]


# --------------------------------------------------------------------------- fdfo.integrity itself


def test_verify_names_the_damaged_piece_and_every_kind_of_problem(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "CHUNK", 1 << 20)  # pieces of 1 MiB
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "big.bin").write_bytes(os.urandom(5 << 20 | 123))
    (d / "sub" / "small.json").write_text("{}")
    (d / "gone.txt").write_text("x")
    manifest = integrity.seal(d)
    assert len(manifest["files"]["big.bin"]["chunks"]) == 6
    assert integrity.verify(d).good
    data = bytearray((d / "big.bin").read_bytes())
    data[(3 << 20) + 7] ^= 1  # one bit, in the fourth MiB
    (d / "big.bin").write_bytes(bytes(data))
    (d / "gone.txt").unlink()
    (d / "sub" / "small.json").write_text("{ }")
    problems = {p.rel: p.what for p in integrity.verify(d).problems}
    assert problems == {"big.bin": "does not match the manifest: hash differs (in bytes 3 MiB to 4 MiB)",
                        "gone.txt": "is missing (the manifest records 1 bytes)",
                        "sub/small.json": "has 3 bytes, the manifest records 2: size differs"}
    verdict = integrity.verify(d)
    assert verdict.describe() == f"'{d / 'big.bin'}' does not match the manifest: hash differs (in bytes 3 MiB to " \
                                 "4 MiB), and 2 more files like it"
    assert integrity.verify(d, only=["sub"]).problems[0].rel == "sub/small.json"
    assert integrity.verify(d, skip=["big.bin", "gone.txt", "sub"]).good
    (d / integrity.MANIFEST).write_text('{"format": 1, "files": ')  # a damaged manifest is itself a problem
    assert integrity.verify(d).describe().startswith(f"'{d / integrity.MANIFEST}' is damaged")
    (d / integrity.MANIFEST).unlink()
    assert integrity.verify(d).status == "unverified"
