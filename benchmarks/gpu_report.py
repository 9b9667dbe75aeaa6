"""The GPU run's report: one Markdown file with the device, the versions and a table per part.

    python benchmarks/gpu_report.py OUT                  # writes OUT/gpu_report.md
    python benchmarks/gpu_report.py OUT1 OUT2 --out R.md # both commands' folders in one report
    python benchmarks/gpu_report.py --env OUT/env.json   # records the environment (run_gpu.sh's env part)

Reads what benchmarks/run_gpu.sh leaves in OUT: run.json, status.jsonl, env.json,
nvidia-smi.txt, tests.xml, aot.json, kernels.json, sampling_{off,on}.json, epoch.json,
levers.json, zero_{lora,full,offload}.jsonl and the parts' logs. Safe on partial results: a part that
failed, timed out, was skipped or never finished is listed with its status and the tail of
its log, and a benchmark whose JSON says ``"complete": false`` is marked partial. The tables
have the form of benchmarks/RESULTS.md, so recording the figures there is a paste; the raw
JSON follows (inlined when small, else named).

Only the standard library is imported (except for --env, which imports torch), so the
report can be written after every part in a fraction of a second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PART_FILES = {
    "env": ["env.json", "nvidia-smi.txt"], "tests": ["tests.xml"], "aot": ["aot.json"],
    "kernels": ["kernels.json"], "sampling_off": ["sampling_off.json"], "sampling_on": ["sampling_on.json"],
    "epoch": ["epoch.json"], "zero_lora": ["zero_lora.jsonl"], "zero_full": ["zero_full.jsonl"],
    "zero_offload": ["zero_offload.jsonl"], "levers": ["levers.json"],
}
INLINE_BYTES = 24_000  # raw JSON up to this size is inlined in the report
LOG_TAIL = 25


# --------------------------------------------------------------------------- formatting


def num(x, digits: int = 3) -> str:
    """A number with `digits` significant digits (no exponent for ordinary magnitudes); '–' for None."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if x != x:  # NaN
        return "NaN"
    if x == 0:
        return "0"
    mag = abs(x)
    if 1e-3 <= mag < 1e7:
        decimals = max(0, digits - 1 - int(f"{mag:e}".split("e")[1]))
        return f"{x:,.{decimals}f}"
    return f"{x:.{digits - 1}e}"


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass  # a line cut by a kill
    except OSError:
        pass
    return rows


def log_tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [ln.rsplit("\r", 1)[-1] for ln in lines]  # progress bars: keep the last state
    return "\n".join(lines[-n:]) or "(empty log)"


# --------------------------------------------------------------------------- one section per part


def section_env(d: Path) -> str:
    smi = d / "nvidia-smi.txt"
    if smi.exists():
        return "<details><summary>nvidia-smi</summary>\n\n```\n" + smi.read_text(errors="replace").strip() \
            + "\n```\n</details>"
    return ""


def section_tests(d: Path) -> str:
    cases = []
    xml = d / "tests.xml"
    if xml.exists():
        try:
            for tc in ET.parse(xml).getroot().iter("testcase"):
                name = f"{tc.get('classname', '')}::{tc.get('name', '')}".strip(":")
                outcome, detail = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = tc.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        detail = (el.get("message") or "").replace("\n", " ")[:160]
                cases.append((name, outcome, float(tc.get("time") or 0), detail))
        except ET.ParseError:
            cases = []
    if not cases:  # no XML (the run was cut short): the verbose log's result lines
        try:
            for line in (d / "tests.log").read_text(errors="replace").splitlines():
                for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                    if f" {outcome}" in line and "::" in line:
                        cases.append((line.split(" ")[0], outcome.lower(), None, ""))
                        break
        except OSError:
            pass
    if not cases:
        return ""
    counts = {}
    for _, outcome, _, _ in cases:
        counts[outcome] = counts.get(outcome, 0) + 1
    head = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    rows = [[f"`{n}`", o, num(t) if t is not None else "–", detail or ""] for n, o, t, detail in cases]
    return f"{head}\n\n" + table(["test", "outcome", "seconds", "reason"], rows)


def section_aot(d: Path) -> str:
    data = read_json(d / "aot.json")
    if not data:
        return ""
    by = {}
    for k in data.get("kernels", []):
        by.setdefault((k["kernel"], k.get("arch")), []).append(k)
    rows = []
    for (kernel, arch), ks in sorted(by.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
        regs = [k.get("registers") for k in ks if k.get("registers") is not None]
        spills = max(int(k.get("local") or 0) for k in ks)  # local memory per thread: spilled registers
        smem = max((k.get("shared") or 0) for k in ks)
        rows.append([f"`{kernel}`", f"sm_{arch}", len(ks), f"{min(regs)}–{max(regs)}" if regs else "–",
                     f"{smem:,}", spills])
    note = f"triton {data.get('triton', '?')}, {data.get('launches', '?')} launches recorded"
    return note + "\n\n" + table(["kernel", "arch", "specialisations", "registers per thread",
                                  "smem (bytes, max)", "spilled bytes per thread (max)"], rows)


def section_kernels(d: Path) -> str:
    data = read_json(d / "kernels.json")
    if not data:
        return ""
    meta, recs = data.get("meta", {}), data.get("results", [])
    by = {(r["case"], r["impl"]): r for r in recs}
    cases = meta.get("cases") or list(dict.fromkeys(r["case"] for r in recs))
    rows = []
    for case in cases:
        t, e, c = (by.get((case, i)) for i in ("triton", "eager", "compile"))
        if not (t or e or c):
            continue
        us = [num(r["seconds"] * 1e6) if r else "–" for r in (t, e, c)]
        vs_e = f"{e['seconds'] / t['seconds']:.2f}×" if t and e else "–"
        vs_c = f"{c['seconds'] / t['seconds']:.2f}×" if t and c else "–"
        peak = "–"
        if t and e and t.get("peak_extra_bytes") is not None:
            peak = f"{t['peak_extra_bytes'] / 2**20:.1f} / {e['peak_extra_bytes'] / 2**20:.1f}"
        rows.append([f"`{case}`", *us, vs_e, vs_c, num(t["gbps"]) if t else "–",
                     pct(t.get("frac_of_copy")) if t else "–", peak])
    checks = data.get("checks", [])
    bad = [c["case"] for c in checks if not c.get("ok")]
    head = (f"{meta.get('device', '?')}, copy bandwidth {num(meta.get('copy_gbps'))} GB/s; correctness "
            f"{len(checks) - len(bad)}/{len(checks)} ok" + (f" (failed: {', '.join(bad)})" if bad else ""))
    if meta.get("skipped_impls"):
        head += "; not timed: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped_impls"].items())
    return head + "\n\n" + table(["case", "triton µs", "eager µs", "compile µs", "eager/triton", "compile/triton",
                                  "triton GB/s", "% of copy", "peak MiB triton / eager"], rows)


def section_sampling(d: Path, part: str) -> str:
    data = read_json(d / f"{part}.json")
    if not data:
        return ""
    res = data.get("results", [])
    ref = {(r["cfg"], r["rows"]): r["images_per_s"] for r in res if r["variant"] == "published" and "images_per_s" in r}
    rows = []
    for r in res:
        cfg = "on" if r.get("cfg") else "off"
        if "images_per_s" not in r:
            rows.append([cfg, r["rows"], r["variant"], "skipped", "–", "–", "–", "–", "–", "–", r.get("skipped", "")])
            continue
        base = ref.get((r["cfg"], r["rows"]))
        rows.append([cfg, r["rows"], r["variant"], r.get("mode", "–"), num(r["images_per_s"]),
                     f"{r['images_per_s'] / base:.2f}×" if base else "–", pct(r.get("mfu")),
                     {True: "yes", False: "no"}.get(r.get("bitwise_equal_eager"), "–"),
                     num(r.get("warmup_s")), num(r.get("peak_gib")), ""])
    a = data.get("args", {})
    head = (f"{data.get('device', '?')}, {a.get('arch', '?')}, {a.get('latent', '?')}² latents, {a.get('steps', '?')} "
            f"steps, LoRA r={a.get('lora', '?')}, {a.get('text_tokens', '?')} text tokens, "
            f"{a.get('repeats', '?')} timed repeat(s)")
    return head + "\n\n" + table(["CFG", "rows", "variant", "mode", "images/s", "× published", "MFU",
                                  "bit-equal to eager", "warm-up s", "peak GiB", "note"], rows)


def section_epoch(d: Path, name: str = "epoch") -> str:
    data = read_json(d / f"{name}.json")
    if not data:
        return ""
    rows = []
    for r in data.get("variants", []):
        if r.get("error"):
            rows.append([r["variant"], f"failed: {r['error']}"] + ["–"] * 10)
            continue
        cold = (r.get("warmup") or [{}])[0].get("pairs_per_s") if r.get("warmup") else None
        rows.append([r["variant"], r.get("sampler", "–"), r.get("kernels", "–"), num(r.get("pairs_per_s")),
                     num(r.get("sample_s")), num(r.get("train_s")), num(r.get("epoch_s")), num(cold),
                     pct(r.get("sample_mfu")), pct(r.get("train_mfu")), num(r.get("peak_gib")),
                     num(r.get("trajectory_device_mib"))])
    ratio = data.get("speedup_fast_over_published")
    head = (f"{data.get('device', '?')}: {data.get('models', '?')}; {data.get('pairs')} pairs, {data.get('steps')} "
            f"steps, guidance {data.get('guidance')}; timed epoch after "
            f"{(data.get('variants') or [{}])[0].get('warmup_epochs', 0)} warm-up epoch(s) (cold = the first epoch)")
    tail = f"\n\nfast / published: **{ratio:.2f}×** pairs/s (same invocation)" if ratio else ""
    return head + "\n\n" + table(["variant", "sampler", "kernels", "pairs/s", "sample s", "train s", "epoch s",
                                  "cold epoch pairs/s", "sampling MFU", "training MFU", "peak GiB",
                                  "trajectories on GPU MiB"], rows) + tail


def section_zero(d: Path, part: str) -> str:
    rows = []
    for r in read_jsonl(d / f"{part}.jsonl"):
        rows.append([r.get("arch"), r.get("stage"), "yes" if r.get("offload") else "no",
                     "full" if r.get("full") else "LoRA r=32", r.get("world"), r.get("rows"), num(r.get("samples_per_s")),
                     num(1000 * r["step_s"]) if r.get("step_s") else "–", num(r.get("peak_gib")), r.get("device", "?")])
    if not rows:
        return ""
    return table(["arch", "ZeRO stage", "offload", "trained", "ranks", "rows", "samples/s", "step ms",
                  "peak GiB", "device"], rows)


SECTIONS = {
    "env": ("Environment", section_env),
    "tests": ("GPU tests (`tests/test_graphs.py`, `tests/test_kernels.py`)", section_tests),
    "aot": ("Kernels compiled for sm_90 (`fdfo.kernels.aot`)", section_aot),
    "kernels": ("Kernels against eager and torch.compile (`bench_kernels.py`)", section_kernels),
    "sampling_off": ("Sampling, CFG off (`bench_sampling.py`)", lambda d: section_sampling(d, "sampling_off")),
    "sampling_on": ("Sampling, CFG on (`bench_sampling.py`)", lambda d: section_sampling(d, "sampling_on")),
    "epoch": ("One epoch: fast path against the published formulation (`bench_epoch.py`)", section_epoch),
    "zero_lora": ("ZeRO stages, LoRA (`bench_zero.py`; SD3.5 Medium, and FLUX.1 [dev] and SD3.5 Large at ZeRO-3, "
                  "on the GPU)", lambda d: section_zero(d, "zero_lora")),
    "zero_full": ("ZeRO-3, full fine-tuning (`bench_zero.py`; SD3.5 Medium on the GPU)", lambda d: section_zero(d, "zero_full")),
    "zero_offload": ("ZeRO-3 with CPU offload, LoRA (`bench_zero.py`; SD3.5 Large on the GPU)",
                     lambda d: section_zero(d, "zero_offload")),
    "levers": ("Large-model levers: host trajectories and SDPA kernels, each on the fast path (`bench_epoch.py`)",
               lambda d: section_epoch(d, "levers")),
}


# --------------------------------------------------------------------------- the report


def _complete(d: Path, part: str) -> bool | None:
    for f in PART_FILES.get(part, []):
        data = read_json(d / f) if f.endswith(".json") else None
        if isinstance(data, dict) and "complete" in data:
            return bool(data["complete"])
    return None


def build(dirs: list[Path]) -> str:
    statuses, runs, env = {}, [], None
    for d in dirs:
        run = read_json(d / "run.json") or {}
        runs.append((d, run))
        for rec in read_jsonl(d / "status.jsonl"):
            statuses[rec["part"]] = {**rec, "dir": d}
        env = env or read_json(d / "env.json")
    planned = []
    for d, run in runs:
        for p in ["install", *str(run.get("parts", "")).split()]:
            if p not in [q for q, _ in planned]:
                planned.append((p, d))
    for p, rec in statuses.items():
        if p not in [q for q, _ in planned]:
            planned.append((p, rec["dir"]))

    env = env or {}
    dry = any(run.get("dry_run") for _, run in runs)
    out = [f"# GPU figures: {env.get('device', 'device unknown (no env part)')}", ""]
    if dry:
        out += ["**Dry run** (`FDFO_GPU_DRY_RUN=1`): tiny sizes, no GPU; these numbers only show that every "
                "part runs, they are not figures.", ""]
    pk = env.get("packages") or {}
    info = [
        ["device (as torch names it)", env.get("device", "–")],
        ["GPU memory, SMs, compute capability", f"{num(env.get('memory_gib'))} GiB, {env.get('sm_count', '–')}, "
                                                f"{env.get('capability', '–')}" if env.get("memory_gib") else "–"],
        ["driver", env.get("driver") or "–"],
        ["torch / CUDA / triton", f"{env.get('torch', '–')} / {env.get('cuda') or '–'} / {env.get('triton') or '–'}"],
        ["python", env.get("python", "–")],
        ["diffusers / deepspeed / transformers / peft",
         " / ".join(str(pk.get(k) or "–") for k in ("diffusers", "deepspeed", "transformers", "peft"))],
        ["date (UTC)", env.get("date", "–")],
        ["commit", env.get("commit") or "–"],
        ["commands", "; ".join(f"`run_gpu.sh {d.name} {r.get('parts', '?')}` (budget {r.get('budget_s', '?')} s, "
                                f"started {r.get('started', '?')})" for d, r in runs)],
    ]
    out += [table(["", ""], info), ""]

    rows = []
    for p, d in planned:
        rec = statuses.get(p)
        if rec is None:
            rows.append([p, "did not finish (the command stopped during or before it)", "–", "–", ""])
            continue
        partial = _complete(d, p) is False
        status = rec["status"] + (" (partial results)" if partial and rec["status"] != "ok" else "")
        rows.append([p, status, rec.get("seconds", "–"), rec.get("limit_s") or "–", rec.get("reason") or ""])
    out += ["## Parts", "", table(["part", "status", "seconds", "limit s", "note"], rows), ""]

    for p, d in planned:
        if p not in SECTIONS:
            continue
        title, fn = SECTIONS[p]
        rec = statuses.get(p, {})
        status = rec.get("status", "did not finish")
        try:
            body = fn(d)
        except Exception as exc:  # a malformed file must not cost the rest of the report
            body = f"(could not read this part's results: {type(exc).__name__}: {exc})"
        out += [f"## {title}", ""]
        if status != "ok" or _complete(d, p) is False:
            out += [f"Status: **{status}**" + (f" ({rec['reason']})" if rec.get("reason") else "")
                    + ("; the results below are partial" if _complete(d, p) is False else ""), ""]
        if rec.get("command"):
            out += [f"Command: `{rec['command']}`", ""]
        out += [body or "(no results)", ""]
        if status != "ok":
            out += [f"Last lines of `{p}.log`:", "", "```", log_tail(d / f"{p}.log"), "```", ""]
    if "install" in statuses and statuses["install"]["status"] != "ok":
        d = statuses["install"]["dir"]
        out += ["## Wheel install", "", "```", log_tail(d / "install.log"), "```", ""]

    out += ["## Raw results", ""]
    for p, d in planned:
        for f in PART_FILES.get(p, []):
            path = d / f
            if not path.exists() or f.endswith(".txt"):
                continue
            size = path.stat().st_size
            if f.endswith((".json", ".jsonl")) and size <= INLINE_BYTES:
                lang = "json"
                out += [f"<details><summary>{f}</summary>\n\n```{lang}\n{path.read_text().strip()}\n```\n</details>",
                        ""]
            else:
                out += [f"- `{f}` ({size:,} bytes, beside this report)"]
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- the environment


def collect_env() -> dict:
    """Device, driver, versions and date, as this Python sees them."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "dry_run": os.environ.get("FDFO_GPU_DRY_RUN") == "1"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu (no CUDA device)"
    info["driver"] = None
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
    except Exception:  # no NVIDIA library (a CPU machine), or an old binding
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    packages = {}
    for name in ("diffusers", "deepspeed", "transformers", "peft", "accelerate", "safetensors", "numpy",
                 "pydantic", "hjson", "nvidia-ml-py"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    commit = os.environ.get("FDFO_COMMIT")
    if not commit:
        try:
            q = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parents[1])
            commit = q.stdout.strip() if q.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    info["commit"] = commit
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", type=Path, help="run_gpu.sh output folders (one per command)")
    ap.add_argument("--out", type=Path, default=None, help="the report (default: the first folder's gpu_report.md)")
    ap.add_argument("--env", type=Path, default=None, help="record the environment as JSON to this file and exit")
    args = ap.parse_args(argv)
    if args.env:
        info = collect_env()
        args.env.parent.mkdir(parents=True, exist_ok=True)
        args.env.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        return 0
    if not args.dirs:
        ap.error("give at least one output folder (or --env FILE)")
    text = build(args.dirs)
    out = args.out or args.dirs[0] / "gpu_report.md"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)  # a reader never sees half a report
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
