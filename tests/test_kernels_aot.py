"""The kernels compile for the GPUs the trainer targets, checked on a machine without one.

fdfo.kernels.aot records the launches the real wrappers make at SD3.5 shapes and compiles each
specialisation to an sm_90 (H100/H200) cubin through Triton's own pipeline; the interpreter
tests elsewhere check the arithmetic, these check code generation: every specialisation
compiles, nothing spills to local memory, shared memory fits, and the streaming loads and
stores are 128-bit vectors (what bandwidth-bound kernels need).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from fdfo.kernels import aot  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)  # for the binder only: compiling happens in a subprocess
SM90_SMEM = 227 * 1024  # bytes of shared memory one block may use on Hopper


def _kernel_names() -> set[str]:
    return {name for m in aot.KERNEL_MODULES for name, obj in vars(m).items()
            if aot._is_kernel(obj) and name.endswith("_kernel")}


def _compile_in_subprocess(tmp_path, *args) -> dict:
    """Run the CLI without TRITON_INTERPRET (compiling needs triton.language's real @jit helpers)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "fdfo.kernels.aot", *args, "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    return result


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    return _compile_in_subprocess(tmp_path_factory.mktemp("aot"), "--arch", "90", "--res", "512", "1024",
                                  "--rows", "2", "26")


def test_recorder_covers_every_kernel_and_restores_them():
    before = {name: getattr(m, name) for m in aot.KERNEL_MODULES for name in _kernel_names() if hasattr(m, name)}
    calls = aot.sd35_launches(resolutions=(512,), rows=(2,))
    assert {c.name for c in calls} == _kernel_names()  # a new kernel must get a launch here
    after = {name: getattr(m, name) for m in aot.KERNEL_MODULES for name in _kernel_names() if hasattr(m, name)}
    assert before == after and all(aot._is_kernel(k) for k in after.values())


def test_sd35_specialisations_compile_for_sm90_without_spills(sm90):
    kernels = sm90["kernels"]
    assert {k["kernel"] for k in kernels} == _kernel_names()
    # bf16 and fp32 storage, CFG on/off, graph (device seed) and eager (int seed) paths all differ.
    assert len(kernels) >= 20
    assert {k["constexprs"].get("TILES") for k in kernels if k["kernel"] == "_partial_sums_kernel"} == {1}
    for k in kernels:
        assert k["local"] == 0, f"{k['kernel']} {k['describe']} spills {k['local']} bytes per thread"
        assert 0 < k["registers"] <= 255, k
        assert k["shared"] <= SM90_SMEM, k
        assert k["ptx_target"] in ("sm_90", "sm_90a") and k["cubin_bytes"] > 1000, k
    # The table the CLI prints has one row per specialisation.
    assert sum(line.startswith("sm_90") for line in sm90["stdout"].splitlines()) == len(kernels)


@pytest.mark.parametrize("name", ["_partial_sums_kernel", "_finish_kernel", "_pair_delta_kernel",
                                  "_churn_step_kernel"])
def test_streaming_loads_and_stores_are_128_bit(sm90, name):
    streaming = [k for k in sm90["kernels"] if k["kernel"] == name and k["constexprs"].get("WRITE_GRAD", True)]
    assert streaming  # (the metrics-only finish, WRITE_GRAD=False, reads just the partial sums)
    for k in streaming:
        loads, stores = set(k["ptx_loads"]), set(k["ptx_stores"])
        assert loads & {"ld.global.v4.b32", "ld.global.nc.v4.b32"}, f"{name} {k['describe']}: no vector loads"
        if name == "_partial_sums_kernel":
            # Every load is a row stream, except the row's ms (one scalar) where it is given.
            scalar = {op for op in loads if ".v4." not in op}
            assert scalar <= ({"ld.global.b32", "ld.global.nc.b32"} if k["constexprs"]["MS_GIVEN"] else set()), \
                (k["describe"], loads)
            if k["constexprs"]["WRITE_DIR"]:  # (without it, phase 1 writes three floats per program)
                assert "st.global.v4.b32" in stores, f"{name} {k['describe']}: no vector stores"
        else:
            assert "st.global.v4.b32" in stores, f"{name} {k['describe']}: no vector stores"


def test_fd_loss_specialisations_with_and_without_ms(sm90):
    """Both phases compile with mean(d²) summed in phase 1 and with it given (the trainer's), with
    and without the gradient, at every resolution and storage dtype."""
    # (MS_GIVEN, WRITE_DIR) of phase 1 (the direction is written only with ms given) and
    # (MS_GIVEN, WRITE_GRAD) of phase 2.
    expected = {("_partial_sums_kernel", "WRITE_DIR"): {(False, False), (True, False), (True, True)},
                ("_finish_kernel", "WRITE_GRAD"): {(False, False), (False, True), (True, False), (True, True)}}
    for (name, flag), flags in expected.items():
        for ptr in ("*fp32", "*bf16"):
            got = {(k["constexprs"]["MS_GIVEN"], k["constexprs"][flag]) for k in sm90["kernels"]
                   if k["kernel"] == name and k["pointers"]["v_ptr"] == ptr}
            assert got == flags, (name, ptr, got)


def _v_attrs(v: torch.Tensor) -> list:
    with aot.record_launches() as calls:
        aot.fd_loss_triton.fd_loss_forward(v, torch.randn(v.shape), torch.randn(v.shape), torch.randn(v.shape[0]),
                                           1e-4)
    launch = next(c for c in calls if c.name == "_partial_sums_kernel")
    _, sig, _, attrs, _ = aot.specialise(launch, SM90)
    return attrs.get((list(sig).index("v_ptr"),), [])


def test_specialisation_follows_pointer_alignment():
    """The binder sees what a GPU launch would: a 16-byte-aligned pointer is marked divisible by 16,
    a view that starts one element in is not."""
    rows, n = 4, 1024 + 4 * int(torch.randint(1, 50, ()))
    base = torch.randn(rows * n + 1)
    aligned, shifted = base[: rows * n].view(rows, n), base[1:].view(rows, n)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    assert ["tt.divisibility", 16] in _v_attrs(aligned)
    assert ["tt.divisibility", 16] not in _v_attrs(shifted)
