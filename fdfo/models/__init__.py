"""Flow models behind one protocol: encode prompts, velocity (with CFG), decode.

``load_flow_model`` loads ``model.path``: a diffusers SD3-family pipeline (hub id
or local directory) or a built-in task's base model (``builtin:digits``, the CPU
default job's; ``fdfo.tasks`` builds and caches it on first use). Both go through
``SD3FlowModel`` and the same ``from_pretrained`` code.
"""

from __future__ import annotations

import torch

from fdfo import tasks
from fdfo.models.sd3 import Conditioning, SD3FlowModel


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_flow_model(model_cfg, device: torch.device, *, shift: float | None = None,
                    progress: bool = True) -> SD3FlowModel:
    """The model of a ``ModelConfig`` (path, revision, dtype, text length, resolution, cache_dir, attention
    backend) on ``device``."""
    path = tasks.resolve_model_path(model_cfg.path, model_cfg.cache_dir, progress=progress)
    model = SD3FlowModel(
        path, device=device, dtype=resolve_dtype(model_cfg.dtype, device), revision=model_cfg.revision,
        max_sequence_length=model_cfg.max_sequence_length, resolution=model_cfg.resolution, shift=shift,
    )
    model.set_attention_backend(model_cfg.attention_backend)
    return model


__all__ = ["Conditioning", "SD3FlowModel", "load_flow_model", "resolve_dtype"]
