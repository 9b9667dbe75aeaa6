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
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fdfo import tasks
from fdfo.models import Conditioning, SD3FlowModel, load_flow_model
from fdfo.sampling import sample_deterministic

PUBLISHED = {"steps": 40, "guidance": 1.0, "max_sequence_length": 128, "resolution": None}


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A trained checkpoint: a LoRA adapter directory or a fully fine-tuned transformer directory."""

    kind: str  # "lora" or "full"
    path: Path
    run_config: dict | None  # the run's RunConfig as a dict, when the checkpoint carries it


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint from a run dir, a checkpoints/epoch_XXXX dir, or an adapter dir itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; give runs/<name>, "
                                "runs/<name>/checkpoints/epoch_XXXX or its adapter/ folder")
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return resolve_checkpoint(path / "checkpoints" / latest.read_text().strip())
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return Checkpoint("lora", path, _run_config(path.parent))
    if (path / "adapter" / "pytorch_lora_weights.safetensors").is_file():
        return Checkpoint("lora", path / "adapter", _run_config(path))
    if (path / "transformer" / "config.json").is_file():
        return Checkpoint("full", path / "transformer", _run_config(path))
    raise FileNotFoundError(f"'{path}' holds no checkpoint (no pytorch_lora_weights.safetensors, adapter/ or "
                            "transformer/, and no checkpoints/latest)")


def _run_config(checkpoint_dir: Path) -> dict | None:
    for candidate in (checkpoint_dir / "trainer.json", checkpoint_dir.parent.parent / "config.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            data = data.get("config", data)
            if isinstance(data, dict) and "model" in data:
                return data
    return None


def apply_checkpoint(model: SD3FlowModel, ckpt: Checkpoint) -> None:
    """Load the trained weights into the model: LoRA through diffusers, or the whole transformer."""
    if ckpt.kind == "lora":
        model.pipe.load_lora_weights(str(ckpt.path))
    else:
        from diffusers import SD3Transformer2DModel

        state = SD3Transformer2DModel.from_pretrained(str(ckpt.path)).state_dict()
        model.transformer.load_state_dict(state)
    model.transformer.requires_grad_(False).eval()


# --------------------------------------------------------------------------- model and sampling


def sampling_defaults(model_path: str | None, run_config: dict | None) -> dict:
    """steps, guidance, negative prompt, shift, text length, resolution: the run's, else those of the
    built-in task's default job (for a ``builtin:`` model), else the published ones."""
    out = dict(PUBLISHED, negative_prompt="", shift=None, model=model_path, revision=None, cache_dir=None)
    if run_config is None and tasks.is_builtin(model_path):
        from fdfo.config import build_config

        run_config = build_config(tasks.preset(model_path)).to_dict()
    if run_config:
        m, s = run_config["model"], run_config["sampling"]
        out.update(model=model_path or m["path"], steps=s["steps"], guidance=s["guidance_scale"],
                   negative_prompt=s.get("negative_prompt", ""), shift=s.get("shift"),
                   max_sequence_length=m["max_sequence_length"], resolution=m["resolution"],
                   revision=m.get("revision"), cache_dir=m.get("cache_dir"))
    return out


def seed_latents(model: SD3FlowModel, seeds: list[int]) -> torch.Tensor:
    """One Gaussian latent per seed, drawn on the CPU: identical on every device and batch size."""
    return torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def generate_images(model: SD3FlowModel, prompts: list[str], seeds: list[int], *, steps: int,
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
    p.add_argument("--model", help="diffusers SD3 pipeline directory, hub id or builtin:digits "
                                   "(default: the checkpoint's run config)")
    p.add_argument("--adapter", help="checkpoint: run dir, checkpoints/epoch_XXXX or its adapter/ folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file with one prompt per line (or builtin:digits)")
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    p.add_argument("--guidance", type=float, help="CFG scale (1.0 = none)")
    p.add_argument("--negative-prompt", help="the unconditional prompt of CFG (default: empty)")
    p.add_argument("--steps", type=int, help="Euler steps")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the run's, else the model's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def setup(args) -> tuple[SD3FlowModel, Checkpoint | None, dict]:
    """Model, checkpoint (not yet applied) and the resolved sampling settings of a generate/evaluate command."""
    from fdfo.config import ModelConfig

    ckpt = resolve_checkpoint(args.adapter) if args.adapter else None
    settings = sampling_defaults(args.model, ckpt.run_config if ckpt else None)
    for key in ("steps", "guidance", "negative_prompt", "resolution", "max_sequence_length"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if settings["model"] is None:
        raise FileNotFoundError("no --model given and the checkpoint carries no run config naming one")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = ModelConfig(path=settings["model"], revision=settings["revision"], dtype=args.dtype,
                            max_sequence_length=settings["max_sequence_length"], resolution=settings["resolution"],
                            cache_dir=settings["cache_dir"])
    model = load_flow_model(model_cfg, device, shift=settings["shift"])
    return model, ckpt, settings


def main(argv: list[str] | None = None) -> int:
    from fdfo.prompts import load_prompts

    args = parse_args(argv)
    try:
        prompts = load_prompts(args.prompts) if args.prompts else list(args.prompt)
        model, ckpt, settings = setup(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fdfo.generate: error: {exc}", file=sys.stderr)
        return 1
    if ckpt is not None:
        apply_checkpoint(model, ckpt)
    items = [(i, s) for i in range(len(prompts)) for s in args.seeds]
    images = generate_images(model, [prompts[i] for i, _ in items], [s for _, s in items], steps=settings["steps"],
                             guidance=settings["guidance"], negative_prompt=settings["negative_prompt"],
                             batch_size=args.batch_size)
    out = Path(args.out)
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
