"""Convert the released HPSv2 weights (an open_clip checkpoint) to a transformers ``CLIPModel`` directory.

    python -m fdfo.rewards.convert_hpsv2 HPS_v2.1_compressed.pt weights/hpsv2-hf [--arch ViT-H-14]
    python -m fdfo.evaluate ... --metrics hpsv2 --path hpsv2=weights/hpsv2-hf

HPSv2 (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) is open_clip's ``CLIP`` model
fine-tuned from ViT-H-14; the file is ``{"state_dict": ...}`` (keys possibly prefixed with
``module.``) or the state dict itself. The transformers configuration is derived from the
open_clip model configuration named by ``--arch`` (a name of the ``model_configs`` that ship in
the open_clip_torch wheel, read as a file, or a JSON file in that format): widths, layers, heads,
patch and image size, context length, vocabulary, projection width, MLP ratio, layer-norm eps
and activation. Every weight is checked against it (a missing, extra or misshapen weight is an
error naming it). Beside the model (``save_pretrained``) the directory gets:

* the CLIP BPE tokenizer (a transformers ``CLIPTokenizer``), rebuilt offline from the
  vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` that ships in the open_clip_torch wheel,
  i.e. open_clip's own tokenizer, with the model's context length;
* an image processor with open_clip's evaluation transform: resize the shortest side to the
  image size (bicubic), centre crop, scale to [0, 1], normalise with the model's mean and std.

For square images (generated images are) this is also exactly what HPSv2's own ``score``
does (it resizes the longest side and pads to a square, a no-op for square images). For
non-square ones HPSv2's ``score`` letterboxes while this crops the centre; and transformers
centres a crop by rounding down, torchvision by rounding half to even, which can shift a crop
by one pixel where the cropped margin is 3 (mod 4) pixels.

The output directory is written atomically (a temporary sibling, renamed into place); an
existing non-empty directory is refused. Mistakes are one line on stderr and exit status 1.
Nothing is downloaded: the open_clip_torch wheel (``scripts/bootstrap.sh`` installs it) is read
as files, never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

PROG = "python -m fdfo.rewards.convert_hpsv2"
CHECKPOINT_HINT = "give the HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt) as downloaded"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults (open_clip/constants.py)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_BOS, CLIP_EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> of the CLIP BPE vocabulary

# open_clip options that change the network; the converter handles their default value only.
_VISION_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                    "act_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                    "timm_model_name": None}
_TEXT_DEFAULTS = {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
                  "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "act_kwargs": None,
                  "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                  "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
                  "hf_tokenizer_name": None}
_TOP_DEFAULTS = {"custom_text": False, "init_logit_bias": None, "multimodal_cfg": None}


class ConversionError(ValueError):
    """A mistake in the input or the output directory: reported as one line."""


# --------------------------------------------------------------------------- the open_clip configuration


def _open_clip_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the open_clip_torch wheel (its model configurations and CLIP vocabulary) is not "
                              "installed; run `bash scripts/bootstrap.sh` or "
                              "`pip install --no-deps open_clip_torch==3.3.0`")
    return Path(list(spec.submodule_search_locations)[0])


def open_clip_config(arch: str) -> tuple[str, dict]:
    """(name, config) of an open_clip architecture: a JSON file, or a name from the wheel's model_configs."""
    path = Path(arch).expanduser()
    if arch.endswith(".json") or path.is_file():
        source = path
    else:
        source = _open_clip_dir() / "model_configs" / f"{arch}.json"
        if not source.is_file():
            raise ConversionError(f"unknown --arch '{arch}': open_clip_torch has no model configuration of that "
                                  "name; give one such as ViT-H-14 (HPSv2's) or a JSON file in its format")
    try:
        cfg = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"--arch '{arch}' cannot be read as an open_clip model configuration "
                              f"({exc}); give a name such as ViT-H-14 or a JSON file") from exc
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ConversionError(f"--arch '{arch}' is not an open_clip model configuration (it needs embed_dim, "
                              "vision_cfg and text_cfg); give a name such as ViT-H-14 or such a JSON file")
    return (source.stem if source.parent.name == "model_configs" else str(arch)), cfg


def _check_supported(name: str, cfg: dict) -> None:
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    for part, given, defaults in (("", cfg, _TOP_DEFAULTS), ("vision_cfg.", vision, _VISION_DEFAULTS),
                                  ("text_cfg.", text, _TEXT_DEFAULTS)):
        for key, default in defaults.items():
            value = given.get(key, default)
            if value != default and not (key == "block_type" and value == "default"):
                raise ConversionError(f"--arch {name}: {part}{key} = {value!r} is not supported (a transformers "
                                      "CLIPModel has no such part); HPSv2 is a plain ViT CLIP such as ViT-H-14")
    if not isinstance(vision.get("layers", 12), int):
        raise ConversionError(f"--arch {name} has a ResNet image tower; only ViT towers can be converted")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and (len(size) != 2 or size[0] != size[1]):
        raise ConversionError(f"--arch {name}: image_size {size} is not square; only square images are supported")
    pre = cfg.get("preprocess_cfg") or {}
    if pre.get("interpolation", "bicubic") != "bicubic" or pre.get("resize_mode", "shortest") != "shortest":
        raise ConversionError(f"--arch {name}: preprocessing {pre} is not supported (only a bicubic resize of the "
                              "shortest side and a centre crop)")
    if any(set(tower.get("norm_kwargs") or {}) - {"eps"} for tower in (vision, text)):
        raise ConversionError(f"--arch {name}: norm_kwargs other than eps are not supported")


def clip_config(name: str, cfg: dict):
    """The transformers ``CLIPConfig`` of open_clip model configuration ``cfg``."""
    from transformers import CLIPConfig

    from fdfo.models.tiny import CLIP_VOCAB_SIZE

    _check_supported(name, cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip: nn.GELU (exact) unless quick_gelu
    eps_v, eps_t = ((tower.get("norm_kwargs") or {}).get("eps", 1e-5) for tower in (vision, text))
    width_v, width_t = vision.get("width", 768), text.get("width", 512)
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    vocab = text.get("vocab_size", 49408)
    if vocab != CLIP_VOCAB_SIZE:
        raise ConversionError(f"--arch {name}: a text vocabulary of {vocab} tokens is not the CLIP BPE vocabulary "
                              f"({CLIP_VOCAB_SIZE}); only CLIP-tokenized models are supported")
    text_config = dict(vocab_size=vocab, hidden_size=width_t,
                       intermediate_size=int(width_t * text.get("mlp_ratio", 4.0)),
                       num_hidden_layers=text.get("layers", 12), num_attention_heads=text.get("heads", 8),
                       max_position_embeddings=text.get("context_length", 77), hidden_act=act, layer_norm_eps=eps_t,
                       projection_dim=cfg["embed_dim"], bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
                       pad_token_id=CLIP_EOS)
    vision_config = dict(hidden_size=width_v, intermediate_size=int(width_v * vision.get("mlp_ratio", 4.0)),
                         num_hidden_layers=vision.get("layers", 12),
                         num_attention_heads=width_v // vision.get("head_width", 64), image_size=size,
                         patch_size=vision.get("patch_size", 16), hidden_act=act, layer_norm_eps=eps_v,
                         projection_dim=cfg["embed_dim"])
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg["embed_dim"])


# --------------------------------------------------------------------------- the weights


def _block_keys(oc: str, hf: str, width: int, mlp: int) -> dict[str, tuple[str, tuple]]:
    """open_clip key of one residual block -> (transformers key, open_clip shape); in_proj is split later."""
    keys = {f"{oc}.ln_1.weight": (f"{hf}.layer_norm1.weight", (width,)),
            f"{oc}.ln_1.bias": (f"{hf}.layer_norm1.bias", (width,)),
            f"{oc}.attn.in_proj_weight": (f"{hf}.self_attn.{{}}_proj.weight", (3 * width, width)),
            f"{oc}.attn.in_proj_bias": (f"{hf}.self_attn.{{}}_proj.bias", (3 * width,)),
            f"{oc}.attn.out_proj.weight": (f"{hf}.self_attn.out_proj.weight", (width, width)),
            f"{oc}.attn.out_proj.bias": (f"{hf}.self_attn.out_proj.bias", (width,)),
            f"{oc}.ln_2.weight": (f"{hf}.layer_norm2.weight", (width,)),
            f"{oc}.ln_2.bias": (f"{hf}.layer_norm2.bias", (width,)),
            f"{oc}.mlp.c_fc.weight": (f"{hf}.mlp.fc1.weight", (mlp, width)),
            f"{oc}.mlp.c_fc.bias": (f"{hf}.mlp.fc1.bias", (mlp,)),
            f"{oc}.mlp.c_proj.weight": (f"{hf}.mlp.fc2.weight", (width, mlp)),
            f"{oc}.mlp.c_proj.bias": (f"{hf}.mlp.fc2.bias", (width,))}
    return keys


def key_map(config) -> dict[str, tuple[str, tuple]]:
    """Every open_clip CLIP weight -> (transformers CLIPModel key, its open_clip shape)."""
    t, v, d = config.text_config, config.vision_config, config.projection_dim
    grid = v.image_size // v.patch_size
    keys = {
        "logit_scale": ("logit_scale", ()),
        "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", (t.vocab_size, t.hidden_size)),
        "positional_embedding": ("text_model.embeddings.position_embedding.weight",
                                 (t.max_position_embeddings, t.hidden_size)),
        "ln_final.weight": ("text_model.final_layer_norm.weight", (t.hidden_size,)),
        "ln_final.bias": ("text_model.final_layer_norm.bias", (t.hidden_size,)),
        "text_projection": ("text_projection.weight", (t.hidden_size, d)),  # x @ P in open_clip: transposed
        "visual.class_embedding": ("vision_model.embeddings.class_embedding", (v.hidden_size,)),
        "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight",
                                (v.hidden_size, 3, v.patch_size, v.patch_size)),
        "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight",
                                        (grid * grid + 1, v.hidden_size)),
        "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", (v.hidden_size,)),
        "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", (v.hidden_size,)),
        "visual.ln_post.weight": ("vision_model.post_layernorm.weight", (v.hidden_size,)),
        "visual.ln_post.bias": ("vision_model.post_layernorm.bias", (v.hidden_size,)),
        "visual.proj": ("visual_projection.weight", (v.hidden_size, d)),  # transposed too
    }
    for i in range(t.num_hidden_layers):
        keys.update(_block_keys(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", t.hidden_size,
                                t.intermediate_size))
    for i in range(v.num_hidden_layers):
        keys.update(_block_keys(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}",
                                v.hidden_size, v.intermediate_size))
    return keys


def _few(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def convert_state_dict(state: dict, config, *, source: str = "the checkpoint", arch: str = "the --arch") -> dict:
    """open_clip CLIP state dict -> transformers CLIPModel state dict, every key and shape checked."""
    keys = key_map(config)
    ignored = {k for k in state if k.endswith("attn_mask")}  # a buffer some open_clip versions saved
    missing, unexpected = set(keys) - set(state), set(state) - set(keys) - ignored
    fix = f"give the HPSv2 checkpoint itself, or the --arch it was trained with (here {arch})"
    if missing:
        raise ConversionError(f"'{source}' lacks {len(missing)} weight(s) of an open_clip {arch} CLIP model "
                              f"({_few(missing)}); {fix}")
    if unexpected:
        raise ConversionError(f"'{source}' holds {len(unexpected)} weight(s) that an open_clip {arch} CLIP model "
                              f"does not have ({_few(unexpected)}); {fix}")
    out = {}
    for oc_key, (hf_key, shape) in keys.items():
        value = state[oc_key]
        if tuple(value.shape) != shape:
            raise ConversionError(f"'{source}': {oc_key} has shape {tuple(value.shape)}, an open_clip {arch} CLIP "
                                  f"model needs {shape}; {fix}")
        if oc_key in ("text_projection", "visual.proj"):
            value = value.t()
        if "{}" in hf_key:  # in_proj: q, k and v stacked
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[hf_key.format(name)] = part
        else:
            out[hf_key] = value
    return {k: v.contiguous() for k, v in out.items()}


def load_checkpoint(path: str | Path) -> dict:
    """The open_clip state dict of an HPSv2 checkpoint: ``{"state_dict": ...}`` or a bare state dict,
    without any ``module.`` prefix (tensors only: the file is read with ``weights_only``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"'{path}' " + ("is a directory" if path.is_dir() else "does not exist")
                              + f"; {CHECKPOINT_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways (zip, pickle, EOF, ...)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConversionError(f"'{path}' is not a readable PyTorch checkpoint ({reason}); {CHECKPOINT_HINT} "
                              "(download it again if it may be truncated)") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"'{path}' is a PyTorch file but not a model checkpoint (no state dict of tensors, "
                              f"as in {{'state_dict': {{name: tensor}}}}); {CHECKPOINT_HINT}")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_dtype(state: dict) -> torch.dtype:
    """The floating dtype most of the checkpoint's weights have."""
    counts = Counter(v.dtype for v in state.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


# --------------------------------------------------------------------------- tokenizer and image processor


def clip_image_processor(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """open_clip's evaluation transform as a transformers processor: shortest side -> image_size (bicubic),
    centre crop, /255, normalise."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    from transformers.image_utils import PILImageResampling

    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                     resample=PILImageResampling.BICUBIC, image_mean=list(mean), image_std=list(std),
                     do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, do_convert_rgb=True)


# --------------------------------------------------------------------------- the command


def convert(checkpoint: str | Path, out_dir: str | Path, arch: str = "ViT-H-14", dtype: str = "auto") -> Path:
    """Write the transformers CLIPModel directory of an HPSv2 open_clip checkpoint; returns it."""
    from transformers import CLIPModel

    from fdfo import atomic
    from fdfo.models.tiny import clip_tokenizer
    from fdfo.outputs import check_out_dir

    out = check_out_dir(out_dir, "OUT_DIR", empty=True)  # before anything is loaded
    out.parent.mkdir(parents=True, exist_ok=True)  # the model is written beside it, then renamed into place
    name, oc_cfg = open_clip_config(arch)
    config = clip_config(name, oc_cfg)
    tokenizer = clip_tokenizer(config.text_config.max_position_embeddings)  # (fails early without the wheel)
    state = load_checkpoint(checkpoint)
    hf_state = convert_state_dict(state, config, source=str(checkpoint), arch=name)
    target = checkpoint_dtype(state) if dtype == "auto" else getattr(torch, dtype)
    del state
    model = CLIPModel(config).eval()
    model.load_state_dict(hf_state, strict=True)
    del hf_state
    model.to(target)
    pre = oc_cfg.get("preprocess_cfg") or {}
    processor = clip_image_processor(config.vision_config.image_size, pre.get("mean", OPENAI_CLIP_MEAN),
                                     pre.get("std", OPENAI_CLIP_STD))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic.replace_dir(tmp, out)
    except OSError as exc:
        raise ConversionError(f"OUT_DIR '{out_dir}' could not be written ({exc.strerror or exc}); give a "
                              "directory on a file system with room for the model") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", metavar="IN.pt", help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the transformers model")
    p.add_argument("--arch", default="ViT-H-14", help="open_clip model name (its model_configs) or a JSON "
                                                      "file in that format (default: ViT-H-14, HPSv2's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the saved weights (auto: the checkpoint's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out_dir, args.arch, args.dtype)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fdfo.rewards.convert_hpsv2: error: {exc}", file=sys.stderr)
        return 1
    print(f"[fdfo] HPSv2 -> {out} (transformers CLIPModel with tokenizer and image processor); "
          f"use it with --path hpsv2={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
