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
import sys

from fdfo import cli, inference, progress
from fdfo.images import image_grid, to_pil
from fdfo.outputs import check_out_dir
from fdfo.trained_checkpoint import apply_checkpoint


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m fdfo.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    cli.add_source_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    cli.add_sampling_arguments(p)
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress.quiet_libraries()
    try:  # every mistake of the command line is found before the model is loaded, where it can be
        cli.check_args(args)
        duplicates = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if duplicates:
            raise ValueError(f"--seeds lists {', '.join(map(str, duplicates))} more than once; give each seed once")
        prompts = cli.read_prompts(args)
        ckpt, settings = inference.resolve(args.adapter, args.model, cli.sampling_overrides(args))
        out = check_out_dir(args.out, "--out", create=True)
        model = inference.load_model(settings, args.device, args.dtype)
        inference.check_model(model, ckpt, settings)
        if ckpt is not None:
            apply_checkpoint(model, ckpt)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fdfo.generate: error: {exc}", file=sys.stderr)
        return 1
    items = [(i, s) for i in range(len(prompts)) for s in args.seeds]
    images = inference.generate_images(model, [prompts[i] for i, _ in items], [s for _, s in items],
                                       steps=settings["steps"], guidance=settings["guidance"],
                                       negative_prompt=settings["negative_prompt"], batch_size=args.batch_size,
                                       show_progress="generate")
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
