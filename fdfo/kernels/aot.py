"""Compile the fused kernels for a GPU architecture on a machine without one.

    python -m fdfo.kernels.aot                     # sm_90 (H100/H200), SD3.5 shapes at 512² and 1024²
    python -m fdfo.kernels.aot --arch 80 90 100 --res 512 --rows 2 12 26

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but not that they compile:
code generation, register allocation and the shared-memory budget only happen on the way to a
cubin. This module records the launches the real wrappers in ``fdfo.kernels`` make for a set of
shapes (the wrappers run up to the launch; the kernels are recorded, not run), binds each
launch's arguments with Triton's own specialisation rules (dtypes, 16-byte alignment,
divisibility by 16, the constexprs the wrapper chose) and compiles every distinct
specialisation through Triton's pipeline (TTIR → TTGIR → LLVM → PTX → cubin, with the ptxas that
ships in the triton wheel) for the requested target. Each cubin's resource usage (registers,
spilled bytes, shared memory) comes from ``cuobjdump`` from the same wheel.

It relies on two internals of ``triton.runtime.jit`` (the binder and ``JITFunction._pack_args``,
the steps ``JITFunction.run`` takes before it compiles), checked against triton 3.9: if a later
triton moves them, ``compile_launch`` raises a RuntimeError naming what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from fdfo.kernels import churn_step_triton, fd_loss_triton, pair_delta_triton

KERNEL_MODULES = (fd_loss_triton, churn_step_triton, pair_delta_triton)

# SD3.5 latents: 16 channels at 1/8 of the image side.
LATENT_CHANNELS = 16


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    name: str
    kernel: object  # the JITFunction (or InterpretedFunction) the wrapper launched
    grid: tuple
    args: tuple
    kwargs: dict


class LaunchRecorder:
    """Stands in for a kernel: ``rec[grid](*args, **kwargs)`` records the launch instead of running it.

    It never touches the tensors' memory, so it declares ``runs_on_cpu`` (the hook of
    ``fdfo.kernels.launch.runs_on_cpu``): the wrappers then accept CPU tensors, as for the interpreter.
    """

    runs_on_cpu = True

    def __init__(self, name: str, kernel, calls: list[Launch]):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(Launch(self.name, self.kernel, tuple(grid), args, kwargs))
        return launch


def _is_kernel(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction")


@contextlib.contextmanager
def record_launches():
    """Within the block every kernel of ``KERNEL_MODULES`` is a ``LaunchRecorder``; yields the call list.

    A recorder declares ``runs_on_cpu``, so the wrappers accept CPU tensors: the shapes to check can
    be built on the CPU without allocating GPU memory.
    """
    calls: list[Launch] = []
    saved = []
    for module in KERNEL_MODULES:
        for name, obj in list(vars(module).items()):
            if _is_kernel(obj) and name.endswith("_kernel"):
                saved.append((module, name, obj))
                setattr(module, name, LaunchRecorder(name, obj, calls))
    try:
        yield calls
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


_COMPILABLE: dict[str, object] = {}


@contextlib.contextmanager
def _interpreter_off():
    """TRITON_INTERPRET=0 within the block (triton reads it at decoration and at code generation)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _compilable_module(name: str):
    """A second copy of kernel module ``name`` loaded with the interpreter off, so that its kernels
    and the @triton.jit helpers they call are JITFunctions (under TRITON_INTERPRET=1 they are not)."""
    if name not in _COMPILABLE:
        origin = importlib.util.find_spec(name).origin
        spec = importlib.util.spec_from_file_location(f"{name}_aot", origin)
        module = importlib.util.module_from_spec(spec)
        with _interpreter_off():
            spec.loader.exec_module(module)
        _COMPILABLE[name] = module
    return _COMPILABLE[name]


def _jit_function(kernel):
    """The JITFunction for a kernel (from a compilable copy of its module when it was decorated for the
    interpreter)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return getattr(_compilable_module(kernel.fn.__module__), kernel.fn.__name__)


@dataclasses.dataclass
class Compiled:
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    kernel: object  # triton CompiledKernel (metadata + asm; no GPU handles)

    def describe(self) -> str:
        """Pointer dtypes in argument order, then the kernel's own (upper-case) constexprs."""
        ptrs = ",".join(v[1:] for v in self.signature.values() if v.startswith("*"))
        names = list(self.signature)
        consts = ",".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constexprs.items())
                          if names[k[0]].isupper())
        return f"{ptrs} {consts}"


def specialise(launch: Launch, target):
    """(JITFunction, signature, constexprs, attrs, options) exactly as ``JITFunction.run`` would derive them."""
    from triton.compiler import make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # pragma: no cover - depends on the installed triton
        raise RuntimeError(f"fdfo.kernels.aot needs triton.runtime.jit.create_function_from_signature "
                           f"(triton {triton.__version__} does not have it)") from e
    jf = _jit_function(launch.kernel)
    if not hasattr(jf, "_pack_args"):  # pragma: no cover
        raise RuntimeError(f"fdfo.kernels.aot needs JITFunction._pack_args (triton {triton.__version__})")
    backend = make_backend(target)
    binder = create_function_from_signature(jf.signature, jf.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, launch.kwargs, bound, specialization, options)
    return jf, signature, constexprs, attrs, options


def unique_specialisations(calls: list[Launch], target) -> dict:
    """Distinct (kernel, signature, constexprs, attrs) among the recorded launches -> (jf, ..., options)."""
    out = {}
    for launch in calls:
        jf, sig, consts, attrs, options = specialise(launch, target)
        key = (launch.name, tuple(sorted(sig.items())), tuple(sorted(map(str, consts.items()))),
               str(sorted(attrs.items())))
        out.setdefault(key, (launch.name, jf, sig, consts, attrs, options))
    return out


def compile_for(calls: list[Launch], target) -> list[Compiled]:
    """Compile every distinct specialisation among ``calls`` for ``target`` (a triton GPUTarget)."""
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile the kernels in a process started without TRITON_INTERPRET=1 (triton.language's "
                           "own @jit helpers are then interpreter functions): run python -m fdfo.kernels.aot")
    compiled = []
    for name, jf, sig, consts, attrs, options in unique_specialisations(calls, target).values():
        src = ASTSource(jf, sig, consts, attrs)
        kernel = triton.compile(src, target=target, options=options.__dict__)
        compiled.append(Compiled(name, sig, consts, attrs, kernel))
    return compiled


def _cuobjdump() -> str | None:
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(exe) if exe.exists() else shutil.which("cuobjdump")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(kernel) -> dict:
    """{"registers", "stack", "shared", "local"} of a compiled kernel's cubin (bytes, per thread for local/stack).

    ``shared`` is the static shared memory ptxas reports plus Triton's dynamic allocation
    (``metadata.shared``); ``local`` > 0 means registers spilled to local memory.
    """
    tool = _cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in the triton wheel under backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    m = _RES.search(text)
    if m is None:
        raise RuntimeError(f"could not read the resource usage from cuobjdump's output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared + int(kernel.metadata.shared), "local": local}


# --------------------------------------------------------------------------- the launches to check


def sd35_launches(resolutions=(512, 1024), rows=(2, 12, 26), cfg_scale: float = 4.5) -> list[Launch]:
    """The launches the trainer and the graph sampler make for SD3.5 latents at these image sizes.

    Per (resolution, rows), for fp32 and bf16 storage: pair_delta; fd_loss forward (with and
    without the gradient, summing mean(d²) itself and taking pair_delta's ms) on fp32 velocities
    (the trainer's) and bf16 ones against the stored velocities; the churn step with and without
    fused CFG, noise from device-tensor seed/offset (the captured graph) and from 64-bit Python
    ints (eager), with and without the v_out write; the prior churn; and the standalone noise
    kernel. Storage is allocated on the CPU, nothing is run.
    """
    from fdfo import kernels

    calls: list[Launch] = []
    with record_launches() as rec:
        for res in resolutions:
            side = res // 8
            for r in rows:
                shape = (r, LATENT_CHANNELS, side, side)
                for store in (torch.float32, torch.bfloat16):
                    x0 = torch.empty(shape, dtype=store)
                    kernels.pair_delta(x0, torch.empty(r), backend="triton")
                    # The trainer's velocities are fp32 (the model output cast to float) beside fp32 states;
                    # bf16 velocities are what a caller keeping the model's dtype passes.
                    for vel in ((torch.float32, torch.bfloat16) if store == torch.float32 else (torch.bfloat16,)):
                        v = torch.empty(shape, dtype=vel)
                        v_ref, d, dR = torch.empty(shape, dtype=store), torch.empty(shape, dtype=store), torch.empty(r)
                        # ms=None sums mean(d²) itself; the trainer passes pair_delta's (fp32) ms.
                        for ms in (None, torch.empty(r)):
                            fd_loss_triton.fd_loss_forward(v, v_ref, d, dR, 1e-4, ms, write_grad=True)
                            fd_loss_triton.fd_loss_forward(v, v_ref, d, dR, 1e-4, ms, write_grad=False)

                        x = torch.empty(shape, dtype=store)
                        coef = torch.empty(3, r)
                        seed_t, step_t = torch.empty((), dtype=torch.int64), torch.empty(2, dtype=torch.int64)
                        v_out = torch.empty(shape, dtype=store)
                        for v_cond in (None, torch.empty(shape, dtype=vel)):
                            scale = cfg_scale if v_cond is not None else None
                            kernels.churn_step(x, v, coef[0], coef[1], coef[2], v_cond=v_cond, cfg_scale=scale,
                                               seed=seed_t, offset=step_t[1:], out=x, v_out=v_out, backend="triton")
                            # A Python-int seed (callers outside the trainer, which passes device
                            # tensors): 64-bit here; one below 2**31 specialises to a 32-bit argument.
                            kernels.churn_step(x, v, 0.9, 0.8, 0.1, v_cond=v_cond, cfg_scale=scale,
                                               seed=2**40 + 1234, offset=3, backend="triton")
                    kernels.prior_churn(x, coef[2], seed=seed_t, offset=step_t[:1], out=x, backend="triton")
                    kernels.churn_noise(shape, 2**40 + 1234, 5, device="cpu", backend="triton")
        calls.extend(rec)
    return calls


def report(c: Compiled, arch: int) -> dict:
    """What the CLI's --json holds for one compiled specialisation."""
    ptx = c.kernel.asm["ptx"]
    names = list(c.signature)
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    return {
        "arch": arch, "kernel": c.name, "describe": c.describe(),
        "pointers": {k: v for k, v in c.signature.items() if v.startswith("*")},
        "constexprs": {names[k[0]]: v for k, v in c.constexprs.items() if names[k[0]].isupper()},
        "ptx_target": target.group(1) if target else None,
        "ptx_loads": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
        "ptx_stores": sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
        "cubin_bytes": len(c.kernel.asm["cubin"]),
        **resource_usage(c.kernel),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help="compute capabilities to compile for (80 A100, 90 H100/H200, 100 B200); default 90")
    p.add_argument("--res", type=int, nargs="+", default=[512, 1024], help="image sides (latents are side/8)")
    p.add_argument("--rows", type=int, nargs="+", default=[2, 12, 26], help="rows per launch (micro-batch)")
    p.add_argument("--json", type=Path, help="also write one record per specialisation to this file")
    args = p.parse_args(argv)
    from triton.backends.compiler import GPUTarget

    calls = sd35_launches(args.res, args.rows)
    failures, records = 0, []
    print(f"{len(calls)} launches recorded (triton {triton.__version__})")
    print(f"{'arch':>5}  {'kernel':<22} {'pointer dtypes, constexprs':<60} {'regs':>4} {'spill':>5} {'smem':>6}")
    for arch in args.arch:
        for c in compile_for(calls, GPUTarget("cuda", arch, 32)):
            use = report(c, arch)
            records.append(use)
            failures += use["local"] > 0
            print(f"sm_{arch:<3} {c.name:<22} {c.describe()[:60]:<60} {use['registers']:>4} {use['local']:>5} "
                  f"{use['shared']:>6}")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "launches": len(calls),
                                         "kernels": records}, indent=1))
    if failures:
        print(f"{failures} specialisation(s) spill registers to local memory", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
