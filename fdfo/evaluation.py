"""A checkpoint against its base model over a prompt set, paired: every prompt sampled with the same seeds
by each, the images scored by each metric, and the results and their side-by-side report.

Rank r of a multi-rank run samples prompts r, r + world, ...; the sums are reduced over the ranks, so
every rank holds the whole result and rank 0 writes it.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from fdfo import distributed, inference, progress
from fdfo.images import image_grid, quantize, to_pil
from fdfo.rewards import DIVERSITY_METRICS, mean_pairwise_distance, report_nonfinite
from fdfo.trained_checkpoint import Checkpoint


@torch.no_grad()
def evaluate_model(model, prompts: list[str], seeds: list[int], metrics: dict, settings: dict, *, rank: int = 0,
                   world_size: int = 1, batch_size: int = 8, report_prompts: int = 8, report_repeats: int = 4,
                   show_progress: str | None = None) -> dict:
    """Scores of the model's images: prompt i is sampled on rank i % world_size with every seed.

    Returns (identical on every rank) per-prompt means [n, M] of the M score metrics, per-prompt
    values [n, K] of the K diversity metrics, the overall means, non-finite counts, and the report
    images and their scores. ``show_progress``: the label of a progress display (this rank's images made
    and scored), or None.
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
    shown = progress.bar(total=len(items), desc=show_progress or "", unit="images", enabled=bool(show_progress),
                         leave=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        shown.update(len(chunk))  # (counted as the chunk starts: the line's time covers its sampling)
        p = [prompts[i] for i, _ in chunk]
        images = inference.generate_images(model, p, [seeds[r] for _, r in chunk], steps=settings["steps"],
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
                report_images[i, r] = quantize(images[k]).cpu()
                report_scores[i, r] = scores[k]
    shown.close()
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
                img = res["report_images"][i, r]
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
