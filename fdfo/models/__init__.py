"""Flow models behind one protocol (``fdfo.models.base.FlowModel``), one file per model family.

``load_flow_model`` loads ``model.path``: a diffusers pipeline directory or hub id of a supported
family (recognised by the transformer class its ``model_index.json`` names), or a built-in task's
base model (``builtin:digits``, the CPU default job's; ``fdfo.tasks`` builds and caches it on
first use). Every family loads through ``from_pretrained``.

Adding a family: one file with a ``FlowModel`` subclass (see ``fdfo/models/base.py`` for what it
implements), its entry in ``FAMILIES`` and a tiny random pipeline in ``fdfo/models/tiny.py`` for
its tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fdfo import hub, tasks
from fdfo.errors import ConfigError
from fdfo.models.base import HUB_FIX, Conditioning, FlowModel, model_index
from fdfo.models.flux import FluxFlowModel
from fdfo.models.sd3 import SD3FlowModel

FAMILIES: tuple[type[FlowModel], ...] = (SD3FlowModel, FluxFlowModel)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def family_of(path: str, revision: str | None = None) -> type[FlowModel]:
    """The family of a pipeline directory or hub id, from the transformer class in its model_index.json."""
    index = model_index(path, revision)
    transformer = index.get("transformer")
    name = transformer[1] if isinstance(transformer, list) and len(transformer) == 2 else None
    for family in FAMILIES:
        if name == family.TRANSFORMER:
            return family
    supported = ", ".join(f"{f.family} ({f.TRANSFORMER})" for f in FAMILIES)
    raise ConfigError(f"model.path '{path}' is a {index.get('_class_name', 'pipeline')} whose transformer is "
                      f"{name or 'missing'}: not a supported model family; supported: {supported}")


def family_for(model_cfg) -> type[FlowModel]:
    """The family of ``model.path`` without building or loading anything: a built-in task's declared
    family, else the one its model_index.json names."""
    if tasks.is_builtin(model_cfg.path):
        name = tasks.get(model_cfg.path).family
        return next(f for f in FAMILIES if f.family == name)
    return family_of(model_cfg.path, model_cfg.revision)


def load_flow_model(model_cfg, device: torch.device, *, options=None, shift: float | None = None,
                    progress: bool = True) -> FlowModel:
    """The model of a ``ModelConfig`` (path, revision, dtype, text length, resolution, cache_dir, attention
    backend) on ``device``, with ``options``: the family's own settings (an instance of its ``Options``;
    None = their defaults). The family and the attention backend are checked before any weight is read."""
    path = tasks.resolve_model_path(model_cfg.path, model_cfg.cache_dir, progress=progress)
    if not Path(path).expanduser().is_dir():  # a hub id: its cached snapshot when the hub is off or out of reach
        path = hub.resolve(path, "model.path", HUB_FIX, revision=model_cfg.revision, cache_dir=model_cfg.cache_dir)
    family = family_of(path, model_cfg.revision)
    family.check_settings(model_cfg)
    if options is None and family.Options is not None:
        options = family.Options()
    model = family(
        path, device=device, dtype=resolve_dtype(model_cfg.dtype, device), revision=model_cfg.revision,
        max_sequence_length=model_cfg.max_sequence_length, resolution=model_cfg.resolution, shift=shift,
        **(dataclasses.asdict(options) if options is not None else {}),
    )
    model.set_attention_backend(model_cfg.attention_backend)
    return model


__all__ = ["FAMILIES", "Conditioning", "FlowModel", "FluxFlowModel", "SD3FlowModel", "family_for", "family_of",
           "load_flow_model", "resolve_dtype"]
