"""The GPU run's report and its bundle: gpu_report.md, one JSON and logs.tar.gz per command.

    python benchmarks/gpu_report.py OUT                  # (re)writes OUT/gpu_report.md
    python benchmarks/gpu_report.py OUT1 OUT2 --out R.md # several commands' folders in one report
    python benchmarks/gpu_report.py --env FILE           # the import smoke and environment (run_gpu.sh's env part)
    python benchmarks/gpu_report.py --bundle WORK OUT --name NAME   # run_gpu.sh, after every part

benchmarks/run_gpu.sh runs its parts in a scratch folder WORK (run.json, status.jsonl, each
part's JSON, JSONL, junit XML and log) and, after every part, calls ``--bundle``: OUT gets
NAME.json (``"format": "fdfo-gpu-run/1"``; the command, and per part its status line and every
result file, parsed), logs.tar.gz (the logs, the junit XML and nvidia-smi's output) and
gpu_report.md, written from those two files. A folder of loose files (an older run's OUT, or
WORK itself) is read too.

The report: the device, the versions and the import smoke, the parts' statuses, a table per
part in the form of benchmarks/RESULTS.md, and the status and log tail of every part that
failed, timed out, was skipped or never finished; a benchmark whose JSON says
``"complete": false`` is marked partial.

Only the standard library is imported (except for --env, which imports torch and the stack),
so the report is written after every part in a fraction of a second.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BUNDLE_FORMAT = "fdfo-gpu-run/1"
PART_FILES = {
    "env": ["env.json", "nvidia-smi.txt"], "sampling": ["sampling.json"], "train": ["train.json"],
    "epoch": ["epoch.json"], "levers": ["levers.json"], "tests": ["tests.xml"], "aot": ["aot.json"],
    "kernels": ["kernels.json"], "sampling_off": ["sampling_off.json"], "sampling_on": ["sampling_on.json"],
    "large_levers": ["large_levers.json"], "zero_lora": ["zero_lora.jsonl"], "zero_full": ["zero_full.jsonl"],
    "zero_offload": ["zero_offload.jsonl"],
}
LOG_SUFFIXES = (".log", ".xml", ".txt")  # what goes into logs.tar.gz (the XML and text are parsed into the JSON too)
INLINE_BYTES = 24_000  # loose folders: raw JSON up to this size is inlined in the report
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


def parse_jsonl(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    return rows


def read_jsonl(path: Path) -> list[dict]:
    try:
        return parse_jsonl(path.read_text())
    except OSError:
        return []


def parse_junit(text: str) -> list[dict]:
    """The test cases of a junit XML report: name, outcome (passed, failed, error, skipped), seconds, reason."""
    cases = []
    for tc in ET.fromstring(text).iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}".strip(":")
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (el.get("message") or "").replace("\n", " ")[:160]
        cases.append({"name": name, "outcome": outcome, "seconds": float(tc.get("time") or 0), "reason": detail})
    return cases


def load_file(path: Path):
    """A part's result file, parsed by its kind: JSON, JSON lines (a list), junit XML (a list of cases),
    text (a string); None when absent. A JSON file that does not parse is kept as its text."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError:
            return {"unreadable": text[-4000:]}
    if path.suffix == ".jsonl":
        return parse_jsonl(text)
    if path.suffix == ".xml":
        try:
            return parse_junit(text)
        except ET.ParseError:
            return None
    return text


def tail(text: str | None, n: int = LOG_TAIL) -> str:
    if text is None:
        return "(no log)"
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]  # progress bars: keep the last state
    return "\n".join(lines[-n:]) or "(empty log)"


def log_tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        return tail(path.read_text(errors="replace"), n)
    except OSError:
        return "(no log)"


def find_bundle(d: Path) -> Path | None:
    """The bundle JSON of a run_gpu.sh output folder (None: a folder of loose files)."""
    for path in sorted(d.glob("*.json")):
        data = read_json(path)
        if isinstance(data, dict) and data.get("format") == BUNDLE_FORMAT:
            return path
    return None


class Source:
    """One command's results, from its bundle (NAME.json and logs.tar.gz) or from loose files (run.json,
    status.jsonl, the parts' files and logs side by side)."""

    def __init__(self, d: Path):
        self.dir = d
        self.bundle_path = find_bundle(d)
        if self.bundle_path is not None:
            data = read_json(self.bundle_path)
            self.run = data.get("run") or {}
            parts = data.get("parts") or {}
            self.statuses = [p["status"] for p in parts.values() if p.get("status")]
            self.files = {f: v for p in parts.values() for f, v in (p.get("results") or {}).items()}
        else:
            self.run = read_json(d / "run.json") or {}
            self.statuses = read_jsonl(d / "status.jsonl")
            self.files = None

    def get(self, name: str):
        """A result file by name, parsed (load_file); None when absent."""
        if self.files is not None:
            return self.files.get(name)
        return load_file(self.dir / name)

    def text(self, name: str) -> str | None:
        """A log (or other text) by name: from logs.tar.gz beside a bundle, else the loose file."""
        if self.files is None:
            try:
                return (self.dir / name).read_text(errors="replace")
            except OSError:
                return None
        try:
            with tarfile.open(self.dir / "logs.tar.gz") as tar:
                member = tar.extractfile(name)
                return member.read().decode(errors="replace") if member else None
        except (OSError, KeyError, tarfile.TarError):
            return None


def rate(a, b):
    """a / b as 'x.xx×' ('–' unless both are positive numbers)."""
    return f"{a / b:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and b else "–"


# --------------------------------------------------------------------------- one section per part


def section_env(src: Source) -> str:
    out = []
    env = src.get("env.json") or {}
    imports = env.get("imports") or {}
    if imports:
        rows = [[f"`{m}`", "yes" if r.get("ok") else "**no**", r.get("version") or "–", num(r.get("seconds")),
                 (r.get("error") or "")[:200]] for m, r in imports.items()]
        out.append(table(["module", "imports", "version", "import s", "error"], rows))
    smoke = env.get("matmul")
    if smoke:
        if smoke.get("tflops"):
            out.append(f"bf16 matmul {smoke['n']}³: {num(smoke['tflops'])} TFLOP/s"
                       + (f" ({pct(smoke['tflops'] / env['peak_bf16_tflops'])} of the {num(env['peak_bf16_tflops'])}"
                          " TFLOP/s dense bf16 peak)" if env.get("peak_bf16_tflops") else ""))
        else:
            out.append(f"bf16 matmul: {smoke.get('skipped') or smoke.get('error')}")
    smi = src.get("nvidia-smi.txt")
    if smi:
        out.append("<details><summary>nvidia-smi</summary>\n\n```\n" + smi.strip() + "\n```\n</details>")
    return "\n\n".join(out)


def section_tests(src: Source) -> str:
    cases = src.get("tests.xml") or []
    if not cases:  # no XML (the run was cut short): the verbose log's result lines
        for line in (src.text("tests.log") or "").splitlines():
            for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
                if f" {outcome}" in line and "::" in line:
                    cases.append({"name": line.split(" ")[0], "outcome": outcome.lower(), "seconds": None,
                                  "reason": ""})
                    break
    if not cases:
        return ""
    counts = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    head = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    rows = [[f"`{c['name']}`", c["outcome"], num(c["seconds"]) if c.get("seconds") is not None else "–",
             c.get("reason") or ""] for c in cases]
    return f"{head}\n\n" + table(["test", "outcome", "seconds", "reason"], rows)


def section_aot(src: Source) -> str:
    data = src.get("aot.json")
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


def section_kernels(src: Source) -> str:
    data = src.get("kernels.json")
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


def sampling_cells(r: dict, reference) -> list:
    """The measured cells of a sampling result, in ``SAMPLING_COLUMNS``' order after its own keys: images/s
    as a ratio to ``reference`` (images/s), or 'skipped' and why."""
    if "images_per_s" not in r:
        return ["skipped"] + ["–"] * (len(SAMPLING_COLUMNS) - 2) + [r.get("skipped", "")]
    return [r.get("mode", "–"), num(r["images_per_s"]), rate(r["images_per_s"], reference), num(r.get("tflops")),
            pct(r.get("mfu")), num(r.get("warmup_s")), num(r.get("peak_gib")),
            {True: "yes", False: "no"}.get(r.get("bitwise_equal_eager"), "–"), ""]


SAMPLING_COLUMNS = ["mode", "images/s", "× {}", "TFLOP/s", "MFU", "warm-up s", "peak GiB", "bit-equal to eager",
                    "note"]


def sampling_columns(reference: str) -> list[str]:
    return [c.format(reference) for c in SAMPLING_COLUMNS]


def section_sampling(src: Source, part: str) -> str:
    data = src.get(f"{part}.json")
    if not data:
        return ""
    res = data.get("results", [])
    ref = {(r["cfg"], r["rows"]): r["images_per_s"] for r in res if r["variant"] == "published" and "images_per_s" in r}
    rows = [["on" if r.get("cfg") else "off", r["rows"], r["variant"],
             *sampling_cells(r, ref.get((r["cfg"], r["rows"])))] for r in res]
    a = data.get("args", {})
    head = (f"{data.get('device', '?')}, {a.get('arch', '?')}, {a.get('latent', '?')}² latents, {a.get('steps', '?')} "
            f"steps, LoRA r={a.get('lora', '?')}, {a.get('text_tokens', '?')} text tokens, "
            f"{a.get('repeats', '?')} timed repeat(s)")
    return head + "\n\n" + table(["CFG", "rows", "variant", *sampling_columns("published")], rows)


def section_quick_sampling(src: Source) -> str:
    """bench_train.py --phase sample: eager / graph / graph + compile, with LoRA and without."""
    data = src.get("sampling.json")
    if not data:
        return ""
    res = data.get("results", [])
    done = [r for r in res if "images_per_s" in r]
    eager = {r["lora"]: r["images_per_s"] for r in done if r["variant"] == "eager"}
    rows = [[f"r={r['lora']}" if r.get("lora") else "none", r["variant"], *sampling_cells(r, eager.get(r["lora"]))]
            for r in res]
    a = data.get("args", {})
    head = (f"{data.get('device', '?')}, {a.get('arch', '?')}, {a.get('latent', '?')}² latents, {a.get('rows', '?')} rows, "
            f"CFG off, {a.get('text_tokens', '?')} text tokens, {a.get('steps', '?')} steps, "
            f"{a.get('repeats', '?')} timed repeat(s), compile: {a.get('compile', '?')}; LoRA weights "
            f"{data.get('lora_dtype', '?')}. Mode `graph`: the step was captured and replayed; `eager`: it was not "
            "(the log says why). Warm-up: buffers, capture and compilation.")
    out = head + "\n\n" + table(["LoRA", "variant", *sampling_columns("eager")], rows)
    by = {(r["lora"], r["variant"]): r["images_per_s"] for r in done}
    ranks = sorted({r["lora"] for r in done if r.get("lora")})
    cost = [f"{v} {rate(by[(k, v)], by.get((0, v)))}" for k in ranks for v in dict.fromkeys(r["variant"] for r in done)
            if (k, v) in by and (0, v) in by]
    if cost:
        out += ("\n\nLoRA's cost, images/s with LoRA r=" + "/".join(map(str, ranks)) + " over without: "
                + ", ".join(cost))
    return out


def section_train(src: Source) -> str:
    """bench_train.py --phase train: one forward + backward, eager and compiled, at several row counts."""
    data = src.get("train.json")
    if not data:
        return ""
    res = data.get("results", [])
    done = [r for r in res if "step_s" in r]
    eager = {r["rows"]: r["rows_per_s"] for r in done if r["variant"] == "eager"}
    rows = []
    for r in res:
        if "step_s" not in r:
            rows.append([r["rows"], r["variant"], "skipped"] + ["–"] * 6 + [r.get("skipped", "")])
            continue
        rows.append([r["rows"], r["variant"], num(1000 * r["step_s"]), num(r["rows_per_s"]),
                     rate(r["rows_per_s"], eager.get(r["rows"])), num(r.get("tflops")), pct(r.get("mfu")),
                     num(r.get("warmup_s")), num(r.get("peak_gib")), ""])
    a = data.get("args", {})
    head = (f"{data.get('device', '?')}, {a.get('arch', '?')}, {a.get('latent', '?')}² latents, "
            f"{a.get('text_tokens', '?')} text tokens, LoRA r={a.get('lora', '?')} ({data.get('lora_dtype', '?')} "
            f"weights), the FD loss; {a.get('iters', '?')} timed micro-batch(es) after the warm-up; compile: "
            f"{a.get('compile', '?')}; FLOPs: forward + backward to the LoRA weights and the inputs")
    out = head + "\n\n" + table(["rows", "variant", "ms per micro-batch", "rows/s", "× eager", "TFLOP/s", "MFU",
                                 "warm-up s", "peak GiB", "note"], rows)
    effect = []
    for v in dict.fromkeys(r["variant"] for r in done):
        got = sorted((r["rows"], r["rows_per_s"]) for r in done if r["variant"] == v)
        if len(got) > 1:
            effect.append(f"{v} {rate(got[-1][1], got[0][1])} ({got[-1][0]} rows against {got[0][0]})")
    if effect:
        out += "\n\nMicro-batch effect, rows/s: " + ", ".join(effect)
    return out


def _epoch_rows(data: dict) -> list[list]:
    rows = []
    for r in data.get("variants", []):
        if r.get("error") or r.get("skipped_reason"):
            rows.append([r["variant"], f"{'skipped' if r.get('skipped_reason') else 'failed'}: "
                                       f"{r.get('skipped_reason') or r['error']}"] + ["–"] * 11)
            continue
        cold = (r.get("warmup") or [{}])[0].get("pairs_per_s") if r.get("warmup") else None
        share = r["sample_s"] / r["epoch_s"] if r.get("sample_s") and r.get("epoch_s") else None
        rows.append([r["variant"], r.get("sampler", "–"), r.get("kernels", "–"), num(r.get("pairs_per_s")),
                     num(r.get("sample_s")), num(r.get("train_s")), num(r.get("epoch_s")), pct(share), num(cold),
                     pct(r.get("sample_mfu")), pct(r.get("train_mfu")), num(r.get("peak_gib")),
                     num(r.get("trajectory_device_mib"))])
    return rows


def _epoch_head(data: dict) -> str:
    return (f"{data.get('device', '?')}: {data.get('models', '?')}; {data.get('pairs')} pairs, {data.get('steps')} "
            f"steps, guidance {data.get('guidance')}; timed epoch after "
            f"{(data.get('variants') or [{}])[0].get('warmup_epochs', 0)} warm-up epoch(s) (cold = the first epoch)")


EPOCH_HEADER = ["variant", "sampler", "kernels", "pairs/s", "sample s", "train s", "epoch s", "sampling share",
                "cold epoch pairs/s", "sampling MFU", "training MFU", "peak GiB", "trajectories on GPU MiB"]


def section_epoch(src: Source, name: str = "epoch") -> str:
    data = src.get(f"{name}.json")
    if not data:
        return ""
    ratio = data.get("speedup_fast_over_published")
    tail_ = f"\n\nfast / published: **{ratio:.2f}×** pairs/s (same invocation)" if ratio else ""
    return _epoch_head(data) + "\n\n" + table(EPOCH_HEADER, _epoch_rows(data)) + tail_


def section_levers(src: Source) -> str:
    """bench_epoch.py's MFU levers: each variant against `baseline` (today's path), same invocation."""
    data = src.get("levers.json")
    if not data:
        return ""
    rows = []
    for r in data.get("variants", []):
        vs = r.get("vs_baseline") or {}
        if r.get("error") or r.get("skipped_reason") or r.get("pairs_per_s") is None:
            why = r.get("skipped_reason") or r.get("error") or "epoch skipped (non-finite rewards)"
            rows.append([r["variant"], r.get("lever", ""), why] + ["–"] * 9)
            continue
        rows.append([r["variant"], r.get("lever", ""), num(r["pairs_per_s"]), rate(vs.get("pairs_per_s"), 1),
                     num(r.get("sample_s")), rate(vs.get("sample"), 1), num(r.get("train_s")), rate(vs.get("train"), 1),
                     pct(r.get("sample_mfu")), pct(r.get("train_mfu")), r.get("micro_batch_rows", "–"),
                     num(r.get("peak_gib"))])
    head = (_epoch_head(data) + ". Each lever is `baseline` (today's path) with that one setting changed; "
            "× baseline is the speed-up over `baseline` measured in the same invocation (pairs/s, and the "
            "sampling and training phases' times).")
    return head + "\n\n" + table(["variant", "lever", "pairs/s", "× baseline", "sample s", "sampling × baseline",
                                  "train s", "training × baseline", "sampling MFU", "training MFU",
                                  "train micro-batch rows", "peak GiB"], rows)


def section_zero(src: Source, part: str) -> str:
    rows = []
    for r in src.get(f"{part}.jsonl") or []:
        rows.append([r.get("arch"), r.get("stage"), "yes" if r.get("offload") else "no",
                     "full" if r.get("full") else "LoRA r=32", r.get("world"), r.get("rows"), num(r.get("samples_per_s")),
                     num(1000 * r["step_s"]) if r.get("step_s") else "–", num(r.get("peak_gib")), r.get("device", "?")])
    if not rows:
        return ""
    return table(["arch", "ZeRO stage", "offload", "trained", "ranks", "rows", "samples/s", "step ms",
                  "peak GiB", "device"], rows)


SECTIONS = {
    "env": ("Environment and import smoke", section_env),
    "sampling": ("Sampling one micro-batch: eager, CUDA graph, graph + compile, with and without LoRA "
                 "(`bench_train.py --phase sample`)", section_quick_sampling),
    "train": ("One training micro-batch: eager and compiled (`bench_train.py --phase train`)", section_train),
    "epoch": ("One epoch: fast path against the published formulation (`bench_epoch.py`)", section_epoch),
    "levers": ("MFU levers: one epoch each against today's path (`bench_epoch.py`)", section_levers),
    "tests": ("GPU tests (`tests/test_graphs.py`, `tests/test_kernels.py`)", section_tests),
    "aot": ("Kernels compiled for sm_90 (`fdfo.kernels.aot`)", section_aot),
    "kernels": ("Kernels against eager and torch.compile (`bench_kernels.py`)", section_kernels),
    "sampling_off": ("Sampling, CFG off (`bench_sampling.py`)", lambda s: section_sampling(s, "sampling_off")),
    "sampling_on": ("Sampling, CFG on (`bench_sampling.py`)", lambda s: section_sampling(s, "sampling_on")),
    "large_levers": ("Large-model levers: host trajectories and SDPA kernels, each on the fast path (`bench_epoch.py`)",
                     lambda s: section_epoch(s, "large_levers")),
    "zero_lora": ("ZeRO stages, LoRA (`bench_zero.py`; SD3.5 Medium, and FLUX.1 [dev] and SD3.5 Large at ZeRO-3, "
                  "on the GPU)", lambda s: section_zero(s, "zero_lora")),
    "zero_full": ("ZeRO-3, full fine-tuning (`bench_zero.py`; SD3.5 Medium on the GPU)", lambda s: section_zero(s, "zero_full")),
    "zero_offload": ("ZeRO-3 with CPU offload, LoRA (`bench_zero.py`; SD3.5 Large on the GPU)",
                     lambda s: section_zero(s, "zero_offload")),
}


# --------------------------------------------------------------------------- the report


def _complete(src: Source, part: str) -> bool | None:
    for f in PART_FILES.get(part, []):
        data = src.get(f) if f.endswith(".json") else None
        if isinstance(data, dict) and "complete" in data:
            return bool(data["complete"])
    return None


def build(dirs: list[Path]) -> str:
    statuses, sources, env = {}, [], None
    for d in dirs:
        src = Source(d)
        sources.append(src)
        for rec in src.statuses:
            statuses[rec["part"]] = {**rec, "src": src}
        env = env or src.get("env.json")
    planned = []
    for src in sources:
        for p in ["install", *str(src.run.get("parts", "")).split()]:
            if p not in [q for q, _ in planned]:
                planned.append((p, src))
    for p, rec in statuses.items():
        if p not in [q for q, _ in planned]:
            planned.append((p, rec["src"]))

    env = env if isinstance(env, dict) else {}
    dry = any(src.run.get("dry_run") for src in sources)
    out = [f"# GPU figures: {env.get('device', 'device unknown (no env part)')}", ""]
    if dry:
        out += ["**Dry run** (`FDFO_GPU_DRY_RUN=1`): tiny sizes, no GPU; these numbers only show that every "
                "part runs, they are not figures.", ""]
    pk = env.get("packages") or {}

    def command(src: Source) -> str:
        r = src.run
        took = f", took {r['seconds']} s" if r.get("seconds") is not None else ", did not finish"
        return (f"`run_gpu.sh {src.dir.name} {r.get('label') or r.get('parts', '?')}` (parts {r.get('parts', '?')}; "
                f"budget {r.get('budget_s', '?')} s, started {r.get('started', '?')}{took})")

    info = [
        ["device (as torch names it)", env.get("device", "–")],
        ["GPU memory, SMs, compute capability", f"{num(env.get('memory_gib'))} GiB, {env.get('sm_count', '–')}, "
                                                f"{env.get('capability', '–')}" if env.get("memory_gib") else "–"],
        ["dense bf16 peak (by name, fdfo.flops)", f"{num(env['peak_bf16_tflops'])} TFLOP/s"
                                                  if env.get("peak_bf16_tflops") else "–"],
        ["driver", env.get("driver") or "–"],
        ["torch / CUDA / triton", f"{env.get('torch', '–')} / {env.get('cuda') or '–'} / {env.get('triton') or '–'}"],
        ["python", env.get("python", "–")],
        ["diffusers / deepspeed / transformers / peft",
         " / ".join(str(pk.get(k) or "–") for k in ("diffusers", "deepspeed", "transformers", "peft"))],
        ["date (UTC)", env.get("date", "–")],
        ["commit", env.get("commit") or "–"],
        ["commands", "; ".join(command(src) for src in sources)],
    ]
    out += [table(["", ""], info), ""]

    rows = []
    for p, src in planned:
        rec = statuses.get(p)
        if rec is None:
            rows.append([p, "did not finish (the command stopped during or before it)", "–", "–", ""])
            continue
        partial = _complete(src, p) is False
        status = rec["status"] + (" (partial results)" if partial and rec["status"] != "ok" else "")
        rows.append([p, status, rec.get("seconds", "–"), rec.get("limit_s") or "–", rec.get("reason") or ""])
    out += ["## Parts", "", table(["part", "status", "seconds", "limit s", "note"], rows), ""]

    for p, src in planned:
        if p not in SECTIONS:
            continue
        title, fn = SECTIONS[p]
        rec = statuses.get(p, {})
        status = rec.get("status", "did not finish")
        try:
            body = fn(src)
        except Exception as exc:  # a malformed file must not cost the rest of the report
            body = f"(could not read this part's results: {type(exc).__name__}: {exc})"
        out += [f"## {title}", ""]
        if status != "ok" or _complete(src, p) is False:
            out += [f"Status: **{status}**" + (f" ({rec['reason']})" if rec.get("reason") else "")
                    + ("; the results below are partial" if _complete(src, p) is False else ""), ""]
        if rec.get("command"):
            out += [f"Command: `{rec['command']}`", ""]
        out += [body or "(no results)", ""]
        if status != "ok":
            out += [f"Last lines of `{p}.log`:", "", "```", tail(src.text(f"{p}.log")), "```", ""]
    if "install" in statuses and statuses["install"]["status"] != "ok":
        out += ["## Wheel install", "", "```", tail(statuses["install"]["src"].text("install.log")), "```", ""]

    out += ["## Raw results", ""]
    for src in sources:
        if src.bundle_path is not None:
            out += [f"- `{src.dir.name}/{src.bundle_path.name}`: every part's status line and results (under "
                    "`parts`), beside this report; the logs are in `logs.tar.gz`"]
            continue
        for p, psrc in planned:
            if psrc is not src:
                continue
            for f in PART_FILES.get(p, []):
                path = src.dir / f
                if not path.exists() or f.endswith((".txt", ".xml")):
                    continue
                size = path.stat().st_size
                if f.endswith((".json", ".jsonl")) and size <= INLINE_BYTES:
                    out += [f"<details><summary>{f}</summary>\n\n```json\n{path.read_text().strip()}\n```\n"
                            "</details>", ""]
                else:
                    out += [f"- `{f}` ({size:,} bytes, beside this report)"]
    out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- the bundle


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # (a reader, or a copy of the folder, never sees half a file)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def bundle(work: Path, out: Path, name: str) -> Path:
    """OUT/NAME.json (every part's status line and parsed results), OUT/logs.tar.gz and OUT/gpu_report.md
    from run_gpu.sh's scratch folder."""
    run = read_json(work / "run.json") or {}
    statuses = {rec["part"]: rec for rec in read_jsonl(work / "status.jsonl")}
    order = list(dict.fromkeys(["install", *str(run.get("parts", "")).split(), *statuses]))
    parts = {}
    for p in order:
        results = {f: load_file(work / f) for f in PART_FILES.get(p, []) if (work / f).exists()}
        if p in statuses or results:
            parts[p] = {"status": statuses.get(p), "results": results}
    data = {"format": BUNDLE_FORMAT, "label": name, "run": run,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "parts": parts}
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file() and path.suffix in LOG_SUFFIXES:
                tar.add(path, arcname=path.name)
    _write_atomic(out / "logs.tar.gz", buf.getvalue())
    _write_atomic(out / f"{name}.json", json.dumps(data, indent=1).encode())
    _write_atomic(out / "gpu_report.md", build([out]).encode())
    return out / f"{name}.json"


# --------------------------------------------------------------------------- the environment


def _import_smoke(modules: tuple[str, ...]) -> dict:
    """Each module imported in turn: whether it imports, its version, seconds, the error."""
    out = {}
    for m in modules:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(m)
            out[m] = {"ok": True, "version": getattr(mod, "__version__", None), "seconds": time.perf_counter() - t0}
        except Exception as exc:  # (a broken install: recorded, the others still tried)
            out[m] = {"ok": False, "version": None, "seconds": time.perf_counter() - t0,
                      "error": f"{type(exc).__name__}: {exc}"[:400]}
    return out


def _matmul_smoke(torch, n: int = 8192, iters: int = 20) -> dict:
    """A bf16 n×n matmul on the GPU: that CUDA works, and the dense throughput this device reaches."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
        return {"n": n, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


IMPORTED = ("torch", "triton", "diffusers", "transformers", "peft", "deepspeed", "fdfo")
MUST_IMPORT = ("torch", "diffusers", "deepspeed", "fdfo")  # the env part fails without one of these


def collect_env() -> dict:
    """Device, driver, versions and date, as this Python sees them, and the import smoke."""
    from importlib.metadata import PackageNotFoundError, version

    imports = _import_smoke(IMPORTED)
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "dry_run": os.environ.get("FDFO_GPU_DRY_RUN") == "1", "imports": imports}
    info["triton"] = imports["triton"]["version"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=props.total_memory / 2**30, sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu (no CUDA device)"
    info["peak_bf16_tflops"] = None
    if imports["fdfo"]["ok"] and torch.cuda.is_available():
        from fdfo.flops import peak_bf16_tflops

        info["peak_bf16_tflops"] = peak_bf16_tflops(info["device"])
    info["matmul"] = _matmul_smoke(torch)
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
    ap.add_argument("--bundle", nargs=2, type=Path, metavar=("WORK", "OUT"), default=None,
                    help="bundle run_gpu.sh's scratch folder WORK into OUT's three files")
    ap.add_argument("--name", default="results", help="--bundle: the JSON's name (NAME.json)")
    args = ap.parse_args(argv)
    if args.env:
        info = collect_env()
        args.env.parent.mkdir(parents=True, exist_ok=True)
        args.env.write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        failed = [m for m in MUST_IMPORT if not info["imports"][m]["ok"]]
        if failed:
            print(f"import smoke failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed or info["matmul"].get("error") else 0
    if args.bundle:
        print(bundle(*args.bundle, args.name))
        return 0
    if not args.dirs:
        ap.error("give at least one output folder (or --env FILE, or --bundle WORK OUT)")
    text = build(args.dirs)
    out = args.out or args.dirs[0] / "gpu_report.md"
    _write_atomic(out, text.encode())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
