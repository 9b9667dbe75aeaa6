"""Images from a base model plus an optional FDFO checkpoint: a PNG grid and one PNG per image.

    python -m fdfo.generate --model stabilityai/stable-diffusion-3.5-medium \\
        --adapter runs/sd35-medium/checkpoints/epoch_0100 --prompts prompts/examples.txt \\
        --seeds 0 1 2 3 --guidance 1.0 --steps 40 --out samples/
    python -m fdfo.generate --adapter runs/digits --prompt "a handwritten digit seven" --seeds 0 1 2

``--adapter`` takes a checkpoint directory (``.../checkpoints/epoch_XXXX``), its
``adapter/`` folder, or a run directory (its latest checkpoint). A checkpoint
remembers its run's config, which supplies the defaults of ``--model``,
``--steps``, ``--guidance``, the resolution and the text length.

Sampling is the deterministic Euler sampler of evaluation (no churn) from
one Gaussian latent per (prompt, seed): the same seed gives the same image
whatever the batch size or the other prompts.

Output in ``--out``: ``grid.png`` (one row per prompt, one column per seed),
``images/pPPPP_sSEED.png`` and ``generation.json`` (settings and file list).

A mistake on the command line (a prompt file that is missing, empty or not
UTF-8, an ``--out`` that cannot be written, a checkpoint of another base model,
a number out of range) is one line on stderr and exit status 1, found before
the model is loaded (a resolution the model cannot take: once it is loaded,
before any sampling).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fdfo import adapters, distributed, tasks
from fdfo.models import Conditioning, FlowModel, family_of, family_options, load_flow_model
from fdfo.sampling import sample_deterministic

PUBLISHED = {"steps": 40, "guidance": 1.0, "max_sequence_length": 128, "resolution": None}
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


# --------------------------------------------------------------------------- checkpoints


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
    for adapter, run_dir in ((path, path.parent), (path / "adapter", path)):
        if (adapter / LORA_FILE).is_file():
            return Checkpoint("lora", adapter, _run_config(run_dir))
        if adapters.is_peft_adapter(adapter):
            return Checkpoint("lora", adapter, _run_config(run_dir), peft=True)
    if (path / "transformer" / "config.json").is_file():
        return Checkpoint("full", path / "transformer", _run_config(path))
    raise FileNotFoundError(f"'{path}' holds no checkpoint (no pytorch_lora_weights.safetensors, peft adapter "
                            "files, adapter/ or transformer/, and no checkpoints/latest)")


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


def _safetensors_header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor name -> shape, and the metadata, of a safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"'{file}' is not a readable safetensors file ({exc}); copy or export the "
                         "checkpoint again") from exc


def _lora_problems(transformer: nn.Module, adapter_dir: Path) -> list[str]:
    if adapters.is_peft_adapter(adapter_dir) and not (adapter_dir / LORA_FILE).is_file():
        shapes, targets = adapters.header(adapter_dir)  # peft's names: the transformer's modules
        shapes = {f"transformer.{k}": v for k, v in shapes.items()}
    else:
        shapes, metadata = _safetensors_header(adapter_dir / LORA_FILE)
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
        shapes.update(_safetensors_header(file)[0])
    model = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    problems = [f"weight {k} is {list(shapes[k])} in the checkpoint and {list(v)} in the model"
                for k, v in model.items() if k in shapes and shapes[k] != v]
    problems += [f"the checkpoint lacks the model's weight {k}" for k in model if k not in shapes]
    problems += [f"the checkpoint has weight {k}, which the model lacks" for k in shapes if k not in model]
    return problems


# --------------------------------------------------------------------------- model and sampling


def sampling_defaults(model_path: str | None, run_config: dict | None) -> dict:
    """steps, guidance, negative prompt, shift, text length, resolution and the model family's own options
    (FLUX's guidance): the run's, else those of the built-in task's default job (for a ``builtin:``
    model), else the published ones."""
    out = dict(PUBLISHED, negative_prompt="", shift=None, model=model_path, revision=None, cache_dir=None,
               model_options={})
    if run_config is None and tasks.is_builtin(model_path):
        from fdfo.config import build_config

        run_config = build_config(tasks.preset(model_path)).to_dict()
    if run_config:
        m, s = run_config["model"], run_config["sampling"]
        out.update(model=model_path or m["path"], steps=s["steps"], guidance=s["guidance_scale"],
                   negative_prompt=s.get("negative_prompt", ""), shift=s.get("shift"),
                   max_sequence_length=m["max_sequence_length"], resolution=m["resolution"],
                   revision=m.get("revision"), cache_dir=m.get("cache_dir"),
                   model_options={k: m[k] for k, default in family_options().items()
                                  if m.get(k) is not None and m[k] != default})  # (the default: as if unset)
    return out


def seed_latents(model: FlowModel, seeds: list[int]) -> torch.Tensor:
    """One Gaussian latent per seed, drawn on the CPU: identical on every device and batch size."""
    return torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def generate_images(model: FlowModel, prompts: list[str], seeds: list[int], *, steps: int,
                    guidance: float = 1.0, negative_prompt: str = "", batch_size: int = 8) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] for the N (prompt, seed) items (deterministic Euler, optional CFG)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    sigmas = model.sigmas(steps)
    uncond = model.encode([negative_prompt]) if guidance != 1.0 else None
    out = []
    for i in range(0, len(prompts), batch_size):
        cond: Conditioning = model.encode(prompts[i:i + batch_size])
        latents = seed_latents(model, seeds[i:i + batch_size]).to(model.device)
        x0 = sample_deterministic(lambda x, t: model.velocity(x, t, cond, guidance, uncond), latents, sigmas)
        out.append(model.decode(x0).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- pictures


def to_pil(image: torch.Tensor, min_side: int = 0):
    """[C, H, W] in [0, 1] -> PIL image (grey for one channel), upscaled (nearest) to at least min_side."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0], "L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    if min_side and min(pil.size) < min_side:
        k = math.ceil(min_side / min(pil.size))
        pil = pil.resize((pil.width * k, pil.height * k), Image.NEAREST)
    return pil


def image_grid(rows: list[list[torch.Tensor | None]], row_labels: list[str], col_labels: list[str],
               captions: list[list[str]] | None = None, min_side: int = 96, label_width: int = 220):
    """A labelled grid: rows of images [C, H, W] (None leaves a blank cell), optional caption under each."""
    from PIL import Image, ImageDraw

    first = next(img for row in rows for img in row if img is not None)
    cell = to_pil(first, min_side).size
    pad, header = 6, 16
    cap_h = 12 * max((len(c.splitlines()) for row in captions for c in row), default=0) if captions else 0
    step_y = cell[1] + cap_h + pad
    width = label_width + max(len(r) for r in rows) * (cell[0] + pad) + pad
    canvas = Image.new("RGB", (width, header + len(rows) * step_y + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * (cell[0] + pad) + pad, 2), text, fill="black")
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = header + r * step_y + pad
        for k, line in enumerate(_wrap(text, 34)[: max(1, (cell[1] + cap_h) // 12)]):
            draw.text((4, y + 12 * k), line, fill="black")
        for c, img in enumerate(row):
            x = label_width + c * (cell[0] + pad) + pad
            if img is not None:
                canvas.paste(to_pil(img, min_side).convert("RGB").resize(cell), (x, y))
            if captions and captions[r][c]:
                draw.multiline_text((x, y + cell[1] + 1), captions[r][c], fill="black", spacing=1)
    return canvas


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m fdfo.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="diffusers pipeline directory (SD3/SD3.5 or FLUX.1), hub id or builtin:digits "
                                   "(default: the checkpoint's run config)")
    p.add_argument("--adapter", help=f"checkpoint: {CHECKPOINT_FORMS}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file with one prompt per line (or builtin:digits)")
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    add_sampling_arguments(p)
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


# What --adapter takes (generate, evaluate and the evaluation protocol).
CHECKPOINT_FORMS = ("a run dir, checkpoints/epoch_XXXX or its adapter/ folder, a peft adapter folder, or "
                    "owner/name/subfolder on the hub")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler settings that override a checkpoint's run config, and the batch, dtype and device of
    sampling: the same flags in every command that samples images."""
    p.add_argument("--guidance", type=float, help="CFG scale (1.0 = none)")
    p.add_argument("--negative-prompt", help="the unconditional prompt of CFG (default: empty)")
    p.add_argument("--steps", type=int, help="Euler steps")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the run's, else the model's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda if available, else cpu")


def check_args(args) -> None:
    """The numbers and devices of a generate/evaluate command line, before anything is loaded."""
    for key in ("steps", "resolution", "max_sequence_length", "batch_size", "reward_batch_size"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1 (got {value})")
    check_device(args.device, "--device")


def run_ranked(prog: str, args, body) -> int:
    """An evaluation command on this process's rank: joins the process group a multi-rank launcher set up
    (none otherwise), puts the rank on its GPU, runs ``body(rank, world)`` and turns a FileNotFoundError or
    ValueError into one line on stderr and exit status 1."""
    created = not torch.distributed.is_initialized()
    device = distributed.init(deepspeed=False)  # a process group only under a multi-rank launcher
    if args.device is None and device.type == "cuda":
        args.device = str(device)
    if args.device and args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    try:
        return body(distributed.rank(), distributed.world_size())
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if created:
            distributed.close()


def check_device(spec: str | None, flag: str) -> None:
    """A device name torch knows; a CUDA device only where there is one."""
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"{flag} '{spec}' is not a device; give e.g. cpu, cuda or cuda:1") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} '{spec}': this machine has no CUDA device; give {flag} cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} '{spec}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def prepare_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output directory and make sure a file can be written in it (a probe file, removed)."""
    out = Path(path).expanduser()
    fix = "give a directory that can be created and written to"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} '{path}' is an existing file, not a directory; {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fdfo-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{flag} '{path}' cannot be written ({exc.strerror or exc}); {fix}") from exc
    return out


def read_prompts(args) -> list[str]:
    """The prompts of ``--prompts`` (a file or a built-in set) or ``--prompt``."""
    from fdfo.prompts import load_prompts

    if not args.prompts:
        return list(args.prompt)
    return load_prompts(args.prompts)  # (a missing, unreadable or empty file: one line, from load_prompts)


def resolve(args) -> tuple[Checkpoint | None, dict]:
    """Checkpoint (not yet applied) and the sampling settings of a generate/evaluate command, without
    loading a model: a missing base model, or a checkpoint that does not fit a local base model, is an
    error here already."""
    ckpt = resolve_checkpoint(args.adapter) if args.adapter else None
    settings = sampling_defaults(args.model, ckpt.run_config if ckpt else None)
    for key in ("steps", "guidance", "negative_prompt", "resolution", "max_sequence_length"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if settings["model"] is None:
        raise FileNotFoundError("no --model given and the checkpoint carries no run config naming one")
    if not tasks.is_builtin(settings["model"]):
        family = family_of(settings["model"], settings["revision"])  # missing or unsupported: one line
        if ckpt is not None:
            transformer = _meta_transformer(family, settings["model"], settings["revision"])
            if transformer is not None:
                check_checkpoint(transformer, ckpt, settings["model"])
    return ckpt, settings


def _meta_transformer(family: type[FlowModel], path: str, revision: str | None) -> nn.Module | None:
    """The base model's transformer built from its config on the meta device (shapes, no weights), when
    its config is at hand (a local directory or the hub cache); else None and the check waits for the load."""
    try:
        cls = family.transformer_class()
        local = Path(path).expanduser()
        if local.is_dir():
            config = cls.load_config(str(local / "transformer"))
        else:
            config = cls.load_config(path, subfolder="transformer", revision=revision, local_files_only=True)
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # an early check only: the real load reports whatever is wrong with the model
        return None


def load_model(args, settings: dict) -> FlowModel:
    from fdfo.config import ModelConfig

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = ModelConfig(path=settings["model"], revision=settings["revision"], dtype=args.dtype,
                            max_sequence_length=settings["max_sequence_length"], resolution=settings["resolution"],
                            cache_dir=settings["cache_dir"], **settings["model_options"])
    return load_flow_model(model_cfg, device, shift=settings["shift"])


def check_model(model: FlowModel, ckpt: Checkpoint | None, settings: dict) -> None:
    """What can only be checked against the loaded model, before any sampling: the resolution and
    whether the checkpoint fits (for a base model whose config was not at hand before loading)."""
    resolution = settings["resolution"]
    if resolution is not None:
        step, largest = model.resolution_step()
        if resolution % step or (largest and resolution > largest):
            upto = f" up to {largest}" if largest else ""
            raise ValueError(f"resolution {resolution} does not suit base model '{settings['model']}'; "
                             f"give --resolution as a multiple of {step}{upto}")
    if ckpt is not None:
        check_checkpoint(model.transformer, ckpt, settings["model"])


def setup(args) -> tuple[FlowModel, Checkpoint | None, dict]:
    """Model, checkpoint (checked, not yet applied) and the resolved sampling settings of a command."""
    ckpt, settings = resolve(args)
    model = load_model(args, settings)
    check_model(model, ckpt, settings)
    return model, ckpt, settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # every mistake of the command line is found before the model is loaded, where it can be
        check_args(args)
        duplicates = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if duplicates:
            raise ValueError(f"--seeds lists {', '.join(map(str, duplicates))} more than once; give each seed once")
        prompts = read_prompts(args)
        ckpt, settings = resolve(args)
        out = prepare_out_dir(args.out)
        model = load_model(args, settings)
        check_model(model, ckpt, settings)
        if ckpt is not None:
            apply_checkpoint(model, ckpt)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fdfo.generate: error: {exc}", file=sys.stderr)
        return 1
    items = [(i, s) for i in range(len(prompts)) for s in args.seeds]
    images = generate_images(model, [prompts[i] for i, _ in items], [s for _, s in items], steps=settings["steps"],
                             guidance=settings["guidance"], negative_prompt=settings["negative_prompt"],
                             batch_size=args.batch_size)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for (i, s), img in zip(items, images):
        name = f"images/p{i:04d}_s{s}.png"
        to_pil(img).save(out / name)
        files.append({"file": name, "prompt": prompts[i], "seed": s})
    rows = [[images[k * len(args.seeds) + j] for j in range(len(args.seeds))] for k in range(len(prompts))]
    image_grid(rows, prompts, [f"seed {s}" for s in args.seeds]).save(out / "grid.png")
    (out / "generation.json").write_text(json.dumps({
        "model": settings["model"], "adapter": str(ckpt.path) if ckpt else None, "steps": settings["steps"],
        "guidance": settings["guidance"], "negative_prompt": settings["negative_prompt"],
        "resolution": list(images.shape[-2:]), "seeds": args.seeds, "images": files}, indent=1))
    print(f"[fdfo] {len(files)} images -> {out / 'grid.png'} and {out / 'images'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
