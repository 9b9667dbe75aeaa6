"""Learning efficiency: FDFO vs Flow-GRPO on the built-in digits task.

Both methods train the same base model against the same reward with the same budget of sampled
images per epoch (FDFO: 64 pairs × 2; Flow-GRPO: 8 groups × 16) for the same number of epochs.
Each run is a plain ``python fdfo/train.py --config builtin:digits`` subprocess in its own
directory under --out, named from its method, settings and seed; a finished run (done.json) is
read, not repeated, and an unfinished one is started over (--overwrite). The script reads the runs'
metrics.jsonl, prints a Markdown table and plots the held-out judge's accuracy, the training reward
and the evaluation's pixel diversity against images and seconds, with an accuracy–diversity scatter
of every run's final evaluation (convergence.png).

Diversity guards the comparison: RL against a classifier can buy accuracy by drawing one prototype
image per prompt. A setting whose final ``eval/pixel_diversity`` is below --min-diversity × the
base model's (its epoch-0 evaluation) is marked "collapsed" and never selected.

1. Sweep: every method over a grid of settings, then --select picks each method's best setting
   (highest final judge accuracy among the settings that did not collapse) and prints the
   overrides for step 2. A grid axis is METHOD:KEY=V1,V2,... (KEY: any config key, as train.py
   takes it; no METHOD: every method); each method runs the cartesian product of its axes.

    python benchmarks/convergence.py --epochs 30 --select --grid \\
        fdfo:train.learning_rate=3e-4,1e-3 fdfo:fdfo.clip_range=0.03,0.1,0.3 \\
        fdfo:churn.schedule=raw,prior,interval \\
        flow_grpo:train.learning_rate=1e-3,3e-3 flow_grpo:flow_grpo.clip_range=1e-4,1e-3,1e-2 -- --eval.every 2

2. Seeds: each method at one setting (--set METHOD:KEY=VALUE, as --select prints it), several seeds:
   judge accuracy after a fixed number of images (--at-images; default: the most every run
   reached), images and seconds to reach --target accuracy, final diversity relative to the base.

    python benchmarks/convergence.py --epochs 30 --seeds 0 1 2 \\
        --set fdfo:train.learning_rate=1e-3 flow_grpo:train.learning_rate=3e-3 -- --eval.every 2

Seconds are the run's wall-clock as its metrics.jsonl records it: the training epochs' epoch_s
plus the evaluations' seconds (the base model's included), up to and including the evaluation
that is counted (on a busy machine they grow: compare them only between runs made alike).
Overrides for every run go after ``--``: above, an evaluation every 2 epochs (256 images) instead
of the digits job's 5, for a finer images-to-target figure. --dry-run lists the runs.
``--lr A B`` (one learning rate per method) and ``--sweep --lr A B C`` (every learning rate for
every method) are shorthands for --set and --grid on train.learning_rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Equal budgets: 128 images per epoch for both methods.
METHODS = {
    "fdfo": ["--train.algorithm", "fdfo", "--fdfo.pairs_per_epoch", "64"],
    "flow_grpo": ["--train.algorithm", "flow_grpo", "--flow_grpo.groups_per_epoch", "8", "--flow_grpo.group_size", "16",
                  "--train.micro_batch_rows", "48", "--flow_grpo.kl_beta", "0"],
}
COLORS = {"fdfo": "tab:blue", "flow_grpo": "tab:orange"}


# ---------------------------------------------------------------------- the plan


def normalize(value: str) -> str:
    """One spelling per value (1e-3 and 0.001 are the same run): integers and floats as Python
    prints them, anything else unchanged."""
    for kind in (int, float):
        try:
            return f"{kind(value):g}" if kind is float else str(kind(value))
        except ValueError:
            pass
    return value


def parse_spec(spec: str, methods: list[str], several: bool) -> list[tuple[str, str, list[str]]]:
    """'[METHOD:]KEY=V1[,V2...]' -> [(method, key, values)] for its method, or for every one of ``methods``."""
    head, eq, values = spec.partition("=")
    method, colon, key = head.rpartition(":")
    if not eq or not key or "." not in key or not values:
        raise SystemExit(f"convergence: '{spec}' is not METHOD:SECTION.KEY=VALUE{',VALUE...' if several else ''}")
    if colon and method not in METHODS:
        raise SystemExit(f"convergence: unknown method '{method}' in '{spec}' (methods: {', '.join(METHODS)})")
    vals = [normalize(v) for v in (values.split(",") if several else [values])]
    if any(v == "" for v in vals):
        raise SystemExit(f"convergence: '{spec}' has an empty value")
    return [(m, key.removeprefix("--"), vals) for m in ([method] if colon else methods)]


def plan(methods: list[str], grid: list[str], fixed: list[str], seeds: list[int]) -> list[tuple[str, dict, int]]:
    """(method, overrides, seed) of every run: each method's fixed overrides with every combination of its axes."""
    axes: dict[str, dict[str, list[str]]] = {m: {} for m in methods}
    sets: dict[str, dict[str, str]] = {m: {} for m in methods}
    for spec in grid:
        for m, key, values in parse_spec(spec, methods, several=True):
            if m in axes:
                if key in axes[m]:
                    raise SystemExit(f"convergence: {m}:{key} is given twice in --grid")
                axes[m][key] = list(dict.fromkeys(values))
    for spec in fixed:
        for m, key, (value,) in parse_spec(spec, methods, several=False):
            if m in sets:
                if key in axes[m]:
                    raise SystemExit(f"convergence: {m}:{key} is both a --grid axis and a --set value")
                sets[m][key] = value
    runs = []
    for m in methods:
        keys = list(axes[m])
        for combo in itertools.product(*(axes[m][k] for k in keys)):
            overrides = dict(sorted({**sets[m], **dict(zip(keys, combo))}.items()))
            runs += [(m, overrides, seed) for seed in seeds]
    return runs


def setting_name(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)"


def run_dir_name(method: str, overrides: dict, seed: int) -> str:
    parts = [method, *(f"{k}={v}" for k, v in overrides.items()), f"seed{seed}"]
    return "__".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", p) for p in parts)


def command(method: str, overrides: dict, seed: int, epochs: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "fdfo/train.py", "--config", "builtin:digits", *METHODS[method],
            "--train.seed", str(seed), "--train.epochs", str(epochs), "--log.progress", "false",
            "--checkpoint.every", "0", *(a for k, v in overrides.items() for a in (f"--{k}", v)), *extra,
            "--log.out_dir", str(run_dir)]


def settings_of(cmd: list[str]) -> list[str]:
    """What makes two runs the same: the command's arguments less the interpreter, the directory, --overwrite."""
    args = [a for a in cmd[1:] if a != "--overwrite"]
    if "--log.out_dir" in args:
        i = args.index("--log.out_dir")
        del args[i:i + 2]
    return args


def execute(method: str, overrides: dict, seed: int, epochs: int, out: Path, extra: list[str]) -> Path:
    """The run's directory, after training it unless done.json says it already finished with these settings."""
    run_dir = out / run_dir_name(method, overrides, seed)
    cmd = command(method, overrides, seed, epochs, run_dir, extra)
    done = run_dir / "done.json"
    if done.is_file():
        before = settings_of(json.loads(done.read_text())["cmd"])
        if before != settings_of(cmd):
            raise SystemExit(f"convergence: {run_dir} holds a finished run with other settings (a different "
                             f"--epochs or extra overrides?):\n  it ran: {' '.join(before)}\n  asked:  "
                             f"{' '.join(settings_of(cmd))}\nchoose another --out, or remove that directory")
        return run_dir
    if run_dir.exists():  # an attempt that did not finish: start it over (its files are moved aside)
        cmd.append("--overwrite")
    print(f"[convergence] {run_dir.name}", flush=True)
    t0 = time.time()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"convergence: the run {run_dir.name} failed (exit code {code}); its output above says "
                         f"why. Command: {' '.join(cmd)}")
    done.write_text(json.dumps({"seconds": time.time() - t0, "cmd": cmd}))
    return run_dir


# ---------------------------------------------------------------------- reading runs


def load(run_dir: Path, method: str, overrides: dict, seed: int) -> dict:
    """A run's curves from its metrics.jsonl. ``clock`` of an epoch: its epochs' epoch_s plus the
    evaluations' seconds up to and including that epoch."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    evals = [r for r in lines if r["kind"] == "eval"]
    eval_s: dict[int, float] = {}
    for r in evals:
        eval_s[r["epoch"]] = eval_s.get(r["epoch"], 0.0) + r.get("seconds", 0.0)
    elapsed = eval_s.get(0, 0.0)
    images, clock = {0: 0}, {0: elapsed}
    for r in epochs:
        elapsed += r["epoch_s"] + eval_s.get(r["epoch"], 0.0)
        clock[r["epoch"]], images[r["epoch"]] = elapsed, r["images_sampled"]
    return {"method": method, "overrides": overrides, "seed": seed, "dir": run_dir.name,
            "eval": [{"epoch": r["epoch"], "images": images[r["epoch"]], "seconds": clock[r["epoch"]],
                      "accuracy": r["eval/digit_judge_accuracy"], "diversity": r.get("eval/pixel_diversity"),
                      "reward": r["eval/reward"]} for r in evals],
            "reward": [{"epoch": r["epoch"], "images": r["images_sampled"], "seconds": clock[r["epoch"]],
                        "reward": r["reward_mean"]} for r in epochs if r.get("reward_mean") is not None]}


def reach(result: dict, target: float) -> dict | None:
    """The first evaluation at or above the target accuracy (None: never)."""
    return next((e for e in result["eval"] if e["accuracy"] >= target), None)


def accuracy_at(result: dict, images: int) -> float | None:
    """Judge accuracy at the last evaluation after at most ``images`` sampled images."""
    before = [e for e in result["eval"] if e["images"] <= images]
    return before[-1]["accuracy"] if before else None


def base(result: dict) -> dict | None:
    return next((e for e in result["eval"] if e["epoch"] == 0), None)


def diversity_ratio(result: dict) -> float | None:
    """Final pixel diversity as a fraction of the base model's (None when either is missing)."""
    b, final = base(result), result["eval"][-1]
    if b is None or not b["diversity"] or final["diversity"] is None:
        return None
    return final["diversity"] / b["diversity"]


def group(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (method, setting), in plan order."""
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault((r["method"], tuple(r["overrides"].items())), []).append(r)
    return out


def collapsed(runs: list[dict], min_diversity: float) -> bool | None:
    """Whether the setting's mean final diversity ratio is below the bound (None: not logged)."""
    ratios = [diversity_ratio(r) for r in runs]
    if any(x is None for x in ratios):
        return None
    return statistics.mean(ratios) < min_diversity


def select(results: list[dict], min_diversity: float) -> dict[str, tuple | None]:
    """Each method's setting with the highest mean final judge accuracy among those that did not
    collapse (ties: the more diverse); None where every setting collapsed or logged no diversity."""
    best: dict[str, tuple | None] = {}
    for (method, setting), runs in group(results).items():
        best.setdefault(method, None)
        if collapsed(runs, min_diversity) is not False:
            continue
        score = (statistics.mean(r["eval"][-1]["accuracy"] for r in runs),
                 statistics.mean(diversity_ratio(r) for r in runs))
        if best[method] is None or score > best[method][0]:
            best[method] = (score, setting)
    return {m: (b[1] if b else None) for m, b in best.items()}


# ---------------------------------------------------------------------- tables and plots


def _mean_sd(xs: list[float], fmt: str = ".3f") -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"


def _per_seed(xs: list, fmt: str) -> str:
    return ", ".join("never" if x is None else f"{x:{fmt}}" for x in xs)


def _seconds_header(target: float) -> str:
    return f"seconds to reach {target:.0%} (epochs + evaluations, per seed)"


def sweep_table(results: list[dict], target: float, min_diversity: float,
                selected: dict[str, tuple | None] | None = None) -> str:
    """One row per (method, setting): final values (means over seeds), reach per seed, status."""
    rows = [f"| method | setting | seeds | final judge acc | final pixel diversity | base pixel diversity "
            f"| diversity / base | images to reach {target:.0%} (per seed) | {_seconds_header(target)} "
            f"| final eval reward | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (method, setting), runs in group(results).items():
        state = collapsed(runs, min_diversity)
        status = {True: f"collapsed (< {min_diversity:g} × base)", None: "no diversity logged", False: ""}[state]
        if selected and selected.get(method) == setting:
            status = "**selected**"
        hits = [reach(r, target) for r in runs]
        bases = [base(r) for r in runs]
        rows.append(" | ".join([
            f"| {method}", setting_name(dict(setting)), ", ".join(str(r["seed"]) for r in runs),
            _mean_sd([r["eval"][-1]["accuracy"] for r in runs]),
            _mean_sd([r["eval"][-1]["diversity"] for r in runs], ".4f"),
            _mean_sd([b["diversity"] if b else None for b in bases], ".4f"),
            _mean_sd([diversity_ratio(r) for r in runs], ".2f"),
            _per_seed([h and h["images"] for h in hits], "d"),
            _per_seed([h and h["seconds"] for h in hits], ".0f"),
            _mean_sd([r["eval"][-1]["reward"] for r in runs]), status]) + " |")
    return "\n".join(rows)


def seeds_table(results: list[dict], target: float, at_images: int) -> str:
    """One row per method (and setting): spread over seeds."""
    rows = [f"| method | setting | seeds | base judge acc | judge acc after {at_images:,} images (mean ± std) "
            f"| images to reach {target:.0%} (per seed) | {_seconds_header(target)} "
            f"| final diversity / base (mean ± std) | final eval reward (mean ± std) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (method, setting), runs in group(results).items():
        hits = [reach(r, target) for r in runs]
        rows.append(" | ".join([
            f"| {method}", setting_name(dict(setting)), ", ".join(str(r["seed"]) for r in runs),
            _mean_sd([b["accuracy"] if (b := base(r)) else None for r in runs]),
            _mean_sd([accuracy_at(r, at_images) for r in runs]),
            _per_seed([h and h["images"] for h in hits], "d"),
            _per_seed([h and h["seconds"] for h in hits], ".0f"),
            _mean_sd([diversity_ratio(r) for r in runs], ".2f"),
            _mean_sd([r["eval"][-1]["reward"] for r in runs])]) + " |")
    return "\n".join(rows)


def selection_text(selected: dict[str, tuple | None], min_diversity: float, seeds_cmd: list[str],
                   extra: list[str] = ()) -> str:
    """The chosen setting of each method, and the seeds run's command line with them."""
    lines = [f"selected (highest final judge accuracy among settings with final pixel diversity ≥ "
             f"{min_diversity:g} × the base model's):"]
    sets = []
    for method, setting in selected.items():
        if setting is None:
            lines.append(f"  {method}: none (every setting collapsed or logged no diversity)")
            continue
        lines.append(f"  {method}: {setting_name(dict(setting))}")
        sets += [f"{method}:{k}={v}" for k, v in setting]
    chosen = [m for m, setting in selected.items() if setting is not None]
    if chosen:
        methods = ["--methods", *chosen] if chosen != list(METHODS) else []
        lines.append("seeds run: " + " ".join([*seeds_cmd, *methods, *(["--set", *sets] if sets else []),
                                               *(["--", *extra] if extra else [])]))
    return "\n".join(lines)


def plot(results: list[dict], path: Path, min_diversity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    labelled = set()
    for res in results:
        c = COLORS[res["method"]]
        label = None if res["method"] in labelled else res["method"]
        labelled.add(res["method"])
        ev, rw = res["eval"], res["reward"]
        axes[0, 0].plot([e["images"] for e in ev], [e["accuracy"] for e in ev], color=c, marker="o", ms=3,
                        alpha=0.6, label=label)
        axes[0, 1].plot([e["seconds"] for e in ev], [e["accuracy"] for e in ev], color=c, marker="o", ms=3,
                        alpha=0.6)
        axes[1, 0].plot([e["images"] for e in rw], [e["reward"] for e in rw], color=c, alpha=0.6)
        axes[1, 1].plot([e["seconds"] for e in rw], [e["reward"] for e in rw], color=c, alpha=0.6)
        div = [e for e in ev if e["diversity"] is not None]
        axes[1, 2].plot([e["images"] for e in div], [e["diversity"] for e in div], color=c, marker="o", ms=3,
                        alpha=0.6)
        if ev[-1]["diversity"] is not None:
            axes[0, 2].scatter(ev[-1]["diversity"], ev[-1]["accuracy"], color=c, alpha=0.8, label=label)
    bases = [b for r in results if (b := base(r)) and b["diversity"] is not None]
    if bases:
        bd, ba = statistics.mean(b["diversity"] for b in bases), statistics.mean(b["accuracy"] for b in bases)
        axes[0, 2].scatter(bd, ba, color="black", marker="*", s=180, label="base model", zorder=3)
        axes[0, 2].axvline(min_diversity * bd, color="gray", ls="--", lw=1,
                           label=f"{min_diversity:g} × base diversity")
        axes[1, 2].axhline(min_diversity * bd, color="gray", ls="--", lw=1)
    clock = "seconds (epochs + evaluations, 2 CPU cores)"
    axes[0, 0].set(xlabel="images sampled", ylabel="held-out judge accuracy")
    axes[0, 1].set(xlabel=clock, ylabel="held-out judge accuracy")
    axes[0, 2].set(xlabel="final pixel diversity (RMS pairwise distance per pixel, same prompt)",
                   ylabel="final held-out judge accuracy", title="every run's final evaluation")
    axes[1, 0].set(xlabel="images sampled", ylabel="training reward (mean)")
    axes[1, 1].set(xlabel=clock, ylabel="training reward (mean)")
    axes[1, 2].set(xlabel="images sampled", ylabel="evaluation pixel diversity")
    axes[0, 0].legend(fontsize=8)
    axes[0, 2].legend(fontsize=8)
    fig.suptitle("FDFO vs Flow-GRPO on the digits task (equal images per epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", nargs="+", default=[], metavar="[METHOD:]KEY=V1,V2",
                        help="a grid axis; each method runs the cartesian product of its axes")
    parser.add_argument("--set", dest="fixed", nargs="+", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="a fixed override of a method's runs (e.g. the setting --select printed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 with --grid, else 0 1 2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--target", type=float, default=0.9, help="judge accuracy to reach")
    parser.add_argument("--at-images", type=int, default=None,
                        help="seeds table: accuracy after this many images (default: the most that every run reached)")
    parser.add_argument("--select", action="store_true", help="pick each method's best setting that did not collapse")
    parser.add_argument("--min-diversity", type=float, default=0.8,
                        help="a setting whose final pixel diversity is below this × the base model's has collapsed")
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="shorthand: one learning rate per method, or with --sweep every one for every method")
    parser.add_argument("--sweep", action="store_true", help="with --lr: a grid axis of learning rates")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done, then stop")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "convergence")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, after --")
    args = parser.parse_args(argv)

    grid, fixed = list(args.grid), list(args.fixed)
    if args.lr:
        if args.sweep:
            grid.append("train.learning_rate=" + ",".join(map(str, args.lr)))
        else:
            fixed += [f"{m}:train.learning_rate={args.lr[min(i, len(args.lr) - 1)]}"
                      for i, m in enumerate(args.methods)]
    sweep = bool(grid)
    seeds = args.seeds if args.seeds is not None else ([0] if sweep else [0, 1, 2])
    runs = plan(args.methods, grid, fixed, seeds)
    out = args.out.resolve()
    if args.dry_run:
        for m, overrides, seed in runs:
            d = out / run_dir_name(m, overrides, seed)
            state = "done" if (d / "done.json").is_file() else "unfinished" if d.exists() else "to run"
            print(f"{state:10s} {d.name}")
        print(f"{len(runs)} runs of {args.epochs} epochs in {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    results = [load(execute(m, o, s, args.epochs, out, args.extra), m, o, s) for m, o, s in runs]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "convergence.png", args.min_diversity)
    selected = select(results, args.min_diversity) if args.select else None
    if sweep:
        print(sweep_table(results, args.target, args.min_diversity, selected))
    else:
        at = args.at_images or min(r["eval"][-1]["images"] for r in results)
        print(seeds_table(results, args.target, at))
    if selected is not None:
        seeds_cmd = ["python", "benchmarks/convergence.py", "--epochs", str(args.epochs), "--seeds", "0", "1", "2"]
        if args.out != parser.get_default("out"):
            seeds_cmd += ["--out", str(args.out)]
        print("\n" + selection_text(selected, args.min_diversity, seeds_cmd, args.extra))
    print(f"\nplot: {out / 'convergence.png'}")


if __name__ == "__main__":
    main()
