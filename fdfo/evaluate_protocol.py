"""A whole evaluation protocol in one command: the base model and each checkpoint, every prompt set and
metric of the protocol (``fdfo.protocol``), one table with the row to beat.

    python -m fdfo.evaluate --protocol published --adapter runs/sd35-medium/checkpoints/epoch_0100 \\
        --out eval/published --path hpsv2=weights/hpsv2-hf dreamsim_diversity=weights/dreamsim
    torchrun --nproc_per_node 8 -m fdfo.evaluate --protocol published ...   # prompts sharded over the ranks
    python -m fdfo.evaluate --protocol digits --model builtin:digits --adapter runs/digits --out eval/digits

Sampling: the deterministic Euler sampler with the settings ``fdfo.inference.sampling_defaults`` gives:
the checkpoints' run config (all checkpoints must agree), else the published ones (docs/algorithm.md §5:
40 steps, guidance 1.0, i.e. no CFG); ``--steps``/``--guidance``/... override them for every model.
Prompt ``i`` of a set is sampled with seeds ``--seed`` + 0, 1, ... by every model from the same latents.

Resuming: each image is written to ``--out``/images/<set>/<model>/ as soon as it is made (atomically),
and a rerun of the same command makes only the images that are not there yet; scores are computed
from the files on disk and kept per (set, model, metric) under ``scores/`` until those images change.
``--out`` remembers the settings that made its images (``settings.json``): a command with other
settings (steps, adapters, prompts, seed, ...) is refused. ``--max-new-images N`` stops each rank
after N new images (for jobs with a time limit: rerun until the table is written).

Output: ``protocol.md`` (a row per model and the published row; "n/a" with a footnote for a metric
whose weights are not at hand), ``protocol.json`` (every value, per prompt too) and ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fdfo import atomic, cli, distributed
from fdfo import protocol as protocols
from fdfo.image_store import ImageStore
from fdfo.metrics import metric_paths
from fdfo.outputs import check_out_dir
from fdfo.protocol_run import (Plan, generate_missing, markdown_table, read_set, record_settings, resolve_models,
                               results_json, score, select_metrics, write_grid)
from fdfo.rewards import DIVERSITY_METRICS

PROG = "fdfo.evaluate"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--protocol")
    known, _ = pre.parse_known_args(argv)
    proto = protocols.get(known.protocol)  # (an unknown name: one line, from main)

    p = argparse.ArgumentParser(prog="python -m fdfo.evaluate", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--protocol", required=True, metavar="NAME", help=f"one of: {', '.join(protocols.PROTOCOLS)}")
    p.add_argument("--adapter", action="append", default=[], metavar="CKPT",
                   help=f"a checkpoint to evaluate ({cli.CHECKPOINT_FORMS}); repeat for several. The base model "
                        "is evaluated once, beside them")
    p.add_argument("--model", help="base model (default: the checkpoints' run config"
                                   + (f", else {proto.model}" if proto.model else "") + ")")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; rerun the same command to resume")
    for s in proto.prompt_sets:
        p.add_argument(f"--prompts-{s.name}", dest=f"prompts_{s.name}", metavar="FILE",
                       help=f"{s.title} (default: {s.default}; the first {s.size or 'all'}); metrics: "
                            + ", ".join(s.metrics))
    p.add_argument("--metrics", nargs="+", metavar="NAME", help="evaluate only these of the protocol's metrics "
                                                f"({', '.join(proto.metrics)})")
    p.add_argument("--max-prompts", type=int, metavar="N", help="at most N prompts of each set (a smoke run)")
    p.add_argument("--repeats", type=int, metavar="N", help=f"images per prompt (default: {proto.repeats})")
    p.add_argument("--seed", type=int, default=0)
    cli.add_sampling_arguments(p)
    cli.add_metric_arguments(p)
    p.add_argument("--grid-prompts", type=int, default=3, help="prompts of each set in grid.png (0: no grid)")
    p.add_argument("--max-new-images", type=int, metavar="N", help="stop each rank after N new images")
    return p.parse_args(argv), proto


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, proto = parse_args(argv)
        cli.check_args(args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return cli.run_ranked(PROG, args, lambda rank, world: run(args, proto, rank, world))


# --------------------------------------------------------------------------- checks before any model loads


def prepare(args, proto: protocols.Protocol, rank: int) -> Plan:
    """Everything that can be checked before a model loads: numbers, metrics, prompt files, checkpoints,
    their base model and sampling settings, and (on rank 0) --out and the settings its images were made with."""
    for flag, least in (("max_prompts", 1), ("repeats", 1), ("grid_prompts", 0), ("max_new_images", 1)):
        value = getattr(args, flag)
        if value is not None and value < least:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {least} (got {value})")
    metrics = select_metrics(args.metrics, proto)
    repeats = args.repeats or proto.repeats
    if repeats < 2 and any(m in DIVERSITY_METRICS for m in metrics):
        raise ValueError("the diversity metrics compare the repeats of a prompt: give --repeats 2 or more, or leave "
                         "them out with --metrics")
    sets = [read_set(s, getattr(args, f"prompts_{s.name}"), args.max_prompts, [m for m in s.metrics if m in metrics])
            for s in proto.prompt_sets if any(m in metrics for m in s.metrics)]
    models, settings = resolve_models(args.adapter, args.model, proto, cli.sampling_overrides(args))
    run_config = next((m.ckpt.run_config for m in models if m.ckpt and m.ckpt.run_config), None)
    paths = metric_paths(args.path, metrics, run_config)
    out = check_out_dir(args.out, "--out", create=True) if rank == 0 else Path(args.out)
    plan = Plan(proto, sets, models, settings, repeats, [args.seed + r for r in range(repeats)], paths, out,
                dtype=args.dtype, device=args.device, batch_size=args.batch_size, reward_device=args.reward_device,
                reward_batch_size=args.reward_batch_size)
    if rank == 0:
        record_settings(plan)
    return plan


# --------------------------------------------------------------------------- the run


def run(args, proto: protocols.Protocol, rank: int, world: int) -> int:
    t0 = time.time()
    error, plan = None, None
    try:
        plan = prepare(args, proto, rank)
    except (FileNotFoundError, ValueError) as exc:
        error = str(exc)
    error = distributed.first_error(error)
    if error:
        raise ValueError(error)
    distributed.barrier()  # settings.json is written and stale temporary files are gone
    store = ImageStore(plan.out / "images")
    if not generate_missing(plan, store, rank, world, args.max_new_images):
        distributed.print0(f"stopped after --max-new-images {args.max_new_images} new images on a rank; rerun the "
                           "same command to continue")
        return 0
    distributed.barrier()  # every rank's images are on disk
    error = None
    try:
        values, notes = score(plan, store, rank, world)
    except (FileNotFoundError, ValueError) as exc:  # (an image that other ranks cannot see, or cannot read)
        error, values, notes = str(exc), {}, {}
    error = distributed.first_error(error)
    if error:
        raise ValueError(error)
    if rank == 0:
        results = results_json(plan, values, notes, world, time.time() - t0)
        atomic.write_text(plan.out / "protocol.json",
                          json.dumps(atomic.finite_or_null(results), indent=1, allow_nan=False))
        table = markdown_table(results)
        atomic.write_text(plan.out / "protocol.md", table)
        if args.grid_prompts:
            write_grid(plan, store, plan.out / "grid.png", args.grid_prompts)
        print(table)
        print(f"[fdfo] table -> {plan.out / 'protocol.md'}, values -> {plan.out / 'protocol.json'}")
    return 0
