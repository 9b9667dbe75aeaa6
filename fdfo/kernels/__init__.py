"""Fused Triton kernels for FDFO and the dispatch between them and their PyTorch references.

    fd_loss(v, v_ref, d, dR, clip_range, ms=None)   same as fdfo.loss.fdfo_loss (loss, metrics); ms:
                                                    pair_delta's per-row mean square, or None
    pair_delta(x0, rewards)                         same as fdfo.loss.pair_delta (d, dR, ms)
    churn_step(x, v, t, s, gamma, noise=None, *, v_cond, cfg_scale, seed, offset, out, v_out)
    prior_churn(x, gamma, noise=None, *, seed, offset, out)
                                                    fdfo.sampling.churn_step / prior_churn, CFG
                                                    fused, noise drawn from (seed, offset) when
                                                    no noise tensor is given
    churn_noise(shape, seed, offset, *, device)     the noise churn_step draws for (seed, offset)

Every function takes ``backend="auto"|"triton"|"torch"``, chosen per call (or held by the
caller's object, e.g. ``fdfo.graphs.GraphSampler``; the trainer passes its ``train.kernels``):
there is no process-wide mode. "auto": Triton for CUDA tensors when triton is installed, the
PyTorch reference otherwise. "triton": always Triton; CPU tensors then need the interpreter
(TRITON_INTERPRET=1 set before triton is first imported). "torch": always the reference.
``resolve_backend`` says which of the two a call takes, ``triton_interpreted`` whether the
Triton kernels run in the interpreter.

triton is imported only when a Triton path runs, so this package imports (and
"auto" works) where triton is not installed. The kernels live in
``fd_loss_triton.py``, ``churn_step_triton.py`` and ``pair_delta_triton.py``
(one file per kernel, with its launcher and autograd wrapper; ``launch.py`` holds
what they share): a submodule named like one of the functions below would
replace that function on the package the moment it is imported.

Noise: the Triton churn step draws Philox noise keyed by (seed, offset, row); the
torch path draws from a torch.Generator seeded from (seed, offset). Both are
reproducible for a given (seed, offset) and backend, but the two backends give
different (equally distributed) noise. ``churn_noise`` returns whichever the
chosen backend uses, so ``churn_step(..., seed=, offset=)`` always equals the
reference given ``noise=churn_noise(...)``.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from fdfo.loss import fdfo_loss as _fdfo_loss_torch
from fdfo.loss import pair_delta as _pair_delta_torch
from fdfo.sampling import churn_step as _churn_step_torch
from fdfo.sampling import prior_churn as _prior_churn_torch

__all__ = ["BACKENDS", "triton_available", "triton_interpreted", "resolve_backend", "fd_loss", "pair_delta",
           "churn_step", "prior_churn", "churn_noise"]

BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was
    first imported): they then take CPU tensors, and cannot be captured in a CUDA graph. False where
    triton is not installed; imports triton otherwise."""
    if not triton_available():
        return False
    from .churn_step_triton import _churn_step_kernel
    from .launch import interpreted

    return interpreted(_churn_step_kernel)


def resolve_backend(backend: str = "auto", *tensors: torch.Tensor | None, device=None) -> str:
    """"triton" or "torch": the path a function of this package takes for ``backend`` and these tensors
    (or a bare ``device``). Raises ValueError for an unknown backend and RuntimeError for "triton"
    without triton installed."""
    return "triton" if _use_triton(backend, *tensors, device=device) else "torch"


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def _use_triton(backend: str, *tensors: torch.Tensor | None, device: torch.device | None = None) -> bool:
    mode = _check_backend(backend)
    if mode == "torch":
        return False
    tensors = [t for t in tensors if t is not None]
    devices = {t.device for t in tensors} | ({torch.device(device)} if device is not None else set())
    on_cuda = bool(devices) and all(d.type == "cuda" for d in devices)
    if mode == "auto":
        return (on_cuda and triton_available()
                and all(t.dtype in _KERNEL_DTYPES for t in tensors if t.is_floating_point() and t.dim() > 1))
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was requested but triton is not installed "
                           "(pip install triton, or use backend 'auto'/'torch')")
    return True  # the kernel wrapper raises a clear error for CPU tensors without the interpreter


# --------------------------------------------------------------------------- fd_loss


def fd_loss(v: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor, clip_range: float,
            ms: torch.Tensor | None = None, *, backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FD surrogate loss and its metrics (see fdfo.loss.fdfo_loss); gradient flows into v.

    ms: the rows' mean(d²) [rows] as ``pair_delta`` returns it (``ms[rows]`` for a micro-batch
    ``d[rows]``), or None to compute it from d. Given, the Triton path writes the gradient's
    direction in its first pass and only rescales it in the second (v, v_ref and d are read once).
    """
    if _use_triton(backend, v, v_ref, d, dR, ms):
        from .fd_loss_triton import fd_loss as fd_loss_triton

        return fd_loss_triton(v, v_ref, d, dR, clip_range, ms)
    return _fdfo_loss_torch(v, v_ref, d, dR, clip_range, ms)


# --------------------------------------------------------------------------- pair_delta


def pair_delta(x0: torch.Tensor, rewards: torch.Tensor, *,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d [2P, ...], dR [2P], per-row mean square of d [2P] (see fdfo.loss.pair_delta)."""
    if _use_triton(backend, x0, rewards):
        from .pair_delta_triton import pair_delta as pair_delta_triton

        return pair_delta_triton(x0, rewards)
    return _pair_delta_torch(x0, rewards)


# --------------------------------------------------------------------------- churn step


def _mix_seed(seed: int, offset: int) -> int:
    """A 63-bit torch.Generator seed from (seed, offset): splitmix64 of both words."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(offset) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def _torch_noise(shape, seed, offset, device, dtype=torch.float32) -> torch.Tensor:
    # Reading a seed/offset tensor synchronises with the device: the torch path is the eager one.
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    offset = int(offset.item()) if isinstance(offset, torch.Tensor) else int(offset)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix_seed(seed, offset))
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)


def churn_noise(shape, seed, offset=0, *, device, dtype: torch.dtype = torch.float32,
                backend: str = "auto") -> torch.Tensor:
    """The fresh noise ε [rows, ...] that churn_step/prior_churn draw for (seed, offset) on this backend."""
    if _use_triton(backend, device=torch.device(device)):
        from .churn_step_triton import churn_noise as churn_noise_triton

        return churn_noise_triton(shape, seed, offset, device=device, dtype=dtype)
    return _torch_noise(shape, seed, offset, device, dtype)


def _churn_torch(x, v, t, s, gamma, noise, v_cond, cfg_scale, seed, offset, out, v_out, prior: bool):
    if v_cond is not None:
        v = v + cfg_scale * (v_cond - v)
    if v_out is not None:
        v_out.copy_(v)
    if noise is None:
        if not isinstance(gamma, torch.Tensor) and float(gamma) == 0.0:
            noise = torch.zeros_like(x)
        elif seed is None:
            raise ValueError("churn_step: pass a noise tensor or a seed")
        else:
            noise = _torch_noise(x.shape, seed, offset, x.device, x.dtype)
    x_new = _prior_churn_torch(x, gamma, noise) if prior else _churn_step_torch(x, v.to(x.dtype), t, s, gamma, noise)
    if out is None:
        return x_new
    return out.copy_(x_new)


def churn_step(x: torch.Tensor, v: torch.Tensor, t, s, gamma, noise: torch.Tensor | None = None, *,
               v_cond: torch.Tensor | None = None, cfg_scale: float | None = None, seed=None, offset=0,
               out: torch.Tensor | None = None, v_out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """One overshoot-Euler churn step from σ=t to σ=s for all rows (see fdfo.sampling.churn_step).

    x [rows, ...]; v [rows, ...] the velocity, or with ``v_cond`` the unconditional one
    (the step then uses v + cfg_scale·(v_cond − v)). t, s, gamma: floats or per-row tensors.
    noise: ε [rows, ...], or None to draw it from (seed, offset): ints or one-element integer
    tensors (Triton reads tensors on the device: CUDA-graph safe). ``offset`` names the call
    (e.g. the step index); rows get independent streams. out: buffer for x' (may alias x or be a
    row-strided view); v_out: buffer that receives the velocity used. Returns x'.
    """
    if v_cond is not None and cfg_scale is None:
        raise ValueError("churn_step: v_cond needs cfg_scale")
    if _use_triton(backend, x, v, v_cond, noise, out, v_out):
        from .churn_step_triton import churn_step as churn_step_triton

        return churn_step_triton(x, v, t, s, gamma, noise, v_cond=v_cond, cfg_scale=cfg_scale, seed=seed,
                                 offset=offset, out=out, v_out=v_out)
    return _churn_torch(x, v, t, s, gamma, noise, v_cond, cfg_scale, seed, offset, out, v_out, prior=False)


def prior_churn(x: torch.Tensor, gamma, noise: torch.Tensor | None = None, *, seed=None, offset=0,
                out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x/(1+γ₀) + sqrt((1+γ₀)² − 1)/(1+γ₀)·ε for all rows (see fdfo.sampling.prior_churn)."""
    if _use_triton(backend, x, noise, out):
        from .churn_step_triton import prior_churn as prior_churn_triton

        return prior_churn_triton(x, gamma, noise, seed=seed, offset=offset, out=out)
    return _churn_torch(x, None, None, None, gamma, noise, None, None, seed, offset, out, None, prior=True)
