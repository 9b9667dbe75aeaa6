"""Flow models behind one protocol: encode prompts, velocity (with CFG), decode.

``load_flow_model`` resolves ``model.path``: a diffusers SD3-family pipeline
(hub id or local directory) or ``builtin:digits``, the CPU default job's base
model, which is pretrained and cached on first use. Both go through
``SD3FlowModel`` and the same ``from_pretrained`` code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fdfo.models.sd3 import Conditioning, SD3FlowModel

BUILTIN_PREFIX = "builtin:"


def cache_root(cache_dir: str | None = None) -> Path:
    """Where built-in models live: model.cache_dir, else $FDFO_CACHE, else ~/.cache/fdfo."""
    return Path(cache_dir or os.environ.get("FDFO_CACHE") or Path.home() / ".cache" / "fdfo").expanduser()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_model_path(path: str, cache_dir: str | None = None, progress: bool = True) -> str:
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name != "digits":
        raise FileNotFoundError(f"unknown built-in model '{path}'; valid: builtin:digits")
    from fdfo.pretrain import ensure_digits_base

    return str(ensure_digits_base(cache_root(cache_dir), progress=progress))


def load_flow_model(model_cfg, device: torch.device, *, shift: float | None = None,
                    progress: bool = True) -> SD3FlowModel:
    path = resolve_model_path(model_cfg.path, model_cfg.cache_dir, progress=progress)
    return SD3FlowModel(
        path, device=device, dtype=resolve_dtype(model_cfg.dtype, device), revision=model_cfg.revision,
        max_sequence_length=model_cfg.max_sequence_length, resolution=model_cfg.resolution, shift=shift,
    )


__all__ = ["Conditioning", "SD3FlowModel", "cache_root", "load_flow_model", "resolve_dtype", "resolve_model_path"]
