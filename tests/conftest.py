"""Shared fixtures: tiny random SD3 pipelines and quickly trained digit reward models.

Everything is built offline at tiny size and written with ``save_pretrained``,
so tests load it through the same ``from_pretrained`` code as real runs.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed builds its CPU ops (shared-memory comm, CPU Adam) on first use with ninja: the venv's
# own ninja (a dependency of deepspeed) serves where the system has none.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def _bind_library_log_handlers() -> None:
    """diffusers and transformers give their root logger a stream handler on the stderr of the moment they
    are first imported. Bound here, at collection, that is the session's stderr; first imported inside a
    test that captures stderr (capsys), it would be that test's capture, closed when the test ends, and
    every later library warning would print a 'Logging error' traceback into another test's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")


_bind_library_log_handlers()


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the first-run path that `make smoke` checks against the newest "
                                       "releases setup.py allows (tests/test_smoke.py)")


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def install_untrained_digits(root, digit_reward_dir, adapter_dir) -> None:
    """The built-in digits base, untrained (no minutes of pretraining), and its reward models where the
    digits task caches them under ``root``, and a LoRA adapter of that base with fixed non-zero weights
    written to ``adapter_dir``."""
    import shutil

    from fdfo.config import LoraConfig
    from fdfo.models import SD3FlowModel
    from fdfo.tasks.digits import BASE_DIR_NAME, REWARD_DIR_NAME
    from fdfo.tasks.digits.pretrain import digits_pipeline

    digits_pipeline(seed=0).save_pretrained(root / BASE_DIR_NAME)
    shutil.copytree(digit_reward_dir, root / REWARD_DIR_NAME)
    model = SD3FlowModel(str(root / BASE_DIR_NAME), device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=4)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    model.save_lora(adapter_dir)


def free_port() -> str:
    """A local TCP port nothing listens on now (for a rendezvous a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous():
    """An in-process Trainer makes this process rank 0 of a world of 1 and says so in os.environ
    (RANK, MASTER_PORT, ...); a script a later test starts would inherit that and try to listen on
    the port this process holds. Each test leaves those variables as it found them."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny SD3 pipeline (transformer, VAE, 2 CLIP encoders, T5) saved with save_pretrained."""
    from fdfo.models.tiny import build_tiny_sd3_pipeline

    out = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3_pipeline(sample_size=8, in_channels=4, max_text_tokens=16, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def digit_reward_dir(tmp_path_factory):
    """Digit classifier + judge, trained briefly (enough to score real digits sensibly)."""
    from fdfo.tasks.digits.reward_models import build_reward_models

    out = tmp_path_factory.mktemp("digit_rewards")
    build_reward_models(out, seed=0, progress=False, classifier_steps=150)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test may read or fill the user's ~/.cache/fdfo."""
    monkeypatch.setenv("FDFO_CACHE", str(tmp_path / "fdfo-cache"))


STAND_IN_KERNELS = '''"""A stand-in for the `kernels` distribution: it records that an `import kernels` found it.

When the real distribution is installed, the stand-in runs the real package's __init__ in its own
namespace (and looks up submodules in the real folder too), so diffusers and transformers keep
working with it.
"""
import os

FDFO_STAND_IN = True
if os.environ.get("FDFO_STAND_IN_MARKER"):
    with open(os.environ["FDFO_STAND_IN_MARKER"], "a") as _f:
        _f.write(__file__ + "\\n")
_real = {real!r}
if _real:
    __path__.append(_real)
    with open(os.path.join(_real, "__init__.py")) as _f:
        exec(compile(_f.read(), os.path.join(_real, "__init__.py"), "exec"))
'''


@pytest.fixture
def stand_in_kernels(tmp_path):
    """A site folder holding a stand-in distribution named ``kernels``, the name the Hugging Face
    kernels package takes (and that transformers and diffusers import). Returns the folder and
    whether the real distribution is installed (only then do diffusers and transformers import it)."""
    from importlib import metadata

    site = tmp_path / "stand-in-site"
    (site / "kernels").mkdir(parents=True)
    try:
        real = metadata.distribution("kernels")
        real_dir, version = str(real.locate_file("kernels")), real.version
    except metadata.PackageNotFoundError:
        real_dir, version = "", None
    (site / "kernels" / "__init__.py").write_text(STAND_IN_KERNELS.format(real=real_dir))
    if version:
        info = site / f"kernels-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    return site, bool(real_dir)
