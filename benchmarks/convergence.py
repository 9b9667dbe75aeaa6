"""Reward-per-compute: FDFO vs Flow-GRPO on the built-in digits task.

Both methods train the same base model against the same reward with the same
budget of sampled images per epoch (FDFO: pairs × 2; Flow-GRPO: groups × G) and
the same number of epochs, for several seeds. Each run is a plain
``python fdfo/train.py`` subprocess; the script reads their metrics.jsonl and
plots the held-out judge's accuracy and the training reward against images
sampled and against seconds, and prints a Markdown table: images needed to
reach a fixed judge accuracy, and final values with their spread over seeds.

    python benchmarks/convergence.py --seeds 0 1 2 --epochs 20                       # the comparison
    python benchmarks/convergence.py --sweep --seeds 0 --epochs 10 --lr 3e-4 1e-3 3e-3  # learning-rate sweep
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Equal budgets: 128 images per epoch for both methods.
METHODS = {
    "fdfo": ["--train.algorithm", "fdfo", "--train.pairs_per_epoch", "64"],
    "flow_grpo": ["--train.algorithm", "flow_grpo", "--grpo.groups_per_epoch", "8", "--grpo.group_size", "16",
                  "--train.micro_batch_rows", "48", "--grpo.kl_beta", "0"],
}


def run(method: str, seed: int, lr: float, epochs: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}_lr{lr:g}_seed{seed}"
    if not (run_dir / "done.json").is_file():
        cmd = [sys.executable, "fdfo/train.py", "--config", "builtin:digits", *METHODS[method],
               "--train.seed", str(seed), "--train.learning_rate", str(lr), "--train.epochs", str(epochs),
               "--log.out_dir", str(run_dir), "--log.progress", "false", "--checkpoint.every", "0", *extra]
        if run_dir.exists():  # an attempt that did not finish: start it over (its files are moved aside)
            cmd.append("--overwrite")
        t0 = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        (run_dir / "done.json").write_text(json.dumps({"seconds": time.time() - t0, "cmd": cmd}))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs_rec = [r for r in lines if r["kind"] == "epoch"]
    evals = [r for r in lines if r["kind"] == "eval"]
    seconds, images, elapsed = {0: 0.0}, {0: 0}, 0.0
    for r in epochs_rec:
        elapsed += r["epoch_s"]
        seconds[r["epoch"]], images[r["epoch"]] = elapsed, r["images_sampled"]
    return {"method": method, "seed": seed, "lr": lr,
            "eval": [(images[r["epoch"]], seconds[r["epoch"]], r["eval/digit_judge_accuracy"], r["eval/reward"])
                     for r in evals],
            "reward": [(r["images_sampled"], seconds[r["epoch"]], r["reward_mean"]) for r in epochs_rec]}


def images_to_reach(result: dict, target: float) -> float | None:
    for images, _, acc, _ in result["eval"]:
        if acc >= target:
            return images
    return None


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    colors = {"fdfo": "tab:blue", "flow_grpo": "tab:orange"}
    for res in results:
        c, label = colors[res["method"]], f"{res['method']} seed {res['seed']}"
        ev = list(zip(*res["eval"]))
        rw = list(zip(*res["reward"]))
        axes[0, 0].plot(ev[0], ev[2], color=c, marker="o", alpha=0.7, label=label)
        axes[0, 1].plot(ev[1], ev[2], color=c, marker="o", alpha=0.7)
        axes[1, 0].plot(rw[0], rw[2], color=c, alpha=0.7)
        axes[1, 1].plot(rw[1], rw[2], color=c, alpha=0.7)
    axes[0, 0].set(xlabel="images sampled", ylabel="held-out judge accuracy")
    axes[0, 1].set(xlabel="training seconds (2 CPU cores)", ylabel="held-out judge accuracy")
    axes[1, 0].set(xlabel="images sampled", ylabel="training reward (mean)")
    axes[1, 1].set(xlabel="training seconds (2 CPU cores)", ylabel="training reward (mean)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("FDFO vs Flow-GRPO on the digits task (equal images per epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(results: list[dict], target: float) -> str:
    rows = ["| method | lr | seeds | base judge acc | final judge acc (mean ± std) | final reward (mean ± std) "
            f"| images to reach {target:.0%} (per seed) |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for lr in sorted({r["lr"] for r in results if r["method"] == method}):
            rs = [r for r in results if r["method"] == method and r["lr"] == lr]
            base = [r["eval"][0][2] for r in rs]
            acc = [r["eval"][-1][2] for r in rs]
            rew = [r["eval"][-1][3] for r in rs]
            reach = [images_to_reach(r, target) for r in rs]
            sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
            rows.append(f"| {method} | {lr:g} | {len(rs)} | {statistics.mean(base):.3f} | "
                        f"{statistics.mean(acc):.3f} ± {sd(acc):.3f} | {statistics.mean(rew):.3f} ± {sd(rew):.3f} | "
                        f"{', '.join('never' if x is None else str(x) for x in reach)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="learning rates (sweep) or one per method: --lr FDFO_LR GRPO_LR")
    parser.add_argument("--sweep", action="store_true", help="every lr for every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--target", type=float, default=0.9, help="judge accuracy to reach")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "convergence")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        plan = [(m, lr) for m in args.methods for lr in (args.lr or [1e-3])]
    else:
        lrs = args.lr or [1e-3, 1e-3]
        plan = [(m, lrs[min(i, len(lrs) - 1)]) for i, m in enumerate(args.methods)]
    results = [run(m, seed, lr, args.epochs, args.out, args.extra) for m, lr in plan for seed in args.seeds]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "convergence.png")
    print(summary(results, args.target))
    print(f"\nplot: {args.out / 'convergence.png'}")


if __name__ == "__main__":
    main()
