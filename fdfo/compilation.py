"""torch.compile of a module in place, eager for good after a compiler failure (``model.compile``).

``Compiled(module, log)`` does what ``nn.Module.compile`` does, ``module._compiled_call_impl =
torch.compile(module._call_impl, dynamic=False)``, so every caller of the module (the CUDA graph of the
sampler, the DeepSpeed engine's forward, evaluation) runs the one compiled module, with a wrapper around
each call:

* a compiler failure (dynamo or inductor raising, a missing C++ compiler, a backend that fails) at any
  call, first or later (a new shape compiles anew), makes the module eager for good: the call is re-run
  eagerly, the compiled impl is removed and ``log`` gets one line. If the eager re-run raises too, the
  error is the caller's (a shape error, an out-of-memory): it propagates and nothing is switched off;
  an out-of-memory error is never taken for a compiler failure.
* ``compile_s`` sums the wall time of the calls that compiled something (dynamo's frame counter moved
  during the call), so a trainer can log compilation apart from steady-state time. AOTAutograd compiles
  the backward lazily, at the first ``backward()``; here it is compiled with the forward instead, inside
  the call (functorch's ``force_non_lazy_backward_lowering``), so its time is counted and its failure
  caught like the forward's.

Dynamo's recompile limit is raised to ``RECOMPILE_LIMIT`` (process-wide): one transformer serves several
static shapes and modes (sampling rows with and without CFG, training micro-batches with gradients,
evaluation, the adapter switched off for a KL term), each a graph of its own.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn

AUTO = "auto"
RECOMPILE_LIMIT = 64


def wanted(setting: bool | str, device: torch.device | str) -> bool:
    """Whether ``model.compile`` (true, false or "auto") compiles on ``device``: "auto" = on CUDA only
    (inductor's CPU code takes minutes to build for little gain at the sizes a CPU trains)."""
    if setting == AUTO:
        return torch.device(device).type == "cuda"
    return bool(setting)


def _frames() -> int:
    """Dynamo's count of frames it compiled (or tried to): it moves only when a call compiles."""
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def _compiler_error(exc: BaseException) -> bool:
    """A failure of torch.compile itself (dynamo, inductor, the C++ or Triton toolchain), not of the code
    it compiles; an out-of-memory error anywhere in the chain is never one."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor

    seen = exc
    while seen is not None:
        if isinstance(seen, torch.OutOfMemoryError):
            return False
        seen = seen.__cause__ or seen.__context__
    return isinstance(exc, (TorchDynamoException, inductor.OperatorIssue, inductor.InvalidCxxCompiler,
                            inductor.CppCompileError, inductor.CppWrapperCodegenError))


def _backward_with_forward():
    """Compile AOTAutograd's backward with its forward (inside the module call) rather than at the first
    ``backward()``; a no-op where this torch has no such switch."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


class Compiled:
    """``module`` compiled in place (see the module docstring); ``compiled`` is true until a compiler failure,
    ``compile_s`` the seconds spent in calls that compiled, ``compilations`` how many such calls there were.

    log:      where the one fallback line goes (default: print).
    name:     what the line calls the module.
    **kwargs: more keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``options``)."""

    def __init__(self, module: nn.Module, log: Callable[[str], None] | None = None, *,
                 name: str = "the transformer", **kwargs):
        import torch._dynamo

        self.module, self.log, self.name = module, log or print, name
        self.compiled = True
        self.compile_s = 0.0
        self.compilations = 0
        self.failure: str | None = None  # the compiler's error, once it failed
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        self._fn = torch.compile(module._call_impl, **{"dynamic": False, **kwargs})
        module._compiled_call_impl = self._call

    def _call(self, *args, **kwargs):
        frames, start = _frames(), time.perf_counter()
        try:
            with _backward_with_forward():
                out = self._fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (sorted below: a compiler failure or the caller's error)
            if not _compiler_error(exc):
                raise
            failed_s = time.perf_counter() - start
            out = self.module._call_impl(*args, **kwargs)  # eager; an error here is the caller's and propagates
            self.compile_s += failed_s
            self._fall_back(exc)
            return out
        if _frames() != frames:
            self.compile_s += time.perf_counter() - start
            self.compilations += 1
        return out

    def _fall_back(self, exc: BaseException) -> None:
        if self.module._compiled_call_impl == self._call:
            self.module._compiled_call_impl = None
        self.compiled = False
        root = exc  # the error the compiler's wrapper (BackendCompilerFailed, InductorError) was raised from
        while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
            root = getattr(root, "inner_exception", None) or root.__cause__
        first = (str(root).strip().splitlines() or [""])[0][:300]
        self.failure = type(exc).__name__ + (f" from {type(root).__name__}" if root is not exc else "") + f": {first}"
        self.log(f"torch.compile failed ({self.failure}): {self.name} runs eagerly from now on "
                 "(model.compile false silences this)")

    def stats(self) -> dict:
        """What a trainer logs: ``compiled`` and ``compile_s`` (cumulative seconds of compiling calls)."""
        return {"compiled": self.compiled, "compile_s": self.compile_s}
