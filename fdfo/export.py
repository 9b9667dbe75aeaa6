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
  (FLUX.1) one ``.safetensors`` file in kohya's FLUX.1 layout, which ComfyUI, Forge and diffusers'
  ``FluxPipeline.load_lora_weights(file)`` read: BFL's module names (``lora_unet_double_blocks_<i>_img_attn_qkv``,
  ``lora_unet_single_blocks_<i>_linear1``, ...), where one fused module holds several of diffusers'
  stacked along its output (``FLUX_DOUBLE``, ``FLUX_SINGLE``). The fused module's LoRA is exact: its
  ``lora_down`` is the pieces' ``lora_A`` one above the other, its ``lora_up`` the pieces' ``lora_B`` on the
  block diagonal (zeros for a piece the adapter leaves alone), so its rank is the pieces' count times the
  adapter's, and ``alpha`` is scaled with it. An adapter is FLUX.1's when it adapts single-stream blocks
  or when its checkpoint's run config names a FLUX.1 base. (One that adapts only double-stream blocks,
  outside an fdfo checkpoint, cannot be told from an SD3 adapter: it is written in the SD3 layout above,
  which ComfyUI also reads for FLUX.1.)
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
from types import SimpleNamespace

import torch

from fdfo import adapters
from fdfo.trained_checkpoint import LORA_FILE, Checkpoint, resolve_checkpoint

FORMATS = ("kohya", "diffusers", "peft")
KOHYA_PREFIX = "lora_transformer_"
# FLUX.1 in kohya's layout: BFL's module of a block -> the diffusers modules it fuses, in its output order.
FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
FLUX_BLOCKS = (("transformer_blocks.", "lora_unet_double_blocks_", FLUX_DOUBLE),
               ("single_transformer_blocks.", "lora_unet_single_blocks_", FLUX_SINGLE))
FLUX_MLP_RATIO = 4  # FLUX.1's MLP width over its hidden size (a single block's proj_mlp outputs)


def find_adapter(spec: str) -> Checkpoint:
    """The checkpoint of a run, checkpoint, adapter folder or hub adapter, whose ``path`` is a peft adapter
    directory; a source without one is a FileNotFoundError naming it."""
    ckpt = resolve_checkpoint(spec)
    if ckpt.kind != "lora":
        raise FileNotFoundError(f"'{spec}' holds a fully fine-tuned transformer ({ckpt.path}), not a LoRA adapter: "
                                "load it with from_pretrained instead of exporting it")
    if not adapters.is_peft_adapter(ckpt.path):
        raise FileNotFoundError(f"'{ckpt.path}' has no {adapters.CONFIG_FILE} + {adapters.WEIGHTS_FILE}: give an "
                                "fdfo checkpoint's adapter/ or a peft adapter folder")
    return ckpt


def trained_on_flux(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's run config names a FLUX.1 base (False when it has none or the base's
    model_index.json cannot be read now)."""
    model = (ckpt.run_config or {}).get("model") or {}
    if not model.get("path"):
        return False
    from fdfo.models import family_for
    from fdfo.models.flux import FluxFlowModel

    try:
        return family_for(SimpleNamespace(path=model["path"], revision=model.get("revision"))) is FluxFlowModel
    except (OSError, ValueError):  # (a base that moved, or a hub id offline: the module names decide)
        return False


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


def kohya_state(adapter: adapters.PeftAdapter, flux: bool = False) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI single-file state of an SD3 or FLUX.1 adapter (see the module's docstring);
    ``flux``: the adapter is known to be FLUX.1's."""
    modules = pairs(adapter.state)
    if flux or any(m.startswith("single_transformer_blocks.") for m in modules):
        return flux_kohya_state(adapter, modules)
    alpha = lora_scale(adapter.config) * adapter.rank
    out = {}
    for module, (down, up) in modules.items():
        name = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def flux_kohya_state(adapter: adapters.PeftAdapter, modules: dict) -> dict[str, torch.Tensor]:
    """A FLUX.1 adapter in kohya's layout of BFL's fused modules (see the module's docstring). A module
    that layout has no place for (outside the blocks, or not one of ``FLUX_DOUBLE``/``FLUX_SINGLE``'s) is
    refused with its name."""
    scale, rank = lora_scale(adapter.config), adapter.rank
    blocks: dict[tuple[str, str], dict[str, tuple]] = {}  # (BFL prefix, block index) -> piece -> (A, B)
    for module, weights in modules.items():
        for diffusers_prefix, prefix, table in FLUX_BLOCKS:
            index, _, piece = module.removeprefix(diffusers_prefix).partition(".")
            if module.startswith(diffusers_prefix) and index.isdigit() and any(piece in p for p in table.values()):
                blocks.setdefault((prefix, index), {})[piece] = weights
                break
        else:
            raise adapters.AdapterError(f"'{adapter.path}' adapts '{module}', which kohya's FLUX.1 layout has no "
                                        "module for; export it with --format diffusers or peft")
    out = {}
    for (prefix, index), present in blocks.items():
        table = next(t for _, p, t in FLUX_BLOCKS if p == prefix)
        for fused, pieces in table.items():
            if not any(p in present for p in pieces):
                continue
            down = present[next(p for p in pieces if p in present)][0]
            hidden = down.shape[1]  # (the fused module's input: that of each of its pieces)
            downs, ups = [], []
            for piece in pieces:
                if piece in present:
                    a, b = present[piece]
                else:  # a piece left alone: a zero block of its output width
                    a = torch.zeros(rank, hidden, dtype=down.dtype)
                    b = torch.zeros(_flux_width(piece, hidden, present), rank, dtype=down.dtype)
                downs.append(a)
                ups.append(b)
            name = f"{prefix}{index}_{fused}"
            out[f"{name}.lora_down.weight"] = torch.cat(downs).contiguous()
            out[f"{name}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
            out[f"{name}.alpha"] = torch.tensor(scale * rank * len(pieces), dtype=torch.float32)
    return out


def _flux_width(piece: str, hidden: int, present: dict) -> int:
    """The output width of a FLUX.1 block's module that the adapter leaves alone: an attention projection's
    is the hidden size; a single block's proj_mlp's is what its proj_out takes beyond the attention's (when
    proj_out is adapted), else FLUX.1's MLP ratio times the hidden size."""
    if piece != "proj_mlp":
        return hidden
    if "proj_out" in present:
        return present["proj_out"][0].shape[1] - hidden
    return FLUX_MLP_RATIO * hidden


def export(ckpt: Checkpoint, fmt: str, out: Path) -> Path:
    """Write the checkpoint's peft adapter as ``fmt`` to ``out`` (a file for kohya, else a directory);
    returns the file or directory written."""
    from safetensors.torch import save_file

    source = ckpt.path

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
        save_file(kohya_state(adapter, flux=trained_on_flux(ckpt)), str(out), metadata={"format": "pt"})
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
                        "SD3 and FLUX.1); diffusers: pytorch_lora_weights.safetensors in --out; peft: the peft "
                        "files in --out")
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
