"""A trained LoRA adapter, written in the file formats that other image-generation tools load.

    python -m fdfo.export ADAPTER_OR_RUN_DIR --format kohya|diffusers|peft --out FILE_OR_DIR

The source is anything ``--adapter`` takes (``fdfo.trained_checkpoint``): a run directory (its newest
checkpoint), a ``checkpoints/epoch_XXXX`` directory, its ``adapter/`` folder, a peft adapter folder or
``owner/name/subfolder`` on the hub. It is read in peft's format (``fdfo.adapters``), which every fdfo
checkpoint and every published adapter holds.

* ``kohya`` (SD3/SD3.5): one ``.safetensors`` file, the single-file LoRA layout of kohya-style trainers
  that ComfyUI reads for SD3: per adapted module ``lora_transformer_<module path, dots as _>`` with
  ``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha``, the module
  paths being diffusers' (``transformer_blocks.0.attn.to_q``). The loader scales a module by
  ``alpha / rank``, so ``alpha`` is written to give peft's own scale (rsLoRA's ``alpha / sqrt(rank)`` too).
  FLUX.1 adapters are refused: the kohya files for FLUX.1 name BFL's fused modules, not diffusers'.
* ``diffusers``: a directory with ``pytorch_lora_weights.safetensors`` (``transformer.<module>.lora_A``
  keys and the adapter's config as metadata), what ``save_lora_weights`` writes and
  ``StableDiffusion3Pipeline``/``FluxPipeline.load_lora_weights(dir)`` load.
* ``peft``: a directory with ``adapter_config.json`` + ``adapter_model.safetensors`` (a copy).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch

from fdfo import adapters
from fdfo.trained_checkpoint import LORA_FILE, resolve_checkpoint

FORMATS = ("kohya", "diffusers", "peft")
KOHYA_PREFIX = "lora_transformer_"


def find_adapter(spec: str) -> Path:
    """The peft adapter directory of a run, checkpoint, adapter folder or hub adapter; a source without one
    is a FileNotFoundError naming it."""
    ckpt = resolve_checkpoint(spec)
    if ckpt.kind != "lora":
        raise FileNotFoundError(f"'{spec}' holds a fully fine-tuned transformer ({ckpt.path}), not a LoRA adapter: "
                                "load it with from_pretrained instead of exporting it")
    if not adapters.is_peft_adapter(ckpt.path):
        raise FileNotFoundError(f"'{ckpt.path}' has no {adapters.CONFIG_FILE} + {adapters.WEIGHTS_FILE}: give an "
                                "fdfo checkpoint's adapter/ or a peft adapter folder")
    return ckpt.path


def lora_scale(config) -> float:
    """The factor peft multiplies ``lora_B @ lora_A`` by: ``alpha / rank``, or ``alpha / sqrt(rank)`` (rsLoRA)."""
    if config.rank_pattern or config.alpha_pattern:
        raise adapters.AdapterError("adapters with per-module ranks or alphas (rank_pattern, alpha_pattern) "
                                    "cannot be exported; export a uniform adapter")
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A, lora_B) weights of a peft state under the transformer's module names."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = (down, state[f"{module}.lora_B.weight"])
    if not out or 2 * len(out) != len(state):
        raise adapters.AdapterError("the adapter holds weights other than lora_A/lora_B pairs (DoRA, biases, "
                                    "embeddings?); only plain LoRA can be exported")
    return out


def kohya_state(adapter: adapters.PeftAdapter) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI single-file state of an SD3 adapter (see the module's docstring)."""
    modules = pairs(adapter.state)
    if any(m.startswith("single_transformer_blocks.") for m in modules):
        raise adapters.AdapterError(f"'{adapter.path}' is a FLUX.1 adapter: its kohya format names BFL's fused "
                                    "modules, which fdfo does not write; use --format diffusers or peft")
    alpha = lora_scale(adapter.config) * adapter.rank
    out = {}
    for module, (down, up) in modules.items():
        name = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def export(source: Path, fmt: str, out: Path) -> Path:
    """Write the peft adapter at ``source`` as ``fmt`` to ``out`` (a file for kohya, else a directory);
    returns the file or directory written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "peft":
        out.mkdir(parents=True, exist_ok=True)
        for name in (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE):
            shutil.copyfile(source / name, out / name)
        return out
    adapter = adapters.read(source)
    if fmt == "kohya":
        if out.suffix != ".safetensors":
            out = out / "lora.safetensors" if out.is_dir() else out.with_name(out.name + ".safetensors")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(kohya_state(adapter), str(out), metadata={"format": "pt"})
        return out
    from diffusers.loaders import SD3LoraLoaderMixin

    lora_scale(adapter.config)  # (the same refusals as kohya's)
    layers = {f"{module}.{part}.weight": w for module, (a, b) in pairs(adapter.state).items()
              for part, w in (("lora_A", a), ("lora_B", b))}
    # (SD3's and FLUX.1's loaders read the same transformer.<module> layout)
    SD3LoraLoaderMixin.save_lora_weights(str(out), transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=adapter.config.to_dict())
    return out / LORA_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fdfo.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory, checkpoints/epoch_XXXX, an adapter folder or "
                                       "owner/name/subfolder on the hub")
    parser.add_argument("--format", required=True, choices=FORMATS, help="kohya: one .safetensors file (ComfyUI, "
                        "SD3); diffusers: pytorch_lora_weights.safetensors in --out; peft: the peft files in --out")
    parser.add_argument("--out", required=True, type=Path, help="the file (kohya) or directory to write")
    args = parser.parse_args(argv)
    try:
        written = export(find_adapter(args.source), args.format, args.out)
    except (FileNotFoundError, ValueError) as exc:  # (AdapterError and CheckpointDamaged are ValueErrors)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
