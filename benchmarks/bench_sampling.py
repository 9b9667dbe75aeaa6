"""Paired-sampling throughput and model FLOP utilisation: eager, CUDA graph and torch.compile.

Random-init weights in the real SD3.5 Medium transformer (speed does not depend on the
values), LoRA rank 32 on the attention projections as while training, 512² images
(64×64 latents), 40 steps with churn, CFG off and on, micro-batches of 2–26 rows. The
transformer sits in its flow model (``fdfo.models.flavours.flow_model``): every variant
calls the velocity and the LoRA set-up that training runs. Every variant samples the same
micro-batch:

    published    the published code's loop: PyTorch ops, host-synchronising step (.item() per
                 step), noise from torch.randn, trajectories gathered in lists; no kernels, no graphs
    eager        fdfo.graphs.GraphSampler run eagerly: fused churn kernel, in-kernel Philox noise
    graph        the same step captured once as a CUDA graph and replayed for every step
    compile      eager with the transformer under torch.compile
    graph+compile (opt-in) both

First a correctness check on the GPU (graph trajectories bit-identical to eager; compile's
largest difference from eager), then one timed run per variant after a short warm-up (the
graph is captured there). MFU = FLOPs of the forwards (torch.utils.flop_counter on one
forward) over time, against the GPU's dense bf16 peak (fdfo.flops: 989.4 TFLOP/s for an H100
SXM or H200; --peak-tflops overrides; no MFU where the peak is unknown, e.g. on a CPU).

    python benchmarks/bench_sampling.py --cfg off            # ≈ 5 min on an H100
    python benchmarks/bench_sampling.py --cfg on
    python benchmarks/bench_sampling.py --rows 8 --variants published graph
    python benchmarks/bench_sampling.py --cfg off --rows 6   # the published micro-batch only (run_gpu.sh)
    python benchmarks/bench_sampling.py --tiny               # smoke run (on CPU: published and eager only)

Prints one line per measurement, a short table last, and writes JSON to --out, rewritten
after every variant (``"complete": false`` until the last), so a run cut short keeps what
it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from fdfo.atomic import write_text
from fdfo.config import LoraConfig
from fdfo.flops import count_flops, peak_bf16_tflops
from fdfo.gpu_stats import GpuStats
from fdfo.graphs import GraphSampler
from fdfo.models import flavours
from fdfo.models.base import Conditioning, FlowModel
from fdfo.models.flavours import ARCHS
from fdfo.sampling import Trajectories, churn_schedule, churn_step, prior_churn

VARIANTS = ("published", "eager", "graph", "compile", "graph+compile")


# --------------------------------------------------------------------------- the published formulation


@torch.no_grad()
def sample_published(velocity, latents, sigmas: torch.Tensor, gamma_prior: torch.Tensor, gamma_steps: torch.Tensor,
                     generator: torch.Generator) -> Trajectories:
    """The step loop as the published code writes it: scalars read back to the host every step.
    velocity: (x, σ) -> v with CFG as configured (the trainer's ``Policy.velocity_fn``)."""
    device = latents.device
    x = latents.repeat_interleave(2, dim=0)
    rows, T = x.shape[0], sigmas.numel() - 1
    sig = sigmas.to(device)
    g_steps = gamma_steps.to(device, torch.float32)
    x = prior_churn(x, gamma_prior.to(device, torch.float32),
                    torch.randn(x.shape, generator=generator, device=device))
    xs, vs = [], []
    for k in range(T):
        t, s = sig[k].item(), sig[k + 1].item()  # host synchronisation, every step
        v = velocity(x, torch.full((rows,), t, device=device))
        xs.append(x)
        vs.append(v)
        x = churn_step(x, v, t, s, g_steps[k], torch.randn(x.shape, generator=generator, device=device))
    return Trajectories(xs=torch.stack(xs, 1), vs=torch.stack(vs, 1), x0=x)


# --------------------------------------------------------------------------- set-up


def build_model(arch: str, lora: int, device: torch.device, dtype: torch.dtype) -> FlowModel:
    """The flow model around a random-init transformer of ``arch`` with the trainer's LoRA (rank ``lora``,
    alpha 2·rank, on the family's targets; 0: none)."""
    torch.manual_seed(0)
    model = flavours.flow_model(arch, device, dtype)
    if lora:
        model.add_lora(LoraConfig(rank=lora, alpha=2.0 * lora))
    return model


def velocity_fn(model: FlowModel, net):
    """(x, σ, cond) -> v without CFG through ``net`` (the transformer, or it under torch.compile): the model's
    own velocity, as the trainer's sampler calls it (``GraphSampler.for_model``)."""
    return lambda x, sigma, cond: model.velocity(x, sigma, cond, net=net)


def forward_flops(forward, x, sigma, cond) -> int:
    with torch.no_grad():
        return count_flops(lambda: forward(x, sigma, cond))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def skip_reason(variant: str, device: torch.device) -> str | None:
    if "graph" in variant and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if "compile" in variant and device.type != "cuda":
        return "torch.compile is not timed on CPU (minutes to build)"
    return None


# --------------------------------------------------------------------------- one configuration


def run_config(args, model, forward, compiled, device, dtype, sigmas, rows: int, cfg: bool, emit=None) -> list[dict]:
    """Every variant at one (rows, cfg); ``emit(results)`` after each, so the caller can save them as it goes."""
    arch = ARCHS[args.arch]
    C, side, L = arch["in_channels"], args.latent, args.text_tokens
    P, T = rows // 2, sigmas.numel() - 1
    guidance = args.guidance if cfg else 1.0
    g = torch.Generator(device).manual_seed(rows)
    latents = torch.randn(P, C, side, side, generator=g, device=device)
    cond = Conditioning(torch.randn(rows, L, arch["joint_attention_dim"], generator=g, device=device).to(dtype),
                        torch.randn(rows, arch["pooled_projection_dim"], generator=g, device=device).to(dtype))
    uncond = Conditioning(torch.randn(1, L, arch["joint_attention_dim"], generator=g, device=device).to(dtype),
                          torch.randn(1, arch["pooled_projection_dim"], generator=g, device=device).to(dtype))
    g_prior, g_steps = churn_schedule("raw", args.churn, sigmas, rows)
    short = sigmas[[0, T // 2, T]] if T >= 2 else sigmas  # warm-up grid: 2 steps
    g_prior_s, g_steps_s = churn_schedule("raw", args.churn, short, rows)
    seed = 1234 + rows

    fwd_rows = 2 * rows if cfg else rows
    both = Conditioning.cat([uncond.expand(rows), cond]) if cfg else cond
    x_in = torch.zeros(fwd_rows, C, side, side, device=device)
    flops_step = forward_flops(forward, x_in, torch.full((fwd_rows,), 0.5, device=device), both)
    peak = args.peak_tflops or peak_bf16_tflops(device)

    results, trajectories = [], {}
    for variant in args.variants:
        base = dict(arch=args.arch, latent=side, steps=T, cfg=cfg, rows=rows, variant=variant, lora=args.lora,
                    flops_per_step=flops_step)
        reason = skip_reason(variant, device)
        if reason:
            print(f"  cfg={'on' if cfg else 'off'} rows={rows} {variant}: skipped ({reason})", flush=True)
            results.append({**base, "skipped": reason})
            if emit:
                emit(results)
            continue
        try:
            if variant == "published":
                gen = torch.Generator(device)

                def velocity(x, t):
                    return model.velocity(x, t, cond, guidance, uncond)

                def run(sig=sigmas, gp=g_prior, gs=g_steps):
                    gen.manual_seed(seed)
                    return sample_published(velocity, latents, sig, gp, gs, gen)

                mode = "eager"
                t0 = time.perf_counter()
                run(short, g_prior_s, g_steps_s)
            else:
                sampler = GraphSampler(compiled if "compile" in variant else forward, guidance_scale=guidance,
                                       uncond=uncond if cfg else None, graphs="graph" in variant,
                                       module=model.transformer,
                                       log=lambda msg: print(f"    [{variant}] {msg}", flush=True))

                def run(sig=sigmas, gp=g_prior, gs=g_steps, sampler=sampler):
                    return sampler.sample(latents, cond, sig, gp, gs, seed)

                t0 = time.perf_counter()
                mode = sampler.prepare(latents, cond, sigmas)  # buffers (+ warm-up steps and capture), no sampling
                if mode == "eager":
                    run(short, g_prior_s, g_steps_s)  # lazy initialisation and compilation outside the timing
            sync(device)
            warm_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats = GpuStats(device)
            stats.begin()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                traj = run()
            sync(device)
            seconds = (time.perf_counter() - t0) / args.repeats
            gpu = stats.end()
        except torch.cuda.OutOfMemoryError as exc:
            print(f"  cfg={'on' if cfg else 'off'} rows={rows} {variant}: out of memory ({exc})", flush=True)
            results.append({**base, "skipped": "out of memory"})
            torch.cuda.empty_cache()
            if emit:
                emit(results)
            continue
        trajectories[variant] = traj
        res = {**base, "mode": mode, "warmup_s": warm_s, "sample_s": seconds, "images_per_s": rows / seconds,
               "tflops": flops_step * T / seconds / 1e12,
               "mfu": flops_step * T / seconds / (peak * 1e12) if peak else None, "peak_tflops": peak,
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None, **gpu}
        results.append(res)
        print(f"  cfg={'on' if cfg else 'off'} rows={rows} {variant} ({mode}): {res['images_per_s']:.3f} images/s, "
              f"{seconds:.2f} s per micro-batch, {res['tflops']:.4g} TFLOP/s"
              + (f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] is not None else ""), flush=True)
        del run
        check(results, trajectories)
        if emit:
            emit(results)
    return results


def check(results: list[dict], trajectories: dict) -> None:
    """Graph (and compiled) trajectories against eager's for the same noise."""
    ref = trajectories.get("eager")
    for res in results:
        traj = trajectories.get(res["variant"])
        if ref is None or traj is None or res["variant"] in ("eager", "published") or "bitwise_equal_eager" in res:
            continue  # nothing to compare, or compared already
        same = all(torch.equal(a, b) for a, b in ((traj.xs, ref.xs), (traj.vs, ref.vs), (traj.x0, ref.x0)))
        res["bitwise_equal_eager"] = same
        res["max_abs_diff_x0"] = float((traj.x0 - ref.x0).abs().max())
        if res["variant"] == "graph" and res.get("mode") == "graph" and not same:
            print(f"  WARNING: graph trajectories differ from eager (rows={res['rows']}, cfg={res['cfg']}, "
                  f"max |Δx0| = {res['max_abs_diff_x0']:.3g})", flush=True)


# --------------------------------------------------------------------------- main


def table(results: list[dict]) -> str:
    ref = {(r["cfg"], r["rows"]): r["images_per_s"] for r in results
           if r["variant"] == "published" and "images_per_s" in r}
    lines = [f"{'cfg':>3} {'rows':>4} {'variant':<13} {'mode':<5} {'img/s':>9} {'×publ':>6} {'MFU':>6} {'=eager':>6}"]
    for r in results:
        if "images_per_s" not in r:
            lines.append(f"{'on' if r['cfg'] else 'off':>3} {r['rows']:>4} {r['variant']:<13} skipped: {r['skipped']}")
            continue
        base = ref.get((r["cfg"], r["rows"]))
        ratio = f"{r['images_per_s'] / base:.2f}" if base else "-"
        eq = {True: "yes", False: "no"}.get(r.get("bitwise_equal_eager"), "-")
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{'on' if r['cfg'] else 'off':>3} {r['rows']:>4} {r['variant']:<13} {r['mode']:<5} "
                     f"{r['images_per_s']:>9.3f} {ratio:>6} {mfu:>6} {eq:>6}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd35-medium")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 512² images)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 26], help="rows (2 per pair)")
    parser.add_argument("--cfg", choices=["off", "on"], nargs="+", default=["off", "on"])
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--churn", type=float, default=0.1, help="churn weight γ ('raw' schedule)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["published", "eager", "graph", "compile"])
    parser.add_argument("--lora", type=int, default=32, help="LoRA rank on the attention projections (0: none)")
    parser.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens for SD3.5")
    parser.add_argument("--repeats", type=int, default=1, help="timed micro-batches per variant")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by GPU name, fdfo.flops.PEAK_BF16_TFLOPS; "
                             "H100 SXM 989.4)")
    parser.add_argument("--out", default="benchmarks/sampling_results.json")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny architecture, 3 steps, rows 2 4")
    args = parser.parse_args(argv)
    if args.tiny:
        args.arch, args.steps, args.text_tokens, args.lora = "tiny", 3, 8, 4
        if args.variants == parser.get_default("variants"):
            args.variants = ["published", "eager", "graph"]  # compile only when asked: minutes per shape
        if args.rows == parser.get_default("rows"):
            args.rows = [2, 4]
    if any(r % 2 for r in args.rows):
        parser.error("--rows must be even (two rows per pair)")
    args.latent = args.latent or ARCHS[args.arch]["sample_size"] // 2

    from diffusers import FlowMatchEulerDiscreteScheduler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(args.steps, device="cpu")
    sigmas = scheduler.sigmas.detach().clone().float()
    model = build_model(args.arch, args.lora, device, dtype)
    forward = velocity_fn(model, model.transformer)
    compiled = None
    if any("compile" in v for v in args.variants) and device.type == "cuda":
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)  # one graph per shape
        compiled = velocity_fn(model, torch.compile(model.transformer, dynamic=False))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.arch} {args.latent}×{args.latent} latents, {args.steps} steps, LoRA r={args.lora}, {dtype}, "
          f"{device_name}", flush=True)
    results = []
    out = {"device": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "torch": torch.__version__, "args": vars(args), "complete": False,
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(partial=()):
        """Rewrite the JSON with what is measured so far (atomically: a run cut short keeps it)."""
        write_text(args.out, json.dumps({**out, "results": results + list(partial)}, indent=1))

    save()
    for cfg in args.cfg:
        for rows in args.rows:
            results += run_config(args, model, forward, compiled, device, dtype, sigmas, rows, cfg == "on", emit=save)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["complete"] = True
    save()
    print(f"\nwrote {args.out}\n")
    print(table(results), flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
