"""Kernel benchmarks: each fused Triton kernel against its eager PyTorch reference and torch.compile of it.

    pytest benchmarks/bench_kernels.py                    pytest-benchmark, every kernel/variant/size (GPU)
    pytest benchmarks/bench_kernels.py -k small           the tiny-shape smoke cases only (CPU: interpreter)
    python benchmarks/bench_kernels.py [--out FILE]       correctness on the GPU first, then every variant and
                                                          size in one run; a short table last, full JSON to FILE
    python benchmarks/bench_kernels.py --small            the same at tiny sizes (CPU: interpreter, no GPU needed)
    python benchmarks/bench_kernels.py --res 512 1024 --rows 6 --dtypes bf16 --rep-ms 100
                                                          a subset of the shapes (what run_gpu.sh times)

Shapes are SD3.5 latents, 16×64×64 (512²) and 16×128×128 (1024²), micro-batches of 2–26 rows
(bf16 at every resolution and row count, fp32 at one shape). The script times Triton and
eager for every case first and torch.compile (minutes of compilation) last, and rewrites its
JSON after every measurement, so a run cut short keeps what it measured.
Every timed function ends with a CUDA synchronisation. Each result carries, in
``extra_info``: the minimum bytes the operation must move (each input read once,
each output written once), the achieved GB/s over that, the fraction of the
device's measured copy bandwidth, and the peak extra memory of one call
(``torch.cuda.max_memory_allocated`` over the allocation before it).

What the variants time:
  fd_loss     fwd      loss and metrics with v requiring grad (Triton also writes ∂loss/∂v here)
              fwd+bwd  the same, then ∂loss/∂v via torch.autograd.grad
  churn_step  plain    one churn step with fresh noise (eager/compile draw it with torch.randn)
              cfg      the same from two velocities, v = v_u + w·(v_c − v_u)
  pair_delta  fwd      d, dR and ms from x₀ and R
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

if __name__ == "__main__" and ("--small" in sys.argv and not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (fdfo.kernels imports it lazily)

import fdfo.kernels as K  # noqa: E402
from fdfo.atomic import write_text  # noqa: E402
from fdfo.loss import fdfo_loss, pair_delta  # noqa: E402
from fdfo.sampling import churn_step  # noqa: E402

CLIP = 0.03
CFG_SCALE = 4.5
LATENTS = {512: (16, 64, 64), 1024: (16, 128, 128), 0: (4, 6, 10)}  # 0: the tiny smoke shape
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("triton", "eager", "compile")
VARIANTS = {"fd_loss": ("fwd", "fwd+bwd"), "churn_step": ("plain", "cfg"), "pair_delta": ("fwd",)}


@dataclass(frozen=True)
class Case:
    kernel: str
    variant: str
    res: int  # 512, 1024, or 0 for the tiny smoke shape
    rows: int
    dtype: str

    @property
    def small(self) -> bool:
        return self.res == 0

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.variant}-{'small' if self.small else f'{self.res}px'}-{self.rows}rows-{self.dtype}"


def cases(small: bool, res=(512, 1024), rows=(2, 12, 26), dtypes=("bf16", "fp32")) -> list[Case]:
    """bf16 at every resolution × rows; fp32 at one shape (the first resolution, the middle row count)."""
    if small:
        return [Case(k, v, 0, 4, "bf16") for k, vs in VARIANTS.items() for v in vs]
    out = []
    for kernel, variants in VARIANTS.items():
        for variant in variants:
            if "bf16" in dtypes:
                out += [Case(kernel, variant, r, n, "bf16") for r in res for n in rows]
            if "fp32" in dtypes:
                out.append(Case(kernel, variant, res[0], rows[len(rows) // 2], "fp32"))
    return out


# --------------------------------------------------------------------------- inputs and runners


def _compiled(fn):
    """torch.compile of a reference, with room for one graph per benchmarked shape."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    return torch.compile(fn, dynamic=False)


_COMPILED: dict[str, object] = {}


def _compiled_ref(name: str):
    if name not in _COMPILED:
        _COMPILED[name] = _compiled({"fd_loss": fdfo_loss, "churn_step": _churn_eager, "pair_delta": pair_delta}[name])
    return _COMPILED[name]


def _churn_eager(x, v_u, v_c, t, s, g, w):
    """The sampler's step as the PyTorch reference does it: draw noise, combine CFG, step."""
    noise = torch.randn_like(x)
    v = v_u if v_c is None else v_u + w * (v_c - v_u)
    return churn_step(x, v, t, s, g, noise)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    shape = (case.rows, *LATENTS[case.res])

    def randn(scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dt)

    if case.kernel == "fd_loss":
        v_ref = randn()
        v = (v_ref.float() + 0.01 * torch.randn(shape, generator=gen, device=device)).to(dtype)
        return dict(v=v.requires_grad_(True), v_ref=v_ref, d=randn(0.05),
                    dR=torch.randn(case.rows, generator=gen, device=device) * 0.1)
    if case.kernel == "churn_step":
        t = torch.rand(case.rows, generator=gen, device=device) * 0.8 + 0.2
        return dict(x=randn(), v_u=randn(), v_c=randn() if case.variant == "cfg" else None, t=t, s=t * 0.95,
                    g=torch.full((case.rows,), 0.0025, device=device))
    return dict(x0=randn(), R=torch.randn(case.rows, generator=gen, device=device))


def min_bytes(case: Case, inp: dict) -> int:
    """Bytes the operation cannot avoid moving: every input read once, every output written once."""
    def nbytes(t):
        return 0 if t is None else t.numel() * t.element_size()

    if case.kernel == "fd_loss":
        reads = nbytes(inp["v"]) + nbytes(inp["v_ref"]) + nbytes(inp["d"]) + nbytes(inp["dR"])
        return reads + (nbytes(inp["v"]) if case.variant == "fwd+bwd" else 0)  # + the gradient
    if case.kernel == "churn_step":
        return nbytes(inp["x"]) * 2 + nbytes(inp["v_u"]) + nbytes(inp["v_c"]) + 3 * nbytes(inp["t"])
    return nbytes(inp["x0"]) * 2 + nbytes(inp["R"]) * 2 + 4 * inp["R"].numel()


def make_runner(case: Case, impl: str, inp: dict):
    """A zero-argument function that runs the operation once (no synchronisation)."""
    if case.kernel == "fd_loss":
        fn = {"triton": lambda *a: K.fd_loss(*a, backend="triton"), "eager": fdfo_loss,
              "compile": _compiled_ref("fd_loss")}[impl]
        args = (inp["v"], inp["v_ref"], inp["d"], inp["dR"], CLIP)
        if case.variant == "fwd":
            return lambda: fn(*args)[0]
        return lambda: torch.autograd.grad(fn(*args)[0], inp["v"])[0]
    if case.kernel == "churn_step":
        x, v_u, v_c, t, s, g = (inp[k] for k in ("x", "v_u", "v_c", "t", "s", "g"))
        if impl == "triton":
            kw = dict(v_cond=v_c, cfg_scale=CFG_SCALE) if v_c is not None else {}
            return lambda: K.churn_step(x, v_u, t, s, g, seed=1234, offset=0, backend="triton", **kw)
        fn = _churn_eager if impl == "eager" else _compiled_ref("churn_step")
        return lambda: fn(x, v_u, v_c, t, s, g, CFG_SCALE)
    fn = {"triton": lambda *a: K.pair_delta(*a, backend="triton"), "eager": pair_delta,
          "compile": _compiled_ref("pair_delta")}[impl]
    return lambda: fn(inp["x0"], inp["R"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(run, device: torch.device) -> int | None:
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run()
    sync(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the ceiling for these kernels."""
    if device.type != "cuda":
        return None
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    sync(device)
    return 2 * a.numel() * reps / (start.elapsed_time(end) * 1e-3) / 1e9


# --------------------------------------------------------------------------- correctness


def check(case: Case, device: torch.device) -> dict:
    """Triton against the reference (float64 for the loss) at one case; returns max errors and ok."""
    inp = make_inputs(case, device, seed=1)
    err = {}
    if case.kernel == "fd_loss":
        v = inp["v"]
        loss, m = K.fd_loss(v, inp["v_ref"], inp["d"], inp["dR"], CLIP, backend="triton")
        (g,) = torch.autograd.grad(loss * 0.5, v)
        v64 = v.detach().double().requires_grad_(True)
        loss64, m64 = fdfo_loss(v64, inp["v_ref"].double(), inp["d"].double(), inp["dR"].double(), CLIP)
        (g64,) = torch.autograd.grad(loss64 * 0.5, v64)
        loss, loss64 = float(loss.detach()), float(loss64.detach())
        err["loss_rel"] = abs(loss - loss64) / max(abs(loss64), 1e-12)
        err["ratio_abs"] = abs(float(m["ratio"]) - float(m64["ratio"]))
        err["grad_rel"] = float((g.double() - g64).abs().max() / g64.abs().max())
        grad_tol = 1e-3 if case.dtype == "fp32" else 1e-2
        ok = err["loss_rel"] < 1e-4 and err["ratio_abs"] < 1e-4 and err["grad_rel"] < grad_tol
    elif case.kernel == "churn_step":
        x, v_u, v_c, t, s, g = (inp[k] for k in ("x", "v_u", "v_c", "t", "s", "g"))
        kw = dict(v_cond=v_c, cfg_scale=CFG_SCALE) if v_c is not None else {}
        out = K.churn_step(x, v_u, t, s, g, seed=99, offset=3, backend="triton", **kw)
        noise = K.churn_noise(x.shape, 99, 3, device=device, backend="triton")
        v = v_u.double() if v_c is None else v_u.double() + CFG_SCALE * (v_c.double() - v_u.double())
        ref = churn_step(x.double(), v, t.double(), s.double(), g.double(), noise.double())
        err["x_rel"] = float((out.double() - ref).abs().max() / ref.abs().max())
        err["noise_mean"] = float(noise.double().mean())
        err["noise_var"] = float(noise.double().var())
        n = noise.numel()
        ok = (err["x_rel"] < (1e-5 if case.dtype == "fp32" else 1e-2) and abs(err["noise_mean"]) < 5 / n**0.5
              and abs(err["noise_var"] - 1) < 5 * (2 / n) ** 0.5)
    else:
        d, dR, ms = K.pair_delta(inp["x0"], inp["R"], backend="triton")
        d_r, dR_r, ms_r = pair_delta(inp["x0"], inp["R"])
        err["d_abs"] = float((d.double() - d_r.double()).abs().max())
        err["dR_abs"] = float((dR.double() - dR_r.double()).abs().max())
        err["ms_rel"] = float(((ms.double() - ms_r.double()).abs() / ms_r.double()).max())
        ok = (err["d_abs"] <= (0 if case.dtype == "fp32" else 2e-2) and err["dR_abs"] == 0
              and err["ms_rel"] < (1e-5 if case.dtype == "fp32" else 1e-2))
    sync(device)
    return {"case": case.id, "ok": bool(ok), **err}


# --------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # the plain script does not need pytest
    pytest = None

if pytest is not None:
    HAS_CUDA = torch.cuda.is_available()
    ALL = cases(small=False) + cases(small=True)

    @pytest.fixture(scope="session")
    def device():
        return torch.device("cuda" if HAS_CUDA else "cpu")

    @pytest.fixture(scope="session")
    def copy_gbps(device):
        return copy_bandwidth(device)

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
    def test_kernel(benchmark, case, impl, device, copy_gbps):
        if not case.small and not HAS_CUDA:
            pytest.skip("needs a CUDA GPU (on CPU, run the tiny interpreter smoke cases: -k small)")
        if impl == "triton" and not K.triton_available():
            pytest.skip("triton is not installed")
        if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (benchmarks/conftest.py sets it without CUDA)")
        if impl == "triton":
            res = check(case, device)
            assert res["ok"], res
        inp = make_inputs(case, device)
        run = make_runner(case, impl, inp)

        def timed():
            out = run()
            sync(device)
            return out

        for _ in range(2):  # warm-up (compilation, autotuning, caches)
            timed()
        peak = peak_extra_bytes(run, device)
        if device.type == "cuda":
            benchmark.pedantic(timed, rounds=50, iterations=5, warmup_rounds=2)
        else:
            benchmark.pedantic(timed, rounds=2, iterations=1)
        seconds = benchmark.stats.stats.median
        nbytes = min_bytes(case, inp)
        gbps = nbytes / seconds / 1e9
        benchmark.extra_info.update(
            kernel=case.kernel, variant=case.variant, res=case.res, rows=case.rows, dtype=case.dtype, impl=impl,
            min_bytes=nbytes, gbps=gbps, copy_gbps=copy_gbps, frac_of_copy=(gbps / copy_gbps if copy_gbps else None),
            peak_extra_bytes=peak,
        )


# --------------------------------------------------------------------------- the one-shot script


def time_call(run, device: torch.device, small: bool, rep_ms: int = 200) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        def timed():
            run()

        return triton.testing.do_bench(timed, warmup=25, rep=rep_ms, return_mode="median") * 1e-3
    times = []
    for _ in range(3 if small else 10):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU: through the Triton interpreter)")
    ap.add_argument("--out", default="benchmarks/kernel_results.json", help="where to write the full results")
    ap.add_argument("--kernels", default=",".join(VARIANTS), help="comma-separated subset of kernels")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--res", type=int, nargs="+", choices=(512, 1024), default=[512, 1024], help="image sides")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 12, 26], help="rows per launch (micro-batch)")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["bf16", "fp32"],
                    help="bf16: every resolution × rows; fp32: one case at the first resolution, middle rows")
    ap.add_argument("--rep-ms", type=int, default=200, help="milliseconds of timed calls per measurement (GPU)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("no CUDA device: the full-size benchmarks need a GPU; run with --small for the CPU smoke run")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    wanted = set(args.kernels.split(","))
    todo = [c for c in cases(args.small, tuple(args.res), tuple(args.rows), tuple(args.dtypes)) if c.kernel in wanted]
    impls = [i for i in IMPLS if not (args.no_compile and i == "compile")]

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
        torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]), copy_gbps=None,
        cases=[c.id for c in todo], impls=impls,
        skipped_impls={"compile": "--no-compile"} if args.no_compile else {},
    )
    checks, records = [], []

    def save(complete: bool = False) -> None:
        """Rewrite the JSON with everything measured so far (atomically: a kill leaves the last version)."""
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text(args.out, json.dumps(dict(meta=meta, complete=complete, checks=checks, results=records), indent=1))

    print(f"device: {torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}")
    for case in todo:
        res = check(case, device)
        checks.append(res)
        print(("ok  " if res["ok"] else "FAIL") + " " + json.dumps(res), flush=True)
    save()
    if not all(r["ok"] for r in checks):
        print("correctness check failed: no timings taken")
        return 1

    copy_gbps = meta["copy_gbps"] = copy_bandwidth(device)
    inputs = {}
    for impl in impls:  # Triton and eager for every case before torch.compile, which takes longest
        for case in todo:
            inp = inputs.setdefault(case.id, make_inputs(case, device))
            run = make_runner(case, impl, inp)
            run()
            run()
            sync(device)
            peak = peak_extra_bytes(run, device)
            seconds = time_call(run, device, args.small, args.rep_ms)
            nbytes = min_bytes(case, inp)
            gbps = nbytes / seconds / 1e9
            records.append(dict(asdict(case), case=case.id, impl=impl, seconds=seconds, min_bytes=nbytes,
                                gbps=gbps, frac_of_copy=(gbps / copy_gbps if copy_gbps else None),
                                peak_extra_bytes=peak))
            print(f"  {case.id:42s} {impl:8s} {seconds * 1e6:10.1f} us", flush=True)
            save()
    del inputs
    save(complete=True)

    by_key = {(r["case"], r["impl"]): r for r in records}
    print(f"\n{meta['device']}, copy bandwidth {copy_gbps or float('nan'):.0f} GB/s; full results in {args.out}")
    header = f"{'case':42s} {'triton us':>10s} {'eager us':>9s} {'compile us':>10s} {'vs eager':>8s} " \
             f"{'vs comp':>8s} {'GB/s':>7s} {'%copy':>6s} {'peak MB t/e':>12s}"
    print(header)
    for case in todo:
        t = by_key.get((case.id, "triton"))
        e = by_key.get((case.id, "eager"))
        c = by_key.get((case.id, "compile"))
        pk = "-" if t["peak_extra_bytes"] is None else \
            f"{t['peak_extra_bytes'] / 2**20:.1f}/{e['peak_extra_bytes'] / 2**20:.1f}"
        print(f"{case.id:42s} {t['seconds'] * 1e6:10.1f} {e['seconds'] * 1e6:9.1f} "
              f"{(c['seconds'] * 1e6 if c else float('nan')):10.1f} {e['seconds'] / t['seconds']:7.2f}x "
              f"{(c['seconds'] / t['seconds'] if c else float('nan')):7.2f}x {t['gbps']:7.1f} "
              f"{(100 * t['frac_of_copy'] if t['frac_of_copy'] else float('nan')):6.1f} {pk:>12s}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
