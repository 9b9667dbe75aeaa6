"""A trained checkpoint as the commands that sample take it (``--adapter``): found from what the user
gives, checked against a base model before any sampling, and loaded into it.

A checkpoint is a LoRA adapter (diffusers' ``pytorch_lora_weights.safetensors``, or peft's format: a
published adapter) or a fully fine-tuned transformer, with the run config it remembers when it has
one. The exported weights of an fdfo checkpoint (its ``adapter/`` or ``transformer/``, and its
``trainer.json``) are checked against the checkpoint's manifest as they are found (``fdfo.integrity``):
a damaged file is one line naming it and the newest checkpoint of the run that verifies. Writing
checkpoints during training and resuming from them is ``fdfo.checkpoint``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fdfo import adapters, integrity
from fdfo.checkpoint import EXPORTS, TRAINER_FILE, check_export
from fdfo.models import FlowModel

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
REREAD = "copy or export the checkpoint again"  # the fix for a weights file that cannot be read


@dataclass
class Checkpoint:
    """A trained checkpoint: a LoRA adapter directory or a fully fine-tuned transformer directory."""

    kind: str  # "lora" or "full"
    path: Path
    run_config: dict | None  # the run's RunConfig as a dict, when the checkpoint carries it
    peft: bool = False  # a LoRA adapter in peft's format only (adapter_config.json + adapter_model.safetensors)


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint from a run dir, a checkpoints/epoch_XXXX dir, an adapter dir itself (ours, diffusers'
    or peft's format), or ``owner/name/sub/folder``: a peft adapter on the hub (the published ones)."""
    path = adapters.locate(str(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; give runs/<name>, "
                                "runs/<name>/checkpoints/epoch_XXXX, its adapter/ folder, a peft adapter folder "
                                "or owner/name/subfolder on the hub")
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return resolve_checkpoint(path / "checkpoints" / latest.read_text().strip())
    for weights in ([path] if path.name in EXPORTS else [path / name for name in EXPORTS]):
        if weights.is_dir():
            _verify(weights)  # (before anything is read from it: a missing file is named here too)
    for adapter, run_dir in ((path, path.parent), (path / "adapter", path)):
        if (adapter / LORA_FILE).is_file():
            return Checkpoint("lora", adapter, _run_config(run_dir))
        if adapters.is_peft_adapter(adapter):
            return Checkpoint("lora", adapter, _run_config(run_dir), peft=True)
    if (path / "transformer" / "config.json").is_file():
        return Checkpoint("full", path / "transformer", _run_config(path))
    raise FileNotFoundError(f"'{path}' holds no checkpoint (no pytorch_lora_weights.safetensors, peft adapter "
                            "files, adapter/ or transformer/, and no checkpoints/latest)")


def _verify(weights_dir: Path) -> None:
    """The exported weights ``weights_dir`` of an fdfo checkpoint (``epoch_XXXX/adapter`` or ``/transformer``)
    against the checkpoint's manifest (CheckpointDamaged, a ValueError, when they do not match; a notice when
    the checkpoint predates manifests). Weights outside an fdfo checkpoint (a published adapter) have none."""
    checkpoint = weights_dir.parent
    if (checkpoint / integrity.MANIFEST).is_file() or (checkpoint / TRAINER_FILE).is_file():
        check_export(checkpoint, weights_dir.name)


def _run_config(checkpoint_dir: Path) -> dict | None:
    for candidate in (checkpoint_dir / "trainer.json", checkpoint_dir.parent.parent / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"'{candidate}' is not valid JSON ({exc}); restore it from the run "
                                 "directory, or remove it and give --model") from exc
            if not isinstance(data, dict):
                continue
            data = data.get("config", data)
            if isinstance(data, dict) and "model" in data:
                return data
    return None


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the base model: it was trained on another one."""


def apply_checkpoint(model: FlowModel, ckpt: Checkpoint) -> None:
    """Load the trained weights into the model: LoRA through diffusers, or the whole transformer.

    Weights that do not fit the model (a checkpoint of another base model) raise CheckpointMismatch;
    ``check_checkpoint`` finds most such cases before any sampling.
    """
    try:
        if ckpt.peft:
            model.load_adapter(ckpt.path)
        elif ckpt.kind == "lora":
            model.load_lora(ckpt.path)
        else:
            state = type(model.transformer).from_pretrained(str(ckpt.path)).state_dict()
            model.transformer.load_state_dict(state)
    except CheckpointMismatch:
        raise
    except adapters.AdapterError as exc:
        raise CheckpointMismatch(mismatch_message(ckpt, model.path, str(exc))) from exc
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. torch's "size mismatch for ..." list
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointMismatch(mismatch_message(ckpt, model.path, f"loading failed: {first}")) from exc
    model.transformer.requires_grad_(False).eval()


def mismatch_message(ckpt: Checkpoint, model_name: str, problem: str) -> str:
    """One line: the checkpoint, the base model, what differs, and the fix."""
    trained_on = ((ckpt.run_config or {}).get("model") or {}).get("path")
    if trained_on and trained_on != model_name:
        fix = f"use the base model it was trained on: --model {trained_on}"
    elif trained_on:
        fix = (f"its run was trained on '{trained_on}', but the model found there now is another one; "
               "give the base model it was trained on with --model")
    else:
        fix = ("use the base model it was trained on (--model; its run's config.json names it as model.path)")
    return f"checkpoint '{ckpt.path}' does not fit base model '{model_name}' ({problem}); {fix}"


def check_checkpoint(transformer: nn.Module, ckpt: Checkpoint, model_name: str) -> None:
    """Raise CheckpointMismatch when the checkpoint's weights do not fit ``transformer``.

    Reads only the safetensors headers (names and shapes), so it also works on a transformer
    built on the meta device from the base model's config, before any weights are loaded. A LoRA
    layer that the model lacks, or whose input/output width differs from the model's layer, is a
    mismatch; so is a model layer that the adapter's own target modules name but that the adapter
    has no weights for (an adapter of a shallower model). Weights in a layout not recognised here
    are left to the loader, whose errors ``apply_checkpoint`` turns into the same message.
    """
    problems = (_lora_problems if ckpt.kind == "lora" else _full_problems)(transformer, ckpt.path)
    if problems:
        more = f", and {len(problems) - 1} more like it" if len(problems) > 1 else ""
        raise CheckpointMismatch(mismatch_message(ckpt, model_name, problems[0] + more))


def _lora_problems(transformer: nn.Module, adapter_dir: Path) -> list[str]:
    if adapters.is_peft_adapter(adapter_dir) and not (adapter_dir / LORA_FILE).is_file():
        shapes, targets = adapters.header(adapter_dir)  # peft's names: the transformer's modules
        shapes = {f"transformer.{k}": v for k, v in shapes.items()}
    else:
        shapes, metadata = adapters.safetensors_header(adapter_dir / LORA_FILE, REREAD)
        targets = _lora_targets(metadata)
    modules = dict(transformer.named_modules())
    problems, covered = [], set()
    for key, shape in shapes.items():
        if not key.startswith("transformer.") or len(shape) != 2:
            continue
        name, part = key[len("transformer."):], None
        for kind in ("lora_A", "lora_B"):
            if name.endswith(f".{kind}.weight"):
                name, part = name[: -len(f".{kind}.weight")], kind
        if part is None:  # a bias, a DoRA magnitude or a layout not recognised here: left to the loader
            continue
        covered.add(name)
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)
        if layer is None:
            problems.append(f"the adapter has weights for layer {name}, which the model lacks")
        elif isinstance(layer, nn.Linear):
            side, want, have = (("inputs", shape[1], layer.in_features) if part == "lora_A"
                                else ("outputs", shape[0], layer.out_features))
            if want != have:
                problems.append(f"layer {name} has {want} {side} in the adapter and {have} in the model")
    for name, layer in modules.items():
        if (targets and isinstance(layer, nn.Linear) and name not in covered
                and any(name == t or name.endswith("." + t) for t in targets)):
            problems.append(f"the adapter has no weights for the model's layer {name}")
    return list(dict.fromkeys(problems))


def _lora_targets(metadata: dict[str, str]) -> list[str]:
    """The adapter's target module names from diffusers' LoRA metadata, when they are a plain list that
    applies to every matching layer (no layer selection); else none (no check of layers the adapter lacks)."""
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return []
    cfg = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or any(cfg.get(k) for k in ("exclude_modules", "layers_to_transform",
                                                                 "layers_pattern")):
        return []
    return [t for t in targets if isinstance(t, str)]


def _full_problems(transformer: nn.Module, transformer_dir: Path) -> list[str]:
    files = sorted(transformer_dir.glob("*.safetensors"))
    if not files:
        return []
    shapes = {}
    for file in files:
        shapes.update(adapters.safetensors_header(file, REREAD)[0])
    model = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    problems = [f"weight {k} is {list(shapes[k])} in the checkpoint and {list(v)} in the model"
                for k, v in model.items() if k in shapes and shapes[k] != v]
    problems += [f"the checkpoint lacks the model's weight {k}" for k in model if k not in shapes]
    problems += [f"the checkpoint has weight {k}, which the model lacks" for k in shapes if k not in model]
    return problems
