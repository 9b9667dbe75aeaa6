"""benchmarks/run_gpu.sh end to end on CPU: both commands' parts at tiny size, and its wheel install.

The dry run (FDFO_GPU_DRY_RUN=1) executes every part's code path with each benchmark's tiny
flags; only what strictly needs CUDA is skipped (CUDA graphs, the GPU tests), and the report
says why. The two commands run side by side, as they are independent. The wheel install is
checked with wheel folders made here: one with a torch wheel (refused), one with a small
wheel built here (installed into the target folder, then found there), one empty.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
GROUPS = {"1": ["env", "aot", "kernels", "sampling_off", "tests", "zero_lora"],
          "2": ["env", "sampling_on", "epoch", "zero_full", "zero_offload", "levers"]}
TITLES = {"env": "## Environment", "tests": "## GPU tests", "aot": "## Kernels compiled for sm_90",
          "kernels": "## Kernels against eager", "sampling_off": "## Sampling, CFG off",
          "sampling_on": "## Sampling, CFG on", "epoch": "## One epoch", "zero_lora": "## ZeRO stages, LoRA",
          "zero_full": "## ZeRO-3, full fine-tuning", "zero_offload": "## ZeRO-3 with CPU offload",
          "levers": "## Large-model levers"}


def _env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, FDFO_GPU_SITE=str(tmp_path / "site"), OMP_NUM_THREADS="1",
               FDFO_WHEELS=str(tmp_path / "no-wheels"))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja for DeepSpeed's ops
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FDFO_GPU_TESTS"):
        env.pop(k, None)
    env.update(extra)
    return env


def _status(out: Path) -> dict[str, dict]:
    return {r["part"]: r for r in map(json.loads, (out / "status.jsonl").read_text().splitlines())}


def _section(report: str, title: str) -> str:
    start = report.index(title)
    end = report.find("\n## ", start + 1)
    return report[start:end if end > 0 else len(report)]


def _has_number_row(section: str) -> bool:
    """A Markdown table row with a measured number in one of its cells (1,040 or 0.761 or 4.00× or 12.5%)."""
    number = re.compile(r"^-?[\d,]*\d(\.\d+)?(×|%)?$")
    return any(line.startswith("| ") and any(number.match(c.strip()) for c in line.strip("|").split("|"))
               for line in section.splitlines())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Both commands of the GPU run, side by side, at tiny size on CPU."""
    tmp = tmp_path_factory.mktemp("run_gpu")
    (tmp / "no-wheels").mkdir()
    procs = {}
    try:
        for group in GROUPS:
            out = tmp / f"out{group}"
            procs[group] = (out, subprocess.Popen(
                ["bash", str(SCRIPT), str(out), group], cwd=ROOT, env=_env(tmp, FDFO_GPU_DRY_RUN="1"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        results = {}
        for group, (out, proc) in procs.items():
            stdout, _ = proc.communicate(timeout=900)
            results[group] = (out, proc.returncode, stdout)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_dry_run_every_part_reports_numbers(dry_run, group):
    out, rc, stdout = dry_run[group]
    assert rc == 0, stdout[-4000:]
    status = _status(out)
    assert list(status) == ["install", *GROUPS[group]], stdout[-4000:]
    bad = {p: r for p, r in status.items() if r["status"] != "ok"}
    assert not bad, "\n".join(f"{p}: {r}\n{(out / (p + '.log')).read_text()[-2000:]}"
                              for p, r in bad.items() if (out / (p + ".log")).exists())
    report = (out / "gpu_report.md").read_text()
    assert "**Dry run**" in report
    assert "| device (as torch names it) | cpu (no CUDA device) |" in report
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["date"] and env["device"] == "cpu (no CUDA device)" and env["cuda_available"] is False
    for part in GROUPS[group]:
        section = _section(report, TITLES[part])
        if part not in ("env", "tests"):
            assert _has_number_row(section), f"{part}: no table with numbers\n{section}"
    assert "## Raw results" in report


def test_dry_run_benchmark_results(dry_run):
    """What each benchmark measured at tiny size (the smoke checks of its JSON)."""
    one, two = dry_run["1"][0], dry_run["2"][0]

    aot = json.loads((one / "aot.json").read_text())
    assert aot["kernels"] and all(k["arch"] == 90 and k["registers"] > 0 and k["local"] == 0 for k in aot["kernels"])

    kernels = json.loads((one / "kernels.json").read_text())
    assert kernels["complete"] and all(c["ok"] for c in kernels["checks"])
    assert {(r["kernel"], r["impl"]) for r in kernels["results"]} == {
        (k, i) for k in ("fd_loss", "churn_step", "pair_delta") for i in ("triton", "eager")}
    assert all(r["seconds"] > 0 for r in kernels["results"])
    assert kernels["meta"]["skipped_impls"] == {"compile": "--no-compile"}

    for out, cfg in ((one, "off"), (two, "on")):
        sampling = json.loads((out / f"sampling_{cfg}.json").read_text())
        by = {r["variant"]: r for r in sampling["results"]}
        assert sampling["complete"] and all(r["cfg"] is (cfg == "on") for r in by.values())
        assert by["published"]["images_per_s"] > 0 and by["eager"]["images_per_s"] > 0
        assert by["graph"]["skipped"] == "CUDA graphs need a CUDA device"
        assert "CUDA graphs need a CUDA device" in (out / "gpu_report.md").read_text()

    epoch = json.loads((two / "epoch.json").read_text())
    by = {r["variant"]: r for r in epoch["variants"]}
    assert epoch["complete"] and set(by) == {"fast", "published"}
    for r in by.values():
        assert r["pairs_per_s"] > 0 and r["sample_s"] > 0 and r["train_s"] > 0 and not r["skipped"]
        assert len(r["warmup"]) == 1 and r["warmup"][0]["pairs_per_s"] > 0  # the cold epoch, recorded
        # transformer FLOPs per row: training (forward + backward) costs more than sampling
        assert r["sample_flops_per_row"] > 0 and 1.5 < r["train_flops_per_row"] / r["sample_flops_per_row"] < 3
        assert r["peak_tflops"] is None and r["sample_mfu"] is None  # no peak for a CPU: no MFU claimed
    assert by["fast"]["kernels"] == "auto" and by["fast"]["cuda_graphs"] is True
    assert by["published"]["kernels"] == "torch" and by["published"]["cuda_graphs"] is False
    assert by["published"]["sampler"] == "sample_pairs+sync"
    assert epoch["speedup_fast_over_published"] > 0
    assert "fast / published" in (two / "gpu_report.md").read_text()

    levers = {r["variant"]: r for r in json.loads((two / "levers.json").read_text())["variants"]}
    assert set(levers) == {"fast", "host", "sdpa_math"}
    assert levers["host"]["trajectory_device"] == "host" and levers["sdpa_math"]["attention_backend"] == "_native_math"
    assert all(r["pairs_per_s"] > 0 for r in levers.values())
    assert levers["host"]["trajectory_device_mib"] < levers["fast"]["trajectory_device_mib"]

    zero = {p: [json.loads(line) for line in (out / f"{p}.jsonl").read_text().splitlines()]
            for out, p in ((one, "zero_lora"), (two, "zero_full"), (two, "zero_offload"))}
    # zero_lora: the SD3 stages, then the FLUX ZeRO-3 row (on the GPU: SD3.5 Medium, then FLUX.1 [dev] and SD3.5 Large)
    assert [(r["arch"], r["family"], r["stage"], r["offload"], r["full"]) for r in zero["zero_lora"]] == [
        ("tiny", "sd3", 0, False, False), ("tiny", "sd3", 2, False, False), ("tiny", "sd3", 3, False, False),
        ("flux-tiny", "flux", 3, False, False)]
    assert zero["zero_lora"][-1]["latent"] == 4 and zero["zero_lora"][-1]["text_tokens"] == 8
    assert [(r["arch"], r["stage"], r["offload"], r["full"]) for r in zero["zero_full"]] == [("tiny", 3, False, True)]
    assert [(r["arch"], r["stage"], r["offload"], r["full"]) for r in zero["zero_offload"]] == [("tiny", 3, True, False)]
    assert all(r["samples_per_s"] > 0 and r["step_s"] > 0 for rs in zero.values() for r in rs)
    assert "| flux-tiny | 3 | no | LoRA r=32 |" in _section((one / "gpu_report.md").read_text(), TITLES["zero_lora"])

    tests = _section((one / "gpu_report.md").read_text(), TITLES["tests"])
    assert "skipped" in tests and "needs CUDA" in tests


def test_two_folders_make_one_report(dry_run, tmp_path):
    one, two = dry_run["1"][0], dry_run["2"][0]
    merged = tmp_path / "report.md"
    subprocess.run([sys.executable, "benchmarks/gpu_report.py", str(one), str(two), "--out", str(merged)],
                   cwd=ROOT, check=True, capture_output=True)
    text = merged.read_text()
    for part in {p for g in GROUPS.values() for p in g}:
        assert TITLES[part] in text, part
    assert text.count("## Environment") == 1


# --------------------------------------------------------------------------- the wheel install


def _wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure wheel of a one-module package named `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(f, text)
    return path


def _install(tmp_path: Path, wheels: Path, *parts: str, **extra) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), *(parts or ("install",))], cwd=ROOT,
                          env=_env(tmp_path, FDFO_WHEELS=str(wheels), **extra), capture_output=True, text=True,
                          timeout=300)
    return proc, out


def test_install_puts_missing_wheels_on_the_path(tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "fdfo_fake_dep")
    proc, out = _install(tmp_path, wheels, FDFO_GPU_REQUIRED="fdfo_fake_dep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = _status(out)["install"]
    assert rec["status"] == "ok" and "installed 1 wheels" in rec["reason"], rec
    assert (tmp_path / "site" / "fdfo_fake_dep" / "__init__.py").read_text() == "VALUE = 42\n"
    # a second command on the same machine finds it there and installs nothing
    proc, out = _install(tmp_path, wheels, FDFO_GPU_REQUIRED="fdfo_fake_dep")
    assert _status(out)["install"]["reason"] == "nothing to install: every package is already there"
    assert "present: fdfo_fake_dep 1.0" in (out / "install.log").read_text()


def test_install_refuses_torch_and_says_what_is_missing(tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "fdfo_fake_dep")
    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    proc, out = _install(tmp_path, wheels, FDFO_GPU_REQUIRED="fdfo_fake_dep")
    rec = _status(out)["install"]
    assert rec["status"] == "refused" and "torch or triton wheel" in rec["reason"], rec
    assert not (tmp_path / "site").exists()  # nothing installed, not even the harmless wheel

    empty = tmp_path / "empty"
    empty.mkdir()
    proc, out = _install(tmp_path, empty, FDFO_GPU_REQUIRED="fdfo_fake_dep")
    rec = _status(out)["install"]
    assert rec["status"] == "failed" and "scripts/gpu_wheels.sh" in rec["reason"], rec
    assert "## Wheel install" in (out / "gpu_report.md").read_text()


def test_failed_and_timed_out_parts_do_not_stop_the_others(tmp_path):
    """A failing part, then one cut by its limit, then one skipped for want of time: each is recorded
    with its status, the command goes on, and the report shows the failures' log tails."""
    proc, out = _install(tmp_path, tmp_path / "no-wheels", "tests", "env", FDFO_GPU_TESTS="tests/no_such_file.py",
                         FDFO_GPU_MAX_PART_S="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = _status(out)
    assert status["tests"]["status"] in ("failed", "timeout") and status["env"]["status"] == "timeout"
    report = (out / "gpu_report.md").read_text()
    assert "Last lines of `env.log`" in report and "Status: **timeout** (killed after 1s)" in report

    proc, out = _install(tmp_path, tmp_path / "no-wheels", "env", FDFO_GPU_BUDGET_S="5")
    rec = _status(out)["env"]
    assert rec["status"] == "skipped" and "no time left" in rec["reason"], rec
    assert not (out / "env.json").exists()


def test_report_on_partial_results(tmp_path):
    """A command killed mid-run: one part's JSON is partial, another never recorded a status."""
    (tmp_path / "run.json").write_text(json.dumps({"parts": "kernels epoch", "dry_run": False, "budget_s": 450,
                                                   "started": "2026-01-01T00:00:00Z"}))
    (tmp_path / "status.jsonl").write_text(json.dumps(
        {"part": "kernels", "status": "timeout", "rc": 124, "seconds": 150, "limit_s": 150,
         "reason": "killed after 150s", "command": "python benchmarks/bench_kernels.py", "log": "kernels.log"}) + "\n")
    rec = {"kernel": "fd_loss", "variant": "fwd", "res": 512, "rows": 6, "dtype": "bf16",
           "case": "fd_loss-fwd-512px-6rows-bf16", "min_bytes": 1, "frac_of_copy": 0.5, "peak_extra_bytes": 2**20}
    (tmp_path / "kernels.json").write_text(json.dumps({
        "meta": {"device": "NVIDIA H200", "copy_gbps": 4300.0, "cases": [rec["case"]]}, "complete": False,
        "checks": [{"case": rec["case"], "ok": True}],
        "results": [{**rec, "impl": "triton", "seconds": 5e-6, "gbps": 2150.0},
                    {**rec, "impl": "eager", "seconds": 2e-5, "gbps": 540.0}]}))
    (tmp_path / "kernels.log").write_text("compiling\nstill compiling\n")
    (tmp_path / "epoch.log").write_text("building models\n")
    subprocess.run([sys.executable, "benchmarks/gpu_report.py", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    report = (tmp_path / "gpu_report.md").read_text()
    parts = _section(report, "## Parts")
    assert "| kernels | timeout (partial results) | 150 | 150 | killed after 150s |" in parts
    assert "| epoch | did not finish" in parts
    kernels = _section(report, TITLES["kernels"])
    assert "the results below are partial" in kernels and "still compiling" in kernels
    assert "| `fd_loss-fwd-512px-6rows-bf16` | 5.00 | 20.0 | – | 4.00× | – | 2,150 | 50.0% | 1.0 / 1.0 |" in kernels
    assert "building models" in _section(report, TITLES["epoch"])
