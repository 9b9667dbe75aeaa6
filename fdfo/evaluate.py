"""Metrics of a checkpoint against its base model over a prompt set, with a side-by-side report.

    python -m fdfo.evaluate --adapter runs/sd35-medium/checkpoints/epoch_0100 \\
        --prompts prompts/hpdv2_photo.txt --repeats 4 --out eval/epoch_0100 \\
        --metrics pickscore vlm_alignment clip_score clip_score_h14 hpsv2 dreamsim_diversity \\
        --path hpsv2=weights/hpsv2-hf dreamsim_diversity=weights/dreamsim
    torchrun --nproc_per_node 8 -m fdfo.evaluate ...     # prompts sharded over the ranks

Every prompt is sampled ``--repeats`` times (seeds ``--seed`` + 0, 1, ...) with
the deterministic Euler sampler, once by the base model and once by the base
plus checkpoint, from the same latents: the comparison is paired.

Metrics: any reward that ``fdfo.rewards.build_reward`` knows (PickScore, the VLM
yes/no score, CLIP score with ViT-L/14 and ViT-H/14, HPSv2 where its weights
are given, the digits task's metrics), averaged over all images, and the
diversity metrics (``fdfo.rewards.DIVERSITY_METRICS``): for each prompt the
mean pairwise distance between the images of its repeats, averaged over
prompts; ``dreamsim_diversity`` is DreamSim's distance (the published figure;
weights only from a local DreamSim cache), ``clip_diversity`` is (1 − cosine)
of CLIP ViT-L/14 image embeddings (not DreamSim). Weights come from ``--path
NAME=DIR`` (default: the run config's ``reward.paths``, else the published
weights). A metric whose weights are not given (HPSv2, DreamSim) is reported as
not available. NaN/inf scores are left out of the means, counted and warned about.

Under ``torchrun``/``deepspeed`` (or any initialised torch.distributed group)
rank r evaluates prompts r, r + world, ...; sums are all-reduced and rank 0
writes ``--out``: ``results.json`` (settings, each metric for base and
checkpoint and their difference, per-prompt values), ``report.png`` and
``report.html`` (base | checkpoint images of the first ``--report-prompts``
prompts, with their scores) and ``images/{base,checkpoint}/``.

``--protocol NAME`` runs a whole evaluation protocol instead (``fdfo.evaluate_protocol``: the
published one, or a task's such as ``digits``): the base model and each ``--adapter`` on every
prompt set and metric of the protocol, resumable, into one table with the published row to beat;
``python -m fdfo.evaluate --protocol published --help`` lists its options.

A mistake on the command line (a prompt file that is missing, empty or not
UTF-8, an ``--out`` that cannot be written, an unknown metric, a checkpoint of
another base model, a number out of range) is one line on stderr and exit
status 1 on every rank, found before any model is loaded (a resolution the
model cannot take: once it is loaded, before any sampling or metric model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fdfo import atomic, cli, distributed, inference, progress
from fdfo.evaluation import evaluate_model, results_json, write_report
from fdfo.metrics import build_metrics, check_metric_names, metric_paths
from fdfo.outputs import check_out_dir
from fdfo.rewards import DIVERSITY_METRICS
from fdfo.trained_checkpoint import apply_checkpoint

PUBLISHED_METRICS = ["pickscore", "vlm_alignment", "clip_score", "clip_score_h14", "hpsv2", "dreamsim_diversity"]


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m fdfo.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    cli.add_source_arguments(p, " (none: evaluate the base model only)")
    p.add_argument("--metrics", nargs="+", help="reward names (built-in or module.path:Name) and/or diversity "
                   "metrics (" + ", ".join(DIVERSITY_METRICS) + "; default: the run config's rewards and eval "
                   "metrics, else " + " ".join(PUBLISHED_METRICS) + ")")
    p.add_argument("--repeats", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base", action="store_true", help="only the checkpoint")
    cli.add_sampling_arguments(p)
    cli.add_metric_arguments(p)
    p.add_argument("--report-prompts", type=int, default=8)
    p.add_argument("--report-repeats", type=int, default=4)
    p.add_argument("--out", default="eval", help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    progress.quiet_libraries()  # (the protocol's too)
    if any(a == "--protocol" or a.startswith("--protocol=") for a in argv):
        from fdfo import evaluate_protocol

        return evaluate_protocol.main(argv)
    args = parse_args(argv)
    try:  # the same on every rank: each stops here with the same message
        cli.check_args(args)
    except ValueError as exc:
        print(f"fdfo.evaluate: error: {exc}", file=sys.stderr)
        return 1
    return cli.run_ranked("fdfo.evaluate", args, lambda rank, world: _run(args, rank, world))


def _prepare(args, rank: int) -> tuple:
    """Everything about the command line that can be checked before a model is loaded: prompts, numbers,
    metric names, checkpoint, base model, and (on rank 0, which writes it) the output directory."""
    prompts = cli.read_prompts(args)
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    for flag in ("report_prompts", "report_repeats"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base leaves nothing to evaluate without --adapter; give a checkpoint or drop --no-base")
    ckpt, settings = inference.resolve(args.adapter, args.model, cli.sampling_overrides(args))
    run = ckpt.run_config if ckpt else None
    names = args.metrics or (list(dict.fromkeys([*run["reward"]["weights"], *run["eval"]["metrics"]])) if run
                             else PUBLISHED_METRICS)
    check_metric_names(names)
    if args.metrics and set(args.metrics) & set(DIVERSITY_METRICS) and args.repeats < 2:
        raise ValueError("the diversity metrics compare the repeats of a prompt: give --repeats 2 or more")
    paths = metric_paths(args.path, names, run)
    out = check_out_dir(args.out, "--out", create=True) if rank == 0 else Path(args.out)
    return prompts, ckpt, settings, names, paths, out


def _run(args, rank: int, world: int) -> int:
    t0 = time.time()
    error = None
    try:
        prompts, ckpt, settings, names, paths, out = _prepare(args, rank)
    except (FileNotFoundError, ValueError) as exc:
        error = str(exc)
    error = distributed.first_error(error)
    if error:
        raise ValueError(error)

    with distributed.rank0_first():  # built-in models and weights are created once, by rank 0
        model = inference.load_model(settings, args.device, args.dtype)
    inference.check_model(model, ckpt, settings)  # on every rank alike, before the metrics load and anything is sampled
    reward_device = torch.device(args.reward_device) if args.reward_device else model.device
    with distributed.rank0_first():
        metrics, notes = build_metrics(names, paths, reward_device, batch_size=args.reward_batch_size,
                                       cache_dir=settings["cache_dir"])
    seeds = [args.seed + r for r in range(args.repeats)]
    kw = dict(rank=rank, world_size=world, batch_size=args.batch_size, report_prompts=args.report_prompts,
              report_repeats=args.report_repeats)
    variants = {}
    if ckpt is None or not args.no_base:
        variants["base"] = evaluate_model(model, prompts, seeds, metrics, settings, **kw,
                                          show_progress="base model" if rank == 0 else None)
    if ckpt is not None:
        apply_checkpoint(model, ckpt)
        variants["checkpoint"] = evaluate_model(model, prompts, seeds, metrics, settings, **kw,
                                                show_progress="checkpoint" if rank == 0 else None)
    if rank == 0:
        results = results_json(prompts, seeds, settings, ckpt, notes, variants, world, time.time() - t0)
        atomic.write_text(out / "results.json",
                          json.dumps(atomic.finite_or_null(results), indent=1, allow_nan=False))
        write_report(out, prompts, seeds, variants, results)
        for name, entry in results["metrics"].items():
            print(f"[fdfo] {name}: " + "  ".join(f"{k}={v:.4g}" for k, v in entry.items()))
        for name, note in notes.items():
            if note.startswith("not available"):
                print(f"[fdfo] {name}: {note}")
        print(f"[fdfo] results -> {out / 'results.json'}, report -> {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
