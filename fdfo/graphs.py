"""The paired sampler's step loop as a replayed CUDA graph (docs/architecture.md, fdfo.sampling).

One sampling step of a micro-batch of 2P rows,

    xs[:, k] ← x                                   (state entering step k)
    v        ← forward(x, t) ; with CFG v_u + w·(v_c − v_u) on the [uncond; cond] batch
    x        ← churn_step(x, v, t → s, γ, ε(seed, offset = k + 1))   (fdfo.kernels, Philox in-kernel)
    vs[:, k] ← v                                   (velocity used at step k)

is captured once per (rows, CFG on/off, shapes) and replayed for every step and every
micro-batch. Everything that changes between replays lives in static device buffers
that are refreshed with device-to-device copies before each replay: the step index k
and RNG offset, the per-row coefficients (t, s, γ), the seed and the conditioning. The
loop never reads a value back to the host. All graphs allocate from one shared memory
pool; their intermediates are dead at the end of a step, so replays in any order are
safe on one stream.

The captured forward reads the model's weights where they lie: an optimizer step that
updates LoRA (or full) weights in place is seen by the next replay, so a run captures
once. If the weights move (a ZeRO-3 gather into fresh buffers, ``p.data = …``), the
graphs are captured again before the next replay.

Eager twin: the same step function run without a graph (same buffers, kernels and noise),
used on CPU, when graphs are switched off, and when capture fails; the reason is said
once. With the PyTorch kernel backend it is exactly ``fdfo.sampling.sample_pairs`` given
the noise ``fdfo.kernels.churn_noise(…, seed, offset)`` at offsets 0 (prior), 1, …, T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fdfo import kernels
from fdfo.models.base import Conditioning
from fdfo.sampling import Trajectories

# (x [B, C, H, W], σ [B], cond with embeds [B, L, D] and pooled [B, Dp]) -> v [B, C, H, W] (float)
ForwardFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class _Buffers:
    """Static inputs and outputs of one captured step (their addresses are baked into the graph)."""

    rows: int
    cfg: bool
    x: torch.Tensor  # [rows, C, H, W] state, updated in place
    xs: torch.Tensor  # [rows, T, C, H, W] stored states
    vs: torch.Tensor  # [rows, T, C, H, W] stored velocities
    v: torch.Tensor  # [rows, C, H, W] velocity used by the current step (store dtype)
    coef: torch.Tensor  # [3, rows] fp32: t, s, γ of the current step
    step: torch.Tensor  # [2] int64: trajectory index k and RNG offset k + 1
    seed: torch.Tensor  # [1] int64: Philox seed of the micro-batch
    prior_offset: torch.Tensor  # [1] int64 zero: RNG offset of the prior churn
    cond: Conditioning  # [rows or 2·rows (uncond first), ...]


class GraphSampler:
    """``fdfo.sampling.sample_pairs`` with the step loop captured as CUDA graphs (eager elsewhere).

    forward:        (x, σ, cond) -> v for the rows of x, no CFG (e.g. ``model.velocity`` at guidance 1).
    guidance_scale: CFG weight w; with w != 1 each step runs forward on [uncond; cond] and the
                    churn kernel combines v_u + w·(v_c − v_u).
    uncond:         the negative-prompt conditioning (1 row, broadcast), needed when w != 1.
    store_dtype:    dtype of the stored xs/vs (default: the latents' dtype, as sample_pairs).
    graphs:         capture CUDA graphs when on CUDA (False: always eager).
    module:         the nn.Module whose parameters forward reads: graphs are re-captured when
                    any of them moves to another address. A module compiled in place
                    (``FlowModel.compile``, fdfo.compilation) is captured compiled: the warm-up
                    steps compile it, the capture records its kernels.
    backend:        fdfo.kernels backend of the churn step, "auto" (Triton on CUDA), "triton" or "torch";
                    graphs are captured only when it resolves to compiled Triton.
    warmup:         eager steps on a side stream before each capture (compiles Triton kernels,
                    torch.compile, cuBLAS workspaces).
    log:            where the one fallback message goes (default ``warnings.warn``).
    """

    def __init__(self, forward: ForwardFn, *, guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                 store_dtype: torch.dtype | None = None, graphs: bool = True,
                 module: nn.Module | None = None, backend: str = "auto", warmup: int = 2,
                 log: Callable[[str], None] | None = None):
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError("guidance_scale != 1 needs the negative-prompt conditioning (uncond)")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; valid: {', '.join(kernels.BACKENDS)}")
        self.forward = forward
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond
        self.store_dtype = store_dtype
        self.graphs_enabled = graphs
        self.module = module
        self.backend = backend
        self.warmup = warmup
        self.log = log
        self.pool = None  # torch.cuda.graph_pool_handle(), created with the first graph
        self.fallback_reason: str | None = None  # why sampling runs eagerly (said once)
        self.captures = 0  # graphs captured so far (re-captures included)
        self._buffers: dict[tuple, _Buffers] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._weights: tuple[int, ...] | None = None  # parameter addresses the graphs were captured with
        self._steps: dict[tuple, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model, *, guidance_scale: float = 1.0, uncond: Conditioning | None = None,
                  **kwargs) -> "GraphSampler":
        """A sampler over a flow model of ``fdfo.models`` (its transformer, with LoRA if added; under ZeRO-3
        its persistent inference copy, so the graph is captured once per run). Other keyword arguments
        (``backend``, ``graphs``, ``log``, ...) go to the constructor unchanged."""
        module = model.inference_transformer if model.inference_transformer is not None else model.transformer
        return cls(lambda x, sigma, cond: model.velocity(x, sigma, cond, net=module), guidance_scale=guidance_scale,
                   uncond=uncond, module=module, **kwargs)

    @property
    def mode(self) -> str:
        return "graph" if self._graphs else "eager"

    # ------------------------------------------------------------------ the sampler

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor, gamma_prior: torch.Tensor,
               gamma_steps: torch.Tensor, seed: int) -> Trajectories:
        """Paired trajectories, as ``sample_pairs`` (same layout: pair i owns rows 2i and 2i + 1).

        latents: [P, C, H, W] one Gaussian latent per pair (its dtype is the state's dtype).
        cond:    conditioning of the 2P rows (embeds [2P, L, D], pooled [2P, Dp]), on the latents' device.
        sigmas:  [T + 1] σ grid; gamma_prior [2P] and gamma_steps [T, 2P] from ``churn_schedule``.
        seed:    Philox seed of this micro-batch (int in [0, 2**63)); the noise of the prior churn is
                 drawn at offset 0 and that of step k at offset k + 1.
        sigmas and the γ's are best passed on the CPU (as churn_schedule makes them): they are uploaded
        pinned and non-blocking, so nothing here waits for the GPU. Returns fresh tensors (the static
        buffers are reused by the next call).
        """
        device, rows, T = latents.device, 2 * latents.shape[0], sigmas.numel() - 1
        if len(cond) != rows:
            raise ValueError(f"cond has {len(cond)} rows, expected 2·P = {rows}")
        buf = self._buffers_for(latents, cond, T)
        graph = self._graph_for(buf, device)
        # Per-step coefficients [T, 3, rows] and the prior's γ, uploaded without a host sync.
        sig = sigmas.detach().to(torch.float32).cpu()
        g_steps = gamma_steps.detach().to(device="cpu", dtype=torch.float32)
        coef = torch.stack([sig[:-1, None].expand(T, rows), sig[1:, None].expand(T, rows), g_steps], 1)
        coef = _upload(coef, device)
        g_prior = _upload(gamma_prior.detach().to(device="cpu", dtype=torch.float32), device)
        steps = self._step_table(T, device)  # [T, 2] int64: (k, k + 1)

        buf.x.unflatten(0, (-1, 2)).copy_(latents.unsqueeze(1))  # both rows of a pair start identical
        buf.seed.fill_(int(seed))
        buf.cond.embeds[-rows:].copy_(cond.embeds)
        buf.cond.pooled[-rows:].copy_(cond.pooled)
        kernels.prior_churn(buf.x, g_prior, seed=buf.seed, offset=buf.prior_offset, out=buf.x, backend=self.backend)
        for k in range(T):
            buf.coef.copy_(coef[k])
            buf.step.copy_(steps[k])
            if graph is not None:
                graph.replay()
            else:
                self._step(buf)
        return Trajectories(xs=buf.xs.clone(), vs=buf.vs.clone(), x0=buf.x.clone())

    @torch.no_grad()
    def prepare(self, latents: torch.Tensor, cond: Conditioning, sigmas: torch.Tensor) -> str:
        """Allocate the buffers and capture the graph for these shapes now (warm-up steps only, no
        sampling); returns the mode, "graph" or "eager". ``sample`` does this itself when needed."""
        buf = self._buffers_for(latents, cond, sigmas.numel() - 1)
        return "graph" if self._graph_for(buf, latents.device) is not None else "eager"

    def _step(self, buf: _Buffers) -> None:
        """One step on the static buffers: the body that is captured (and the eager twin)."""
        x, k = buf.x, buf.step[:1]
        t, s, g = buf.coef[0], buf.coef[1], buf.coef[2]
        buf.xs.index_copy_(1, k, x.unsqueeze(1).to(buf.xs.dtype))
        if buf.cfg:
            v_u, v_c = self.forward(torch.cat([x, x]), torch.cat([t, t]), buf.cond).chunk(2)
            kernels.churn_step(x, v_u, t, s, g, v_cond=v_c, cfg_scale=self.guidance_scale, seed=buf.seed,
                               offset=buf.step[1:], out=x, v_out=buf.v, backend=self.backend)
        else:
            v = self.forward(x, t, buf.cond)
            kernels.churn_step(x, v, t, s, g, seed=buf.seed, offset=buf.step[1:], out=x, v_out=buf.v,
                               backend=self.backend)
        buf.vs.index_copy_(1, k, buf.v.unsqueeze(1))

    # ------------------------------------------------------------------ buffers and graphs

    def _buffers_for(self, latents: torch.Tensor, cond: Conditioning, T: int) -> _Buffers:
        rows, device, cfg = 2 * latents.shape[0], latents.device, self.guidance_scale != 1.0
        store = self.store_dtype or latents.dtype
        key = (rows, cfg, T, tuple(latents.shape[1:]), latents.dtype, store, tuple(cond.embeds.shape[1:]),
               tuple(cond.pooled.shape[1:]), cond.embeds.dtype, cond.pooled.dtype, str(device))
        buf = self._buffers.get(key)
        if buf is not None:
            return buf
        x = torch.zeros(rows, *latents.shape[1:], dtype=latents.dtype, device=device)
        xs = torch.zeros(rows, T, *latents.shape[1:], dtype=store, device=device)
        coef = torch.ones(3, rows, dtype=torch.float32, device=device)
        coef[2] = 0.0  # t = s = 1, γ = 0 until the first real step: a harmless warm-up step
        embeds = torch.zeros(rows, *cond.embeds.shape[1:], dtype=cond.embeds.dtype, device=device)
        pooled = torch.zeros(rows, *cond.pooled.shape[1:], dtype=cond.pooled.dtype, device=device)
        if cfg:  # [uncond; cond]: the negative prompt's half is written once
            u = self.uncond.to(device)
            u = u.expand(rows) if len(u) == 1 else u
            embeds = torch.cat([u.embeds.to(embeds.dtype), embeds])
            pooled = torch.cat([u.pooled.to(pooled.dtype), pooled])
        buf = _Buffers(rows=rows, cfg=cfg, x=x, xs=xs, vs=torch.zeros_like(xs), v=torch.zeros_like(x, dtype=store),
                       coef=coef, step=torch.zeros(2, dtype=torch.int64, device=device),
                       seed=torch.zeros(1, dtype=torch.int64, device=device),
                       prior_offset=torch.zeros(1, dtype=torch.int64, device=device),
                       cond=Conditioning(embeds, pooled))
        self._buffers[key] = buf
        return buf

    def _step_table(self, T: int, device: torch.device) -> torch.Tensor:
        key = (T, str(device))
        if key not in self._steps:
            k = torch.arange(T, dtype=torch.int64)
            self._steps[key] = torch.stack([k, k + 1], 1).to(device)  # [T, 2]
        return self._steps[key]

    def _graph_for(self, buf: _Buffers, device: torch.device) -> torch.cuda.CUDAGraph | None:
        """The captured step for these buffers, or None (eager) with the reason said once."""
        if not self.graphs_enabled:
            return self._fallback("CUDA graphs are off (graphs=False)")
        if device.type != "cuda":
            return self._fallback(f"CUDA graphs need a CUDA device (the latents are on {device.type})")
        if self.fallback_reason is not None:
            return None
        if kernels.resolve_backend(self.backend, buf.x) != "triton":
            return self._fallback("the churn step runs the PyTorch reference (kernel backend 'torch' or no "
                                  "triton), whose noise is seeded on the host: not capturable")
        if kernels.triton_interpreted():
            return self._fallback("Triton runs in its CPU interpreter (TRITON_INTERPRET=1): not capturable")
        weights = self._weights_signature()
        if weights != self._weights:
            self._drop_graphs()  # the weights moved: graphs would read stale addresses
            self._weights = weights
        key = id(buf)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(buf, device)
            except Exception as exc:  # noqa: BLE001  (anything not capturable: eager, said once)
                self._drop_graphs()
                try:
                    torch.cuda.synchronize(device)
                except Exception:  # noqa: BLE001  (the capture's own error was the news)
                    pass
                return self._fallback(f"CUDA graph capture failed ({type(exc).__name__}: {exc})")
        return self._graphs[key]

    def _capture(self, buf: _Buffers, device: torch.device) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream, as the PyTorch CUDA-graph docs require: lazy initialisation
        # (Triton and torch.compile compilation, cuBLAS handles) must not happen inside the capture.
        # It scribbles on the static buffers, which every sample() rewrites before its first replay.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step(buf)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(buf)
        self.captures += 1
        return graph

    def _drop_graphs(self) -> None:
        """Forget every graph; the next captures share a fresh pool (the old one goes with its graphs)."""
        self._graphs.clear()
        self.pool = None

    def _weights_signature(self) -> tuple[int, ...] | None:
        if self.module is None:
            return None
        return tuple(t.data_ptr() for t in (*self.module.parameters(), *self.module.buffers()))

    def _fallback(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            msg = f"sampling eagerly: {reason}; same maths, kernels and noise as the graph path"
            if self.log is not None:
                self.log(msg)
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return None


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync (pinned, non-blocking) when that is CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
