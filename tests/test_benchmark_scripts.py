"""The GPU benchmarks: the tables they are built from, and benchmarks/run_gpu.sh end to end on CPU.

The first tests check what the benchmarks build and time without running them. The others run
benchmarks/run_gpu.sh's dry run (FDFO_GPU_DRY_RUN=1: tiny sizes, no CUDA; what needs CUDA is skipped
and says why): the quick group in under 90 s, the MFU levers each against baseline, a command
stopped in mid-part, failing, timed-out and skipped parts, the wheel install, and the report and
bundle (three files per command) from partial results.
"""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_flavours_are_the_published_architectures():
    """SD3.5 Medium and Large transformers from the table have the published parameter counts (2.24 B and
    8.06 B), and every LoRA target names attention projections of every joint block."""
    from diffusers import SD3Transformer2DModel

    from fdfo.models import SD3FlowModel
    from fdfo.models.flavours import ARCHS

    counts = {}
    for name, arch in ARCHS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            model = SD3Transformer2DModel(**arch)
        counts[name] = sum(p.numel() for p in model.parameters())
        blocks = len(model.transformer_blocks)
        for target in SD3FlowModel.LORA_TARGETS:  # (what the trainer and the benchmarks adapt)
            hits = [n for n, _ in model.named_modules() if n.endswith("." + target)]
            # the last block's text stream has no output projection (context_pre_only)
            assert blocks - 1 <= len(hits) <= blocks, (name, target, len(hits))
    assert counts["sd35-medium"] == 2_243_171_520
    assert counts["sd35-large"] == 8_056_627_520
    assert counts["tiny"] < 100_000


def test_bench_kernels_cases_select_shapes():
    from benchmarks.bench_kernels import cases

    default = cases(small=False)
    assert len(default) == 5 * (2 * 3 + 1)  # every kernel variant: bf16 at 2 sides × 3 row counts, one fp32 case
    assert [c.id for c in default if c.dtype == "fp32"][0] == "fd_loss-fwd-512px-12rows-fp32"
    chosen = cases(small=False, res=(512, 1024), rows=(6,), dtypes=("bf16",))
    assert sorted({(c.res, c.rows, c.dtype) for c in chosen}) == [(512, 6, "bf16"), (1024, 6, "bf16")]
    assert len(chosen) == 10
    assert all(c.small and c.rows == 4 for c in cases(small=True))


def test_flux1_dev_flavour_is_the_published_transformer():
    """FLUX.1 [dev]'s transformer from the table: 19 double-stream and 38 single-stream blocks, 24 heads of 128,
    the distilled guidance input; 11,901,408,320 parameters (the published ≈ 11.9 B), counted on the meta
    device. The default LoRA targets reach every block of both kinds and not the final projection."""
    from fdfo.models import FluxFlowModel, flavours

    assert flavours.parameter_count("flux1-dev") == 11_901_408_320
    assert flavours.parameter_count("flux-tiny") < 100_000
    assert flavours.family("flux1-dev") is FluxFlowModel and flavours.sample_size("flux1-dev") == 128
    with torch.device("meta"):
        model = flavours.build("flux1-dev")
    cfg = model.config
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.in_channels, cfg.joint_attention_dim,
            cfg.pooled_projection_dim, cfg.guidance_embeds) == (24, 128, 64, 4096, 768, True)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    flow = FluxFlowModel.from_transformer(model, device=torch.device("meta"), dtype=torch.float32)
    targets = flow.lora_targets(list(FluxFlowModel.LORA_TARGETS))  # what add_lora adapts by default
    hits = {n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}
    assert "proj_out" not in hits
    double = [f"transformer_blocks.{i}.attn.{p}" for i in range(19) for p in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    single = [f"single_transformer_blocks.{i}.{p}" for i in range(38) for p in
              ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")]
    assert hits == set(double) | set(single)


def test_bench_zero_runs_and_inputs():
    """bench_zero's --arch list (each at --stage or its own NAME:STAGES) and the training inputs it
    builds per family: the flow model's velocity on the meta device of FLUX.1 [dev] and SD3.5 Large at 512²
    (tests/test_bench_models.py compares the velocity with training's at the tiny sizes)."""
    from benchmarks.bench_zero import parse_runs, step_inputs
    from fdfo.models import flavours

    assert parse_runs(["sd35-medium", "flux1-dev:3", "sd35-large:2,3"], [0, 2, 3]) == [
        ("sd35-medium", [0, 2, 3]), ("flux1-dev", [3]), ("sd35-large", [2, 3])]
    for bad, match in (("flux2", "unknown architecture"), ("flux1-dev:x", "comma-separated"),
                       ("tiny:4", "stages are 0, 1, 2 or 3")):
        with pytest.raises(ValueError, match=match):
            parse_runs([bad], [0])
    meta = torch.device("meta")
    shape = (2, 16, 64, 64)  # both take 16 latent channels (FLUX packs them 2×2 in its transformer call)
    for name, tokens in (("flux1-dev", 512), ("sd35-large", 333)):
        model = flavours.flow_model(name, meta, torch.bfloat16)
        x, sigma, cond = step_inputs(model, 2, 64, tokens, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert (x.shape, sigma.shape, cond.embeds.shape[1]) == (shape, (2,), tokens)
        assert (x.dtype, sigma.dtype, cond.embeds.dtype, cond.pooled.dtype) == (torch.float32, torch.float32,
                                                                                torch.bfloat16, torch.bfloat16)
        v = model.velocity(x.to(meta), sigma.to(meta), cond.to(meta))
        assert (v.shape, v.dtype) == (shape, torch.float32)


# --------------------------------------------------------------------------- benchmarks/run_gpu.sh: three files a command

SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
QUICK_PARTS = ["install", "env", "sampling", "train", "epoch"]
QUICK_LIMIT_S = 90  # the CPU dry run of `run_gpu.sh OUT quick`, on a 2-core machine
LEVERS = ["baseline", "overlap", "lora_bf16", "rows_12", "rows_24", "compile", "fast"]


def _env(tmp_path, **extra) -> dict:
    import os
    import sys

    env = dict(os.environ, PYTHON=sys.executable, FDFO_GPU_SITE=str(tmp_path / "site"), OMP_NUM_THREADS="1",
               FDFO_WHEELS=str(tmp_path / "no-wheels"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja for DeepSpeed's ops
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FDFO_GPU_TESTS",
              "FDFO_GPU_BUDGET_S", "FDFO_GPU_MAX_PART_S", "FDFO_GPU_DRY_RUN", "TRITON_INTERPRET"):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(tmp_path, out, *parts, timeout=600, **extra):
    import subprocess

    return subprocess.run(["bash", str(SCRIPT), str(out), *parts], cwd=ROOT, env=_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=timeout)


def _bundle(out, name: str) -> dict:
    import json

    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_report.md", f"{name}.json", "logs.tar.gz"])
    data = json.loads((out / f"{name}.json").read_text())
    assert data["format"] == "fdfo-gpu-run/1" and data["label"] == name
    return data


def _logs(out) -> dict[str, str]:
    import tarfile

    with tarfile.open(out / "logs.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode(errors="replace") for m in tar.getmembers()}


def _section(report: str, title: str) -> str:
    start = report.index(title)
    end = report.find("\n## ", start + 1)
    return report[start:end if end > 0 else len(report)]


def test_quick_dry_run_three_files_under_90s(tmp_path):
    """`FDFO_GPU_DRY_RUN=1 bash benchmarks/run_gpu.sh OUT quick` on CPU at tiny size: every part of the first GPU
    contact runs (import smoke, sampling with and without LoRA, a training micro-batch at two sizes, an epoch fast
    against published), what needs CUDA is a clean skip with its reason in the JSON, OUT holds exactly
    gpu_report.md, quick.json and logs.tar.gz, no scratch folder is left behind, and it takes under 90 s."""
    import time

    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _run(tmp_path, out, "quick", FDFO_GPU_DRY_RUN="1")
    wall = time.monotonic() - t0
    print(f"quick dry run: {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = _bundle(out, "quick")
    parts = data["parts"]
    assert list(parts) == QUICK_PARTS
    bad = {p: v["status"] for p, v in parts.items() if v["status"]["status"] != "ok"}
    assert not bad, bad
    assert data["run"]["dry_run"] is True and data["run"]["budget_s"] == 280 and data["run"]["seconds"] is not None
    assert not list((tmp_path / "tmp").glob("fdfo-gpu-run.*"))  # the scratch folder went

    env = parts["env"]["results"]["env.json"]
    assert env["device"] == "cpu (no CUDA device)" and env["cuda_available"] is False
    assert all(env["imports"][m]["ok"] for m in ("torch", "triton", "diffusers", "deepspeed", "fdfo"))
    assert env["matmul"] == {"skipped": "no CUDA device"}

    sampling = parts["sampling"]["results"]["sampling.json"]
    assert sampling["complete"] and sampling["args"]["text_tokens"] == 8
    by = {(r["lora"], r["variant"]): r for r in sampling["results"]}
    assert set(by) == {(k, v) for k in (4, 0) for v in ("eager", "graph", "graph+compile")}
    assert all(by[(k, "eager")]["images_per_s"] > 0 and by[(k, "eager")]["mfu"] is None for k in (4, 0))
    assert by[(4, "graph")]["skipped"] == by[(0, "graph+compile")]["skipped"] == "CUDA graphs need a CUDA device"

    train = parts["train"]["results"]["train.json"]
    by = {(r["variant"], r["rows"]): r for r in train["results"]}
    assert set(by) == {(v, n) for v in ("eager", "compile") for n in (2, 4)}
    for n in (2, 4):
        assert by[("eager", n)]["rows_per_s"] > 0 and by[("eager", n)]["flops_per_step"] > 0
        assert by[("compile", n)]["skipped"].startswith("torch.compile is not timed on CPU")
    # training FLOPs are linear in the rows
    assert by[("eager", 4)]["flops_per_step"] == 2 * by[("eager", 2)]["flops_per_step"]

    epoch = parts["epoch"]["results"]["epoch.json"]
    ep = {r["variant"]: r for r in epoch["variants"]}
    assert epoch["complete"] and list(ep) == ["published", "fast"] and not epoch["failed"]
    for r in ep.values():
        assert r["pairs_per_s"] > 0 and r["sample_s"] > 0 and r["train_s"] > 0 and len(r["warmup"]) == 1
        assert 1.5 < r["train_flops_per_row"] / r["sample_flops_per_row"] < 3 and r["sample_mfu"] is None
    assert ep["published"]["sampler"] == "sample_pairs+sync" and epoch["speedup_fast_over_published"] > 0

    logs = _logs(out)
    assert {"install.log", "env.log", "sampling.log", "train.log", "epoch.log", "nvidia-smi.txt"} <= set(logs)
    report = (out / "gpu_report.md").read_text()
    assert "**Dry run**" in report and "| device (as torch names it) | cpu (no CUDA device) |" in report
    assert "LoRA's cost" in report and "Micro-batch effect" in report and "fast / published" in report
    assert "CUDA graphs need a CUDA device" in _section(report, "## Sampling one micro-batch")
    assert wall < QUICK_LIMIT_S, f"the quick dry run took {wall:.0f} s (limit {QUICK_LIMIT_S} s)"


def test_levers_dry_run_each_lever_against_baseline(tmp_path):
    """`run_gpu.sh OUT levers` at tiny size: every MFU lever runs one epoch with its one setting changed from
    baseline (the compile lever through torch.compile's aot_eager backend on CPU), each with its ratios to
    baseline from the same run; no MFU without a GPU's peak."""
    out = tmp_path / "out"
    proc = _run(tmp_path, out, "levers", FDFO_GPU_DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = _bundle(out, "levers")
    assert data["parts"]["levers"]["status"]["status"] == "ok"
    levers = data["parts"]["levers"]["results"]["levers.json"]
    by = {r["variant"]: r for r in levers["variants"]}
    assert list(by) == LEVERS and levers["complete"] and not levers["failed"]
    assert levers["compile_backend"] == "aot_eager"
    today = {"model.compile": False, "lora.dtype": "float32", "train.micro_batch_rows": 6,
             "sampling.micro_batch_pairs": 3, "reward.overlap": False, "train.offload_text_encoders": True}
    changed = {"baseline": {}, "overlap": {"reward.overlap": True}, "lora_bf16": {"lora.dtype": "auto"},
               "rows_12": {"train.micro_batch_rows": 12}, "rows_24": {"train.micro_batch_rows": 24},
               "compile": {"model.compile": True}}
    for name, diff in changed.items():
        assert by[name]["settings"] == {**today, **diff}, name
    assert [by[v]["micro_batch_rows"] for v in ("baseline", "rows_12", "rows_24")] == [6, 12, 24]
    assert by["compile"]["compiled"] is True and by["baseline"]["compiled"] is False
    assert by["fast"]["settings"]["model.compile"] == "auto" and by["fast"]["compiled"] is False  # auto: CUDA only
    for name, r in by.items():
        assert r["pairs_per_s"] > 0 and r["sample_mfu"] is None and r["train_mfu"] is None, name
        if name == "baseline":
            assert r["vs_baseline"] is None
        else:
            assert r["vs_baseline"]["pairs_per_s"] == pytest.approx(r["pairs_per_s"] / by["baseline"]["pairs_per_s"])
            assert levers["speedup_over_baseline"][name] == r["vs_baseline"]["pairs_per_s"]
    section = _section((out / "gpu_report.md").read_text(), "## MFU levers")
    assert "| rows_24 | train.micro_batch_rows 24 |" in section and "× baseline" in section


def test_stopped_command_keeps_what_it_measured(tmp_path):
    """A command stopped (TERM) in mid-part: the part's partial JSON is merged, the part is marked interrupted,
    and OUT still holds exactly its three files."""
    import json
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "levers"], cwd=ROOT,
                            env=_env(tmp_path, FDFO_GPU_DRY_RUN="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until the first lever is measured
            found = list((tmp_path / "tmp").glob("fdfo-gpu-run.*/levers.json"))
            try:
                if found and json.loads(found[0].read_text())["variants"]:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-3000:]
    data = _bundle(out, "levers")
    part = data["parts"]["levers"]
    assert part["status"]["status"] == "interrupted"
    levers = part["results"]["levers.json"]
    assert levers["complete"] is False and levers["variants"][0]["variant"] == "baseline"
    assert levers["variants"][0]["pairs_per_s"] > 0
    assert "levers.log" in _logs(out) and not list((tmp_path / "tmp").glob("fdfo-gpu-run.*"))
    assert "the results below are partial" in _section((out / "gpu_report.md").read_text(), "## MFU levers")


def test_failed_timed_out_and_skipped_parts(tmp_path):
    """A failing part, then one cut by its limit (its status and log tail in the report), then, with no budget
    left, a skipped one: each recorded, the command goes on; a non-empty OUT and an unknown part are refused."""
    out = tmp_path / "a"
    proc = _run(tmp_path, out, "tests", "env", FDFO_GPU_TESTS="tests/no_such_file.py", FDFO_GPU_MAX_PART_S="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = _bundle(out, "tests-env")["parts"]
    assert parts["tests"]["status"]["status"] in ("failed", "timeout") and parts["env"]["status"]["status"] == "timeout"
    report = (out / "gpu_report.md").read_text()
    assert "Last lines of `env.log`" in report and "Status: **timeout** (killed after 1s)" in report

    out = tmp_path / "b"
    _run(tmp_path, out, "env", FDFO_GPU_BUDGET_S="5")
    rec = _bundle(out, "env")["parts"]["env"]["status"]
    assert rec["status"] == "skipped" and "no time left" in rec["reason"], rec

    again = _run(tmp_path, out, "env")  # (b holds a run already)
    unknown = _run(tmp_path, tmp_path / "c", "quick2")
    assert again.returncode == 2 and "not empty" in again.stderr
    assert unknown.returncode == 2 and "unknown part 'quick2'" in unknown.stderr


def _wheel(folder, name: str, version: str = "1.0"):
    """A minimal pure wheel of a one-module package named `name`."""
    import zipfile

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


def test_install_puts_missing_wheels_on_the_path_and_refuses_torch(tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "fdfo_fake_dep")
    proc = _run(tmp_path, tmp_path / "a", "install", FDFO_WHEELS=str(wheels), FDFO_GPU_REQUIRED="fdfo_fake_dep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = _bundle(tmp_path / "a", "install")["parts"]["install"]["status"]
    assert rec["status"] == "ok" and "installed 1 wheels" in rec["reason"], rec
    assert (tmp_path / "site" / "fdfo_fake_dep" / "__init__.py").read_text() == "VALUE = 42\n"
    # a second command on the same machine finds it there and installs nothing
    _run(tmp_path, tmp_path / "b", "install", FDFO_WHEELS=str(wheels), FDFO_GPU_REQUIRED="fdfo_fake_dep")
    rec = _bundle(tmp_path / "b", "install")["parts"]["install"]["status"]
    assert rec["reason"] == "nothing to install: every package is already there"
    assert "present: fdfo_fake_dep 1.0" in _logs(tmp_path / "b")["install.log"]

    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    site = tmp_path / "site2"
    _run(tmp_path, tmp_path / "c", "install", FDFO_WHEELS=str(wheels), FDFO_GPU_REQUIRED="fdfo_fake_dep",
         FDFO_GPU_SITE=str(site))
    rec = _bundle(tmp_path / "c", "install")["parts"]["install"]["status"]
    assert rec["status"] == "refused" and "torch or triton wheel" in rec["reason"], rec
    assert not site.exists()  # nothing installed, not even the harmless wheel
    _run(tmp_path, tmp_path / "d", "install", FDFO_GPU_REQUIRED="fdfo_fake_dep", FDFO_GPU_SITE=str(site))
    rec = _bundle(tmp_path / "d", "install")["parts"]["install"]["status"]
    assert rec["status"] == "failed" and "scripts/gpu_wheels.sh" in rec["reason"], rec
    assert "## Wheel install" in (tmp_path / "d" / "gpu_report.md").read_text()


def test_bundle_and_report_of_partial_results(tmp_path):
    """gpu_report.py --bundle on a scratch folder whose command was cut: a part timed out with a partial JSON (kept,
    marked partial), one never recorded a status (its log tail shown); two bundles merge into one report."""
    import json
    import subprocess
    import sys

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"parts": "kernels epoch", "label": "kernels-epoch", "dry_run": False,
                                               "budget_s": 280, "started": "2026-01-01T00:00:00Z", "seconds": None}))
    (work / "status.jsonl").write_text(json.dumps(
        {"part": "kernels", "status": "timeout", "rc": 124, "seconds": 150, "limit_s": 150,
         "reason": "killed after 150s", "command": "python benchmarks/bench_kernels.py", "log": "kernels.log"}) + "\n")
    rec = {"kernel": "fd_loss", "variant": "fwd", "res": 512, "rows": 6, "dtype": "bf16",
           "case": "fd_loss-fwd-512px-6rows-bf16", "min_bytes": 1, "frac_of_copy": 0.5, "peak_extra_bytes": 2**20}
    (work / "kernels.json").write_text(json.dumps({
        "meta": {"device": "NVIDIA H200", "copy_gbps": 4300.0, "cases": [rec["case"]]}, "complete": False,
        "checks": [{"case": rec["case"], "ok": True}],
        "results": [{**rec, "impl": "triton", "seconds": 5e-6, "gbps": 2150.0},
                    {**rec, "impl": "eager", "seconds": 2e-5, "gbps": 540.0}]}))
    (work / "kernels.log").write_text("compiling\nstill compiling\n")
    (work / "epoch.log").write_text("building models\n")
    subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--bundle", str(work), str(out), "--name",
                    "kernels-epoch"], cwd=ROOT, check=True, capture_output=True)
    data = _bundle(out, "kernels-epoch")
    assert list(data["parts"]) == ["kernels"]  # (epoch: no status and no results yet)
    assert data["parts"]["kernels"]["results"]["kernels.json"]["complete"] is False
    report = (out / "gpu_report.md").read_text()
    parts = _section(report, "## Parts")
    assert "| kernels | timeout (partial results) | 150 | 150 | killed after 150s |" in parts
    assert "| epoch | did not finish" in parts
    kernels = _section(report, "## Kernels against eager")
    assert "the results below are partial" in kernels and "still compiling" in kernels
    assert "| `fd_loss-fwd-512px-6rows-bf16` | 5.00 | 20.0 | – | 4.00× | – | 2,150 | 50.0% | 1.0 / 1.0 |" in kernels
    assert "building models" in _section(report, "## One epoch")

    (work / "run.json").write_text(json.dumps({"parts": "env", "label": "env", "dry_run": False, "budget_s": 280,
                                               "started": "2026-01-01T00:10:00Z", "seconds": 12}))
    (work / "status.jsonl").write_text(json.dumps({"part": "env", "status": "ok", "rc": 0, "seconds": 9,
                                                   "limit_s": 45, "reason": "", "command": "", "log": "env.log"}))
    (work / "env.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "torch": "2.9.0",
                                               "imports": {"torch": {"ok": True, "version": "2.9.0", "seconds": 2.0}},
                                               "matmul": {"n": 8192, "seconds": 0.0016, "tflops": 687.2},
                                               "peak_bf16_tflops": 989.4}))
    subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--bundle", str(work), str(tmp_path / "env"),
                    "--name", "env"], cwd=ROOT, check=True, capture_output=True)
    merged = tmp_path / "report.md"
    subprocess.run([sys.executable, "benchmarks/gpu_report.py", str(tmp_path / "env"), str(out), "--out", str(merged)],
                   cwd=ROOT, check=True, capture_output=True)
    text = merged.read_text()
    assert text.startswith("# GPU figures: NVIDIA H100 80GB HBM3") and text.count("## Environment") == 1
    assert "bf16 matmul 8192³: 687 TFLOP/s (69.5% of the 989 TFLOP/s dense bf16 peak)" in text
    assert "## Kernels against eager" in text and "`run_gpu.sh env env`" in text


def test_regional_compile_shares_the_weights():
    """bench_train's regional compile: a copy of the transformer whose blocks are compiled, the original's left
    eager, the same velocity and the same LoRA gradients (torch.compile's eager backend: no code generation)."""
    from benchmarks.bench_train import build_model, compile_transformer, train_inputs
    from fdfo.loss import fdfo_loss

    model = build_model("tiny", 4, "float32", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    twin = compile_transformer(model.transformer, "regional", backend="eager")
    assert all(type(b).__name__ == "OptimizedModule" for b in twin.transformer_blocks)
    assert not any(type(b).__name__ == "OptimizedModule" for b in model.transformer.transformer_blocks)
    x, sigma, cond, v_ref, d, dR = train_inputs(model, 2, 4, 8, torch.device("cpu"))
    params = model.trainable_parameters()
    grads = []
    for net in (model.transformer, twin):
        for p in params:
            p.grad = None
        loss, _ = fdfo_loss(model.velocity(x, sigma, cond, net=net), v_ref, d, dR, 0.03)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads)) and grads[0][0].abs().sum() > 0
