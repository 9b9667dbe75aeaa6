"""An evaluation protocol run (``fdfo.protocol`` says what a protocol is): its plan, the images made and
kept on disk so that a rerun resumes, their scores (cached per set, model and metric until the images
change), and the table with the row to beat.

The plan is settled before any model loads: the prompt sets and metrics evaluated, the base model and
each checkpoint with the one set of sampling settings they share, and the settings the images of an
output directory were made with (``settings.json``), which a rerun must repeat.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fdfo import atomic, distributed, inference, progress
from fdfo import protocol as protocols
from fdfo.image_store import ImageStore
from fdfo.images import image_grid
from fdfo.metrics import build_metric, check_metric_names, diversity_note
from fdfo.rewards import DIVERSITY_METRICS, report_nonfinite
from fdfo.trained_checkpoint import Checkpoint, apply_checkpoint, resolve_checkpoint

# The settings a model's images depend on: a rerun into the same --out must repeat them.
SAMPLER_KEYS = ("steps", "guidance", "negative_prompt", "shift", "resolution", "max_sequence_length",
                "model_options")  # (model_options: a family's own, e.g. FLUX's distilled guidance)
OVERRIDE_FLAGS = {"steps": "--steps", "guidance": "--guidance", "negative_prompt": "--negative-prompt",
                  "resolution": "--resolution", "max_sequence_length": "--max-sequence-length"}


@dataclass
class Model:
    name: str  # the folder of its images, and its row
    ckpt: Checkpoint | None  # None: the base model


@dataclass
class PromptSetRun:
    spec: protocols.PromptSet
    file: str
    available: int  # prompts in the file
    prompts: list[str]  # the first spec.size (or --max-prompts) of them
    metrics: list[str]  # the protocol's metrics of this set that are evaluated


@dataclass
class Plan:
    protocol: protocols.Protocol
    sets: list[PromptSetRun]
    models: list[Model]
    settings: dict  # sampling settings (fdfo.inference.sampling_defaults + overrides)
    repeats: int
    seeds: list[int]
    paths: dict[str, str]  # metric -> weights
    out: Path
    dtype: str  # the generator's weights (auto, float32, ...)
    device: str | None  # the generator's (None: cuda if available, else cpu)
    batch_size: int  # images per sampling batch
    reward_device: str | None  # the metrics' (None: the generator's)
    reward_batch_size: int  # images per metric batch


# --------------------------------------------------------------------------- plan


def select_metrics(names: list[str] | None, proto: protocols.Protocol) -> list[str]:
    """The protocol's metrics that ``names`` (--metrics) keeps, in the protocol's order (none given: all)."""
    if not names:
        return proto.metrics
    check_metric_names(names)
    for n in names:
        if n not in proto.metrics:
            raise ValueError(f"metric '{n}' is not part of protocol '{proto.name}' (its metrics: "
                             f"{', '.join(proto.metrics)}); use plain python -m fdfo.evaluate for other metrics")
    return [m for m in proto.metrics if m in names]


def read_set(spec: protocols.PromptSet, file: str | None, max_prompts: int | None, metrics: list[str]) -> PromptSetRun:
    """The set's prompts: the first ``spec.size`` (and at most ``max_prompts``) of its file."""
    from fdfo.prompts import load_prompts

    file = file or spec.default
    try:
        prompts = load_prompts(file)
    except FileNotFoundError:
        if Path(file).expanduser().exists() or file.startswith("builtin:"):
            raise
        how = f"{spec.how_to_get}; " if spec.how_to_get else ""
        raise FileNotFoundError(f"prompt file '{file}' ({spec.title}) does not exist; {how}or give "
                                f"--prompts-{spec.name} FILE") from None
    size = min(n for n in (spec.size, max_prompts, len(prompts)) if n is not None)
    return PromptSetRun(spec, file, len(prompts), prompts[:size], metrics)


def resolve_models(adapters: list[str], model: str | None, proto: protocols.Protocol,
                   overrides: dict) -> tuple[list[Model], dict]:
    """The base ``model`` (None: the checkpoints', else the protocol's) and each checkpoint of ``adapters``
    (resolved and checked as generate/evaluate do), and the one set of sampling settings they share
    (``overrides``: those the command line gives; the others are the run config's, else the published ones)."""
    base = model
    resolved = []
    for adapter in adapters:
        if base is None and proto.model and not resolve_checkpoint(adapter).run_config:
            base = proto.model  # a bare adapter folder names no base: the protocol's own
        ckpt, settings = inference.resolve(adapter, base, overrides)
        if model is None:  # the first checkpoint's run config names the base of all
            trained_on = ((ckpt.run_config or {}).get("model") or {}).get("path")
            if resolved and trained_on and trained_on != base:
                raise ValueError(f"checkpoints '{resolved[0][0].path}' and '{ckpt.path}' were trained on different "
                                 f"base models ('{base}', '{trained_on}'); give --model to "
                                 "evaluate both against one, or evaluate them into separate --out directories")
            base = settings["model"]
        resolved.append((ckpt, settings, adapter))
    if not resolved:
        _, settings = inference.resolve(None, base or proto.model, overrides)
    else:
        settings = resolved[0][1]
        for ckpt, other, _ in resolved[1:]:
            for key in SAMPLER_KEYS:
                if other.get(key) != settings.get(key):
                    fix = (f"give {OVERRIDE_FLAGS[key]} to sample all with one value, or evaluate them into "
                           "separate --out directories") if key in OVERRIDE_FLAGS else \
                        "evaluate them into separate --out directories"
                    raise ValueError(f"checkpoints '{resolved[0][0].path}' and '{ckpt.path}' sample with different "
                                     f"{key} ({settings.get(key)!r} and {other.get(key)!r}); {fix}")
    names = ["base"]
    models = [Model("base", None)]
    for ckpt, _, spec in resolved:
        name = unique(slug(ckpt.path if Path(spec).expanduser().exists() else spec), names)
        names.append(name)
        models.append(Model(name, ckpt))
    return models, settings


def slug(path: Path | str) -> str:
    """A short folder name for a checkpoint: its run and epoch (runs/x/checkpoints/epoch_0100 -> x-epoch_0100);
    for a hub adapter (``owner/name/subfolder``, given as a string) its repository name and subfolder."""
    path = Path(path) if isinstance(path, str) else path.resolve()
    parts = [p for p in path.parts if p not in ("/", "adapter", "transformer", "checkpoints")]
    name = "-".join(parts[-2:]) or "checkpoint"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "checkpoint"


def unique(name: str, taken: list[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def settings_record(plan: Plan) -> dict:
    """What the images in --out depend on (compared on every rerun), and each set's prompts."""
    ckpts = [str(Path(m.ckpt.path).resolve()) for m in plan.models if m.ckpt]
    record = {"protocol": plan.protocol.name, "model": plan.settings["model"], "revision": plan.settings["revision"],
              "checkpoints": ckpts, **{k: plan.settings.get(k) for k in SAMPLER_KEYS}, "seed": plan.seeds[0],
              "repeats": plan.repeats, "dtype": plan.dtype,
              "sets": {s.spec.name: {"file": s.file, "prompts": len(s.prompts),
                                     "sha256": hashlib.sha256("\n".join(s.prompts).encode()).hexdigest()}
                       for s in plan.sets}}
    return json.loads(json.dumps(record))  # (as it reads back from the file)


def record_settings(plan: Plan) -> None:
    """Refuse an --out whose images were made with other settings; else (re)write its settings.json."""
    out, new = plan.out, settings_record(plan)
    file = out / "settings.json"
    store = ImageStore(out / "images")
    fix = f"give another --out, or delete '{out}' to start again"
    if file.is_file() and store.any_images():
        try:
            old = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"'{file}' is not valid JSON ({exc}); {fix}") from None
        for key, value in new.items():
            if key != "sets" and old.get(key) != value:
                raise ValueError(f"--out '{out}' holds images made with other settings ({key} {old.get(key)!r} "
                                 f"there, {value!r} here); {fix}")
        for name, entry in new["sets"].items():
            before = old.get("sets", {}).get(name)
            if before and before["sha256"] != entry["sha256"]:
                raise ValueError(f"--out '{out}' holds images of other '{name}' prompts ({before['prompts']} from "
                                 f"'{before['file']}' there, {entry['prompts']} from '{entry['file']}' here); {fix}")
        new["sets"] = {**old.get("sets", {}), **new["sets"]}
    atomic.write_text(file, json.dumps(new, indent=1))
    store.remove_partial()  # what killed writers left (no rank writes images yet)


# --------------------------------------------------------------------------- images


def release() -> None:
    """Give back the memory of the models the caller has just dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_missing(plan: Plan, store: ImageStore, rank: int, world: int, max_new_images: int | None) -> bool:
    """Make this rank's missing images (prompt i of a set is rank i % world's), model by model; False when
    ``max_new_images`` (on a rank) stopped some rank first."""
    R, settings = plan.repeats, plan.settings
    todo = {m.name: [(s, i, r) for s in plan.sets for i in range(rank, len(s.prompts), world) for r in range(R)
                     if not store.has(s.spec.name, m.name, i, r)] for m in plan.models}
    totals = distributed.sum_over_ranks([len(todo[m.name]) for m in plan.models])
    budget = max_new_images
    model, pristine, checked = None, False, False
    for m, total in zip(plan.models, totals):
        if total == 0:
            continue
        if model is None or not pristine:  # a checkpoint is applied to the base (reloaded after a full one)
            model = None
            release()
            with distributed.rank0_first():  # a built-in base is built once, by rank 0
                model = inference.load_model(settings, plan.device, plan.dtype)
            pristine = True
        if not checked:  # every checkpoint against the loaded base, before anything is sampled
            for other in plan.models:
                inference.check_model(model, other.ckpt, settings)
            checked = True
        if m.ckpt is not None:
            apply_checkpoint(model, m.ckpt)
            pristine = False
        items = todo[m.name][:budget] if budget is not None else todo[m.name]
        distributed.print0(f"{m.name}: {int(total)} images to make ({world} rank(s))")
        shown = progress.bar(total=len(items), desc=f"{m.name}: images", unit="images",
                             enabled=distributed.rank() == 0, leave=True)
        for start in range(0, len(items), plan.batch_size):
            chunk = items[start:start + plan.batch_size]
            shown.update(len(chunk))
            images = inference.generate_images(model, [s.prompts[i] for s, i, _ in chunk],
                                               [plan.seeds[r] for _, _, r in chunk], steps=settings["steps"],
                                               guidance=settings["guidance"],
                                               negative_prompt=settings["negative_prompt"], batch_size=plan.batch_size)
            for (s, i, r), image in zip(chunk, images):
                store.write(s.spec.name, m.name, i, r, image)
        shown.close()
        if m.ckpt is not None and m.ckpt.kind == "lora":  # the base again without reloading it (T5-XXL and all)
            model.remove_adapters()
            pristine = True
        if budget is not None:
            budget -= len(items)
            later = sum(len(todo[o.name]) for o in plan.models[plan.models.index(m):]) - len(items)
            if distributed.sum_over_ranks([float(budget == 0 and later > 0)])[0] > 0:
                model = None
                release()
                return False
    model = None
    release()
    return True


# --------------------------------------------------------------------------- scores


def cache_file(out: Path, set_name: str, model: str, metric: str) -> Path:
    return out / "scores" / set_name / model / f"{metric}.json"


def decide_scoring(plan: Plan, store: ImageStore, s: PromptSetRun) -> dict:
    """Which (model, metric) scores of set ``s`` the cache holds for the images now on disk ("cached": the
    entries), and which are to be computed ("todo": the images' fingerprint); "error": an image is missing."""
    n, name = len(s.prompts), s.spec.name
    decision = {"cached": {}, "todo": {}}
    for m in plan.models:
        try:
            fp = store.fingerprint(name, m.name, n, plan.repeats)
        except FileNotFoundError as exc:
            return {"error": str(exc)}
        for metric in s.metrics:
            try:
                c = json.loads(cache_file(plan.out, name, m.name, metric).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                c = None
            if (isinstance(c, dict) and c.get("images") == fp and c.get("weights") == plan.paths.get(metric)
                    and len(c.get("sums", [])) == n):
                decision["cached"][f"{m.name}/{metric}"] = c
            else:
                decision["todo"][f"{m.name}/{metric}"] = fp
    return decision


def score(plan: Plan, store: ImageStore, rank: int, world: int) -> tuple[dict, dict]:
    """Per (set, model, metric): per-prompt sums and counts of finite values and the non-finite count
    (a diversity metric: one value per prompt); and metric -> note. From the cache where its images are
    unchanged, else computed from the images on disk (this rank's prompts) and summed over ranks."""
    R, device = plan.repeats, torch.device(plan.reward_device or plan.device or
                                           ("cuda" if torch.cuda.is_available() else "cpu"))
    values: dict[tuple[str, str, str], dict] = {}
    notes: dict[str, str] = {}
    for s in plan.sets:
        name = s.spec.name
        plan_s = decide_scoring(plan, store, s) if rank == 0 else None  # one decision for all ranks
        if distributed.active():
            box = [plan_s]
            torch.distributed.broadcast_object_list(box, src=0)
            plan_s = box[0]
        if plan_s.get("error"):
            raise FileNotFoundError(plan_s["error"])
        for key, c in plan_s["cached"].items():
            mname, metric = key.split("/")
            values[(name, mname, metric)] = c
        needed = [metric for metric in s.metrics if any(k.endswith("/" + metric) for k in plan_s["todo"])]
        built = {}
        for metric in needed:
            with distributed.rank0_first():  # weights built on first use (a task's) by rank 0 alone
                obj, note = build_metric(metric, plan.paths.get(metric), device, batch_size=plan.reward_batch_size,
                                         cache_dir=plan.settings["cache_dir"])
            note = distributed.first_error(note)  # unavailable on one rank: on all
            if note:
                notes[metric] = note
                distributed.print0(f"{metric}: {note}")
            else:
                built[metric] = obj
                if getattr(obj, "note", None):
                    notes[metric] = obj.note
        for m in plan.models:
            todo = [metric for metric in built if f"{m.name}/{metric}" in plan_s["todo"]]
            if not todo:
                continue
            result = _score_images(s, m, todo, built, store, R, rank, world, plan.reward_batch_size)
            for metric in todo:
                entry = {"metric": metric, "set": name, "model": m.name, "weights": plan.paths.get(metric),
                         "images": plan_s["todo"][f"{m.name}/{metric}"], **result[metric]}
                values[(name, m.name, metric)] = entry
                if rank == 0:
                    atomic.write_text(cache_file(plan.out, name, m.name, metric), json.dumps(entry))
        built.clear()
        release()
    for s in plan.sets:
        for metric in s.metrics:
            if metric in DIVERSITY_METRICS and metric not in notes:  # (all its scores came from the cache)
                notes[metric] = diversity_note(metric)
    return values, notes


@torch.no_grad()
def _score_images(s: PromptSetRun, m: Model, metrics: list[str], built: dict, store: ImageStore, R: int,
                  rank: int, world: int, chunk_size: int) -> dict:
    n = len(s.prompts)
    scorers = [k for k in metrics if k not in DIVERSITY_METRICS]
    diversities = [k for k in metrics if k in DIVERSITY_METRICS]
    sums = torch.zeros(n, len(metrics), dtype=torch.float64)
    counts = torch.zeros(n, len(metrics), dtype=torch.float64)
    nonfinite = torch.zeros(len(metrics), dtype=torch.float64)
    embeddings: dict[tuple[int, str], list[torch.Tensor]] = {}
    items = [(i, r) for i in range(rank, n, world) for r in range(R)]
    shown = progress.bar(total=len(items), desc=f"{s.spec.name}/{m.name}: scoring {', '.join(metrics)}",
                         unit="images", enabled=rank == 0, leave=True)
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        shown.update(len(chunk))
        prompts = [s.prompts[i] for i, _ in chunk]
        images = torch.stack([store.read(s.spec.name, m.name, i, r) for i, r in chunk])
        for metric in scorers:
            k = metrics.index(metric)
            v = built[metric](prompts, images).float().cpu()
            nonfinite[k] += report_nonfinite(metric, prompts, v)
            for (i, _), x in zip(chunk, v.tolist()):
                if x == x and abs(x) != float("inf"):
                    sums[i, k] += x
                    counts[i, k] += 1
        for metric in diversities:
            emb = built[metric].embed_images(images).float().cpu()
            for (i, _), e in zip(chunk, emb):
                embeddings.setdefault((i, metric), []).append(e)
    shown.close()
    from fdfo.rewards import mean_pairwise_distance

    for (i, metric), embs in embeddings.items():
        k = metrics.index(metric)
        d = float(mean_pairwise_distance(torch.stack(embs)))
        if d == d and abs(d) != float("inf"):
            sums[i, k], counts[i, k] = d, 1
        else:
            nonfinite[k] += 1
    sums, counts, nonfinite = (distributed.sum_over_ranks(t) for t in (sums, counts, nonfinite))
    return {metric: {"sums": sums[:, k].tolist(), "counts": [int(c) for c in counts[:, k].tolist()],
                     "nonfinite": int(nonfinite[k])} for k, metric in enumerate(metrics)}


def summarize(entry: dict) -> tuple[float, list[float]]:
    """Mean over all finite values (a diversity metric: over prompts) and the per-prompt means (NaN: none)."""
    total, count = sum(entry["sums"]), sum(entry["counts"])
    per_prompt = [x / c if c else float("nan") for x, c in zip(entry["sums"], entry["counts"])]
    return (total / count if count else float("nan")), per_prompt


# --------------------------------------------------------------------------- outputs


def results_json(plan: Plan, values: dict, notes: dict, world: int, seconds: float) -> dict:
    metrics, per_prompt, nonfinite = {}, {}, {}
    for s in plan.sets:
        rows = [{"prompt": p} for p in s.prompts]
        for metric in s.metrics:
            label, _ = protocols.column(metric)
            entry = {"set": s.spec.name, "label": label, "values": {}, "note": notes.get(metric),
                     "reference": plan.protocol.reference.get(metric)}
            for m in plan.models:
                if (s.spec.name, m.name, metric) not in values:
                    continue
                v = values[(s.spec.name, m.name, metric)]
                mean, pp = summarize(v)
                entry["values"][m.name] = mean
                nonfinite.setdefault(m.name, {})[metric] = v["nonfinite"]
                for row, x in zip(rows, pp):
                    row.setdefault(m.name, {})[metric] = x
            metrics[metric] = entry
        per_prompt[s.spec.name] = rows
    st = plan.settings
    return {
        "protocol": plan.protocol.name, "title": plan.protocol.title, "model": st["model"],
        "models": [{"name": m.name, "checkpoint": str(m.ckpt.path) if m.ckpt else None} for m in plan.models],
        "sampler": "deterministic Euler", **{k: st.get(k) for k in SAMPLER_KEYS}, "repeats": plan.repeats,
        "seeds": plan.seeds,
        "prompt_sets": {s.spec.name: {"title": s.spec.title, "file": s.file, "prompts": len(s.prompts),
                                      "in_file": s.available, "protocol_size": s.spec.size, "metrics": s.metrics}
                        for s in plan.sets},
        "metrics": metrics, "notes": notes, "nonfinite": nonfinite,
        "reference": {"label": plan.protocol.reference_label, "values": dict(plan.protocol.reference)},
        "world_size": world, "seconds": round(seconds, 2), "per_prompt": per_prompt,
    }


def markdown_table(results: dict) -> str:
    """protocol.md: a row per model and the reference row, a column per metric; n/a with a footnote."""
    metrics = results["metrics"]
    names = list(metrics)
    footnotes: list[str] = []

    def mark(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    def cell(metric: str, value) -> str:
        if value is None or value != value:
            note = metrics[metric]["note"] or "no finite value"
            return "n/a " + mark(f"{metrics[metric]['label']}: {note}")
        return f"{value:.{protocols.column(metric)[1]}f}"

    head = "| model | " + " | ".join(metrics[n]["label"] for n in names) + " |"
    title = results["title"]
    lines = [f"# {title[:1].upper() + title[1:]}", "",
             f"Base model `{results['model']}`; {results['sampler']} sampler, {results['steps']} steps, guidance "
             f"{results['guidance']}" + (" (no CFG)" if results["guidance"] == 1.0 else "")
             + f"; {results['repeats']} images per prompt (seeds {results['seeds'][0]}-{results['seeds'][-1]}).", "",
             head, "|---|" + "---:|" * len(names)]
    checkpoints = {m["name"]: m["checkpoint"] for m in results["models"]}
    for m in results["models"]:
        row = [cell(n, metrics[n]["values"].get(m["name"], float("nan"))) for n in names]
        lines.append(f"| {m['name']} | " + " | ".join(row) + " |")
    ref = results["reference"]
    if ref["values"]:
        row = [f"{ref['values'][n]:.{protocols.column(n)[1]}f}" if n in ref["values"] else "-" for n in names]
        lines.append(f"| **{ref['label']}** (to beat) | " + " | ".join(row) + " |")
    lines += ["", "Prompt sets:", ""]
    for name, s in results["prompt_sets"].items():
        cols = ", ".join(metrics[n]["label"] for n in s["metrics"])
        taken = (f"all {s['prompts']:,} prompts" if s["prompts"] == s["in_file"]
                 else f"the first {s['prompts']:,} of the {s['in_file']:,} prompts")
        size = f" (the protocol's size: {s['protocol_size']:,})" if s["protocol_size"] else ""
        lines.append(f"- {cols} on {s['title']}: {taken} in `{s['file']}`{size}, × {results['repeats']} images.")
    lines += ["", "Models:", ""]
    lines += [f"- {name}: " + (f"checkpoint `{path}`" if path else "the base model, no checkpoint")
              for name, path in checkpoints.items()]
    notes = []
    if ref["values"]:
        missing = [metrics[n]["label"] for n in names if n not in ref["values"]]
        if missing:
            notes.append(f"`-` in the published row: no published value ({', '.join(missing)}).")
    notes += [f"{metrics[n]['label']}: {metrics[n]['note']}." for n in names
              if n in DIVERSITY_METRICS and metrics[n]["values"] and metrics[n]["note"]]
    notes += [f"[{k + 1}] {text}" for k, text in enumerate(footnotes)]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_grid(plan: Plan, store: ImageStore, path: Path, prompts_per_set: int) -> None:
    """grid.png: the first prompts of each set (rows) × each model's first two repeats (columns)."""
    shown = min(2, plan.repeats)
    rows, labels = [], []
    for s in plan.sets:
        for i in range(min(prompts_per_set, len(s.prompts))):
            rows.append([store.read(s.spec.name, m.name, i, r) for m in plan.models for r in range(shown)])
            labels.append(f"[{s.spec.name}] {s.prompts[i]}")
    if rows:
        cols = [f"{m.name} seed {plan.seeds[r]}" for m in plan.models for r in range(shown)]
        image = image_grid(rows, labels, cols)
        atomic.write_file(path, lambda tmp: image.save(tmp, format="PNG"))
