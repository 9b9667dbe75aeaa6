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
import html
import json
import sys
import time
from pathlib import Path

import torch

from fdfo import atomic, distributed
from fdfo.generate import (CHECKPOINT_FORMS, Checkpoint, add_sampling_arguments, apply_checkpoint, check_args,
                           check_device, check_model, generate_images, image_grid, load_model, prepare_out_dir,
                           read_prompts, resolve, run_ranked, to_pil)
from fdfo.rewards import (DIVERSITY_METRICS, RewardUnavailable, build_diversity, build_reward, mean_pairwise_distance,
                          report_nonfinite)

PUBLISHED_METRICS = ["pickscore", "vlm_alignment", "clip_score", "clip_score_h14", "hpsv2", "dreamsim_diversity"]


# --------------------------------------------------------------------------- metrics


def build_metrics(names: list[str], paths: dict[str, str], device: torch.device, *, batch_size: int,
                  cache_dir: str | None = None, reward_device: str | None = None) -> tuple[dict, dict]:
    """Metric name -> scorer (rewards) or image embedder (diversity metrics); and name -> note (what a
    diversity metric is, or why a metric is not available).

    The models run on ``reward_device`` when given, else on ``device`` (the generator's).
    """
    metrics, notes = {}, {}
    device = torch.device(reward_device) if reward_device else device
    for name in names:
        try:
            if name in DIVERSITY_METRICS:
                metrics[name] = build_diversity(name, paths.get(name), device, batch_size=batch_size)
                notes[name] = metrics[name].note
            else:
                metrics[name] = build_reward(name, paths.get(name), device, cache_dir, batch_size=batch_size)
        except RewardUnavailable as exc:
            notes[name] = "not available: " + str(exc).split("not available: ", 1)[-1]
    return metrics, notes


@torch.no_grad()
def evaluate_model(model, prompts: list[str], seeds: list[int], metrics: dict, settings: dict, *, rank: int = 0,
                   world_size: int = 1, batch_size: int = 8, report_prompts: int = 8, report_repeats: int = 4) -> dict:
    """Scores of the model's images: prompt i is sampled on rank i % world_size with every seed.

    Returns (identical on every rank) per-prompt means [n, M] of the M score metrics, per-prompt
    values [n, K] of the K diversity metrics, the overall means, non-finite counts, and the report
    images and their scores.
    """
    scorers = [k for k in metrics if k not in DIVERSITY_METRICS]
    diversities = [k for k in metrics if k in DIVERSITY_METRICS]
    n, R, M = len(prompts), len(seeds), len(scorers)
    sums, counts, nonfinite = torch.zeros(n, M, dtype=torch.float64), torch.zeros(n, M), torch.zeros(M)
    diversity = torch.zeros(n, len(diversities), dtype=torch.float64)
    shown_p, shown_r = min(n, report_prompts), min(R, report_repeats)
    channels = model.image_channels()
    report_images = torch.zeros(shown_p, shown_r, channels, *model.image_size(), dtype=torch.uint8)  # 8-bit: small
    report_scores = torch.zeros(shown_p, shown_r, M)
    embeddings: dict[tuple[int, int], list[torch.Tensor]] = {}  # (prompt, diversity metric) -> embeddings
    items = [(i, r) for i in range(rank, n, world_size) for r in range(R)]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        p = [prompts[i] for i, _ in chunk]
        images = generate_images(model, p, [seeds[r] for _, r in chunk], steps=settings["steps"],
                                 guidance=settings["guidance"], negative_prompt=settings["negative_prompt"],
                                 batch_size=batch_size).to(model.device)
        scores = torch.zeros(len(chunk), M)
        for m, name in enumerate(scorers):
            s = metrics[name](p, images).float().cpu()
            nonfinite[m] += report_nonfinite(name, p, s)
            scores[:, m] = s
        for d, name in enumerate(diversities):
            emb = metrics[name].embed_images(images).cpu()
            for k, (i, _) in enumerate(chunk):
                embeddings.setdefault((i, d), []).append(emb[k])
        for k, (i, r) in enumerate(chunk):
            finite = torch.isfinite(scores[k])
            sums[i] += torch.where(finite, scores[k], 0.0).double()
            counts[i] += finite.float()
            if i < shown_p and r < shown_r:
                report_images[i, r] = (images[k].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
                report_scores[i, r] = scores[k]
    for (i, d), embs in embeddings.items():
        diversity[i, d] = mean_pairwise_distance(torch.stack(embs))
    # Every rank reduces the same tensors (a rank without prompts contributes zeros); the report
    # images one prompt at a time, so that their float64 sum stays small.
    sums, counts, nonfinite, diversity, report_scores = (
        distributed.sum_over_ranks(t) for t in (sums, counts, nonfinite, diversity, report_scores))
    for i in range(shown_p):
        report_images[i] = distributed.sum_over_ranks(report_images[i]).to(torch.uint8)
    per_prompt = (sums / counts.clamp(min=1)).float().masked_fill(counts == 0, float("nan"))
    means = {name: float(sums[:, m].sum() / counts[:, m].sum().clamp(min=1)) if counts[:, m].sum() else float("nan")
             for m, name in enumerate(scorers)}
    for d, name in enumerate(diversities):
        finite = torch.isfinite(diversity[:, d])
        means[name] = float(diversity[finite, d].mean()) if finite.any() else float("nan")
    return {"scorers": scorers, "per_prompt": per_prompt, "diversities": diversities,
            "diversity": diversity.float(), "means": means,
            "nonfinite": {name: int(nonfinite[m]) for m, name in enumerate(scorers)},
            "report_images": report_images, "report_scores": report_scores}


# --------------------------------------------------------------------------- outputs


def results_json(prompts: list[str], seeds: list[int], settings: dict, ckpt: Checkpoint | None, notes: dict,
                 variants: dict[str, dict], world_size: int, seconds: float) -> dict:
    names = list(next(iter(variants.values()))["means"])
    metrics = {}
    for name in names:
        entry = {v: res["means"][name] for v, res in variants.items()}
        if "base" in entry and "checkpoint" in entry:
            entry["delta"] = entry["checkpoint"] - entry["base"]
        metrics[name] = entry
    per_prompt = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for v, res in variants.items():
            vals = {name: float(res["per_prompt"][i, m]) for m, name in enumerate(res["scorers"])}
            for d, name in enumerate(res["diversities"]):
                vals[name] = float(res["diversity"][i, d])
            row[v] = vals
        per_prompt.append(row)
    return {
        "model": settings["model"], "checkpoint": str(ckpt.path) if ckpt else None, "prompts": len(prompts),
        "repeats": len(seeds), "seeds": seeds, "steps": settings["steps"], "guidance": settings["guidance"],
        "world_size": world_size, "seconds": round(seconds, 2), "metrics": metrics, "notes": notes,
        "nonfinite": {v: res["nonfinite"] for v, res in variants.items()}, "per_prompt": per_prompt,
    }


def write_report(out: Path, prompts: list[str], seeds: list[int], variants: dict[str, dict], results: dict) -> None:
    """report.png (rows: prompts; columns: base seeds | checkpoint seeds) and report.html with the scores."""
    first = next(iter(variants.values()))
    shown_p, shown_r = first["report_images"].shape[:2]
    scorers = first["scorers"]
    rows, captions, cells = [], [], []
    for i in range(shown_p):
        row, cap, cell = [], [], []
        for v, res in variants.items():
            for r in range(shown_r):
                img = res["report_images"][i, r].float() / 255
                name = f"images/{v}/p{i:04d}_s{seeds[r]}.png"
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                to_pil(img).save(out / name)
                text = "\n".join(f"{s[:10]} {float(res['report_scores'][i, r, m]):.3g}" for m, s in enumerate(scorers))
                row.append(img), cap.append(text), cell.append((name, text))
        rows.append(row), captions.append(cap), cells.append(cell)
    cols = [f"{v} seed {seeds[r]}" for v in variants for r in range(shown_r)]
    if any(rows):
        image_grid(rows, prompts[:shown_p], cols, captions=captions).save(out / "report.png")

    esc = html.escape
    head = "".join(f"<th>{esc(v)}</th>" for v in variants) + ("<th>delta</th>" if len(variants) == 2 else "")
    table = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{entry.get(v, float('nan')):.4g}</td>" for v in variants)
        + (f"<td>{entry['delta']:+.4g}</td>" if "delta" in entry else "") + "</tr>"
        for name, entry in results["metrics"].items())
    notes = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in results["notes"].items())
    body = "".join(
        f"<tr><td class=p>{esc(prompts[i])}</td>" + "".join(
            f"<td><img src='{esc(name)}'><br><pre>{esc(text)}</pre></td>" for name, text in cells[i]) + "</tr>"
        for i in range(shown_p))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fdfo evaluation</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:4px}} td.p{{max-width:18em}}
img{{width:192px;image-rendering:pixelated}} pre{{margin:0;font-size:11px}} table{{border-collapse:collapse}}</style>
</head><body><h2>fdfo evaluation</h2>
<p>model: {esc(str(results['model']))}<br>checkpoint: {esc(str(results['checkpoint']))}<br>
{results['prompts']} prompts × {results['repeats']} seeds, {results['steps']} steps, guidance {results['guidance']},
{results['world_size']} rank(s), {results['seconds']} s</p>
<table border=1><tr><th>metric</th>{head}</tr>{table}</table><ul>{notes}</ul>
<table><tr><th>prompt</th>{''.join(f'<th>{esc(c)}</th>' for c in cols)}</tr>{body}</table></body></html>"""
    (out / "report.html").write_text(page, encoding="utf-8")


# --------------------------------------------------------------------------- command line


def add_metric_arguments(p: argparse.ArgumentParser) -> None:
    """Where the metric models' weights are, and how they run (evaluate and the evaluation protocol)."""
    p.add_argument("--path", nargs="+", default=[], metavar="NAME=DIR", help="weights of a metric")
    p.add_argument("--reward-batch-size", type=int, default=8)
    p.add_argument("--reward-device", help="run the metric models on another device, e.g. cuda:1")


def metric_paths(specs: list[str], metrics: list[str], run_config: dict | None) -> dict[str, str]:
    """Weights of each metric: ``--path NAME=DIR``, else the run config's reward.paths (else the metric's
    default). A malformed spec, a metric not evaluated, or a local directory that does not exist: one line."""
    paths = {k: v for k, v in ((run_config or {}).get("reward", {}).get("paths", {}) or {}).items() if k in metrics}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not eq or not name or not value:
            raise ValueError(f"--path '{spec}' must look like NAME=DIR")
        if name not in metrics:
            raise ValueError(f"--path '{spec}' names metric '{name}', which is not evaluated here "
                             f"({', '.join(metrics)}); check its spelling or add it to --metrics")
        local = Path(value).expanduser()
        if value != "builtin" and not local.exists() and (value.startswith((".", "/", "~")) or value.count("/") != 1):
            raise FileNotFoundError(f"--path '{spec}': '{value}' does not exist; give the directory of the "
                                    f"metric's weights (or a hub id owner/name)")
        paths[name] = value
    return paths


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m fdfo.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="diffusers pipeline directory (SD3/SD3.5 or FLUX.1), hub id or builtin:digits "
                                   "(default: the checkpoint's run config)")
    p.add_argument("--adapter", help=f"checkpoint: {CHECKPOINT_FORMS} (none: evaluate the base model only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file with one prompt per line (or builtin:digits)")
    src.add_argument("--prompt", nargs="+", help="one or more prompts")
    p.add_argument("--metrics", nargs="+", help="reward names and/or diversity metrics (" + ", ".join(DIVERSITY_METRICS)
                   + "; default: the run config's rewards and eval metrics, else " + " ".join(PUBLISHED_METRICS) + ")")
    p.add_argument("--repeats", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base", action="store_true", help="only the checkpoint")
    add_sampling_arguments(p)
    add_metric_arguments(p)
    p.add_argument("--report-prompts", type=int, default=8)
    p.add_argument("--report-repeats", type=int, default=4)
    p.add_argument("--out", default="eval", help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--protocol" or a.startswith("--protocol=") for a in argv):
        from fdfo import evaluate_protocol

        return evaluate_protocol.main(argv)
    args = parse_args(argv)
    try:  # the same on every rank: each stops here with the same message
        check_args(args)
        check_device(args.reward_device, "--reward-device")
    except ValueError as exc:
        print(f"fdfo.evaluate: error: {exc}", file=sys.stderr)
        return 1
    return run_ranked("fdfo.evaluate", args, lambda rank, world: _run(args, rank, world))


def _prepare(args, rank: int) -> tuple:
    """Everything about the command line that can be checked before a model is loaded: prompts, numbers,
    metric names, checkpoint, base model, and (on rank 0, which writes it) the output directory."""
    prompts = read_prompts(args)
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    for flag in ("report_prompts", "report_repeats"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base leaves nothing to evaluate without --adapter; give a checkpoint or drop --no-base")
    ckpt, settings = resolve(args)
    run = ckpt.run_config if ckpt else None
    names = args.metrics or (list(dict.fromkeys([*run["reward"]["weights"], *run["eval"]["metrics"]])) if run
                             else PUBLISHED_METRICS)
    _check_metric_names(names)
    if args.metrics and set(args.metrics) & set(DIVERSITY_METRICS) and args.repeats < 2:
        raise ValueError("the diversity metrics compare the repeats of a prompt: give --repeats 2 or more")
    paths = metric_paths(args.path, names, run)
    out = prepare_out_dir(args.out) if rank == 0 else Path(args.out)
    return prompts, ckpt, settings, names, paths, out


def _check_metric_names(names: list[str]) -> None:
    from fdfo.rewards import reward_factories

    known = [*sorted(reward_factories()), *DIVERSITY_METRICS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown metric '{unknown[0]}'; available metrics: {', '.join(known)}")


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
        model = load_model(args, settings)
    check_model(model, ckpt, settings)  # on every rank alike, before the metrics are loaded and anything sampled
    with distributed.rank0_first():
        metrics, notes = build_metrics(names, paths, model.device, batch_size=args.reward_batch_size,
                                       cache_dir=settings["cache_dir"], reward_device=args.reward_device)
    seeds = [args.seed + r for r in range(args.repeats)]
    kw = dict(rank=rank, world_size=world, batch_size=args.batch_size, report_prompts=args.report_prompts,
              report_repeats=args.report_repeats)
    variants = {}
    if ckpt is None or not args.no_base:
        variants["base"] = evaluate_model(model, prompts, seeds, metrics, settings, **kw)
    if ckpt is not None:
        apply_checkpoint(model, ckpt)
        variants["checkpoint"] = evaluate_model(model, prompts, seeds, metrics, settings, **kw)
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
