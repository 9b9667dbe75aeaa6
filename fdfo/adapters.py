"""LoRA adapters in peft's own format: ``adapter_config.json`` + ``adapter_model.safetensors``.

That is what ``PeftModel.save_pretrained`` writes, and the format of the published FDFO
adapters (one hub subfolder per reward and CFG setting). This module reads such a directory
(local, or ``owner/name/sub/folder`` on the hub, downloading only those two files) into a flow
model's transformer, for ``fdfo.generate``, ``fdfo.evaluate`` and a run that starts from it
(``lora.init_adapter``), and writes our own adapters in it too (every checkpoint's ``adapter/``
holds both this and diffusers' ``pytorch_lora_weights.safetensors``), so peft-based tools read ours.

Weight names: peft saves a ``PeftModel``'s adapter as ``base_model.model.<module>.lora_A.weight``;
the module names are the transformer's own (the adapter was made on the bare transformer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter (or another checkpoint's weights file) that cannot be read, or an adapter that does not fit
    the model: one line naming the file and the fix."""


def is_peft_adapter(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def locate(spec: str, revision: str | None = None) -> Path:
    """A local adapter directory, or ``owner/name[/sub/folder]`` (a hub repository and the subfolder that holds
    the adapter) downloaded to the hub cache (its two files only). A spec is local when it exists, starts
    like a path (``.``, ``/``, ``~``) or its first component is a local directory (a mistyped
    ``runs/x/...`` stays a local path that does not exist, never a hub request)."""
    local = Path(spec).expanduser()
    first = Path(spec.split("/", 1)[0]).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")) or "/" not in spec or first.is_dir():
        return local
    owner, name, *sub = spec.split("/")
    from huggingface_hub import hf_hub_download

    subfolder = "/".join(sub) or None
    try:
        files = [hf_hub_download(f"{owner}/{name}", f, subfolder=subfolder, revision=revision)
                 for f in (CONFIG_FILE, WEIGHTS_FILE)]
    except Exception as exc:  # network errors, a missing repository or subfolder
        raise AdapterError(f"'{spec}' is neither a local directory nor an adapter the hub gave "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give a "
                           "local path, or download the adapter's folder first (huggingface-cli download REPO "
                           "--include 'SUBFOLDER/*') and give its path") from exc
    return Path(files[0]).parent


@dataclass
class PeftAdapter:
    """An adapter read from disk: its peft config and its weights under the transformer's module names."""

    path: Path
    config: object  # peft.LoraConfig
    state: dict[str, torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.config.r)


def read_config(path: Path):
    """The adapter's peft LoraConfig (a one-line AdapterError if it is missing, unreadable or not LoRA)."""
    from peft import LoraConfig, PeftConfig

    file = path / CONFIG_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AdapterError(f"'{path}' has no {CONFIG_FILE}: not a peft adapter directory") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"'{file}' is not valid JSON ({exc}); download or export the adapter again") from exc
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"'{file}' is not a LoRA adapter config (peft_type "
                           f"{raw.get('peft_type') if isinstance(raw, dict) else '?'})")
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterError(f"'{file}' is not a peft adapter config peft can read ({exc})") from exc
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"'{file}' is a {type(config).__name__}, not a LoRA adapter config")
    return config


def safetensors_header(file: Path, fix: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor name -> shape, and the metadata, of a safetensors file (its header only: no weights are read);
    a file that cannot be read is an AdapterError naming it, ending with ``fix``."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise AdapterError(f"'{file}' is not a readable safetensors file ({exc}); {fix}") from exc


def header(path: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Weight name (the transformer's module names) -> shape, from the safetensors header only, and the
    adapter's target module names: what ``fdfo.trained_checkpoint.check_checkpoint`` compares with a model."""
    shapes, _ = safetensors_header(path / WEIGHTS_FILE, "download or export the adapter again")
    config = read_config(path)
    targets = config.target_modules
    plain = isinstance(targets, (list, set, tuple)) and not (config.exclude_modules or config.layers_to_transform)
    return ({k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in shapes.items()},
            sorted(targets) if plain else [])


def read(path: Path) -> PeftAdapter:
    from safetensors.torch import load_file

    config = read_config(path)
    file = path / WEIGHTS_FILE
    try:
        raw = load_file(str(file))
    except Exception as exc:
        raise AdapterError(f"'{file}' is not a readable safetensors file ({exc}); download or export the "
                           "adapter again") from exc
    return PeftAdapter(path, config, {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()})


def load_into(transformer: torch.nn.Module, adapter: PeftAdapter, *, trainable: bool = False,
              dtype: torch.dtype | None = None) -> None:
    """Add the adapter to ``transformer`` (as its "default" adapter) with its weights: every weight must land
    in a LoRA layer of the model and every LoRA layer must get its weights, else AdapterError. ``dtype``: the
    adapter's weights' dtype (None: the adapted layers', as peft makes them), set before the weights are
    read, so an fp32 file loads into fp32 weights exactly."""
    from peft import set_peft_model_state_dict

    config = adapter.config
    config.inference_mode = not trainable
    transformer.add_adapter(config)
    if dtype is not None:
        for name, p in transformer.named_parameters():
            if "lora_" in name and p.dtype != dtype:
                p.data = p.data.to(dtype)
    try:
        result = set_peft_model_state_dict(transformer, adapter.state, adapter_name="default")
    except RuntimeError as exc:  # size mismatches
        first = str(exc).strip().splitlines()
        raise AdapterError(f"adapter '{adapter.path}' does not fit this model ({first[-1] if first else exc})") from exc
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        what = (f"weights for layers the model lacks, e.g. {unexpected[0]}" if unexpected
                else f"no weights for the model's LoRA layer {missing[0]}")
        raise AdapterError(f"adapter '{adapter.path}' does not fit this model ({what})")
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(trainable)


def save(transformer: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write ``state`` (``get_peft_model_state_dict`` of the transformer: module names) and the transformer's
    adapter config the way ``PeftModel.save_pretrained`` does."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    transformer.peft_config["default"].save_pretrained(str(directory))
