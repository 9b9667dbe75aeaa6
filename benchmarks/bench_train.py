"""The transformer's two phases on one micro-batch: paired sampling and one training step, eager and compiled.

Written for the first minutes on a GPU (``benchmarks/run_gpu.sh OUT quick``): random-init weights
in the real SD3.5 Medium transformer inside its flow model (``fdfo.models.flavours.flow_model``;
speed does not depend on the values), LoRA on the family's attention projections as the trainer
adds it (``lora.dtype`` as --lora-dtype), 512² images (64×64 latents), 205 text tokens (77 CLIP +
128 T5, the trainer's default T5 length), CFG off.

    --phase sample   one micro-batch of paired sampling (--rows rows, --steps steps with churn) through
                     benchmarks/bench_sampling.py's run_config: ``eager`` (fdfo.graphs.GraphSampler run
                     eagerly), ``graph`` (the step captured as a CUDA graph and replayed) and
                     ``graph+compile`` (the same with the transformer under torch.compile), for each
                     --lora rank (0: no adapter; each rank its own model, built once). Every eager and
                     graph figure is taken first, then the compiled ones, so a run cut short loses the
                     compiled figures first. Records say whether capture worked (mode), the warm-up
                     (buffers, capture, compilation), images/s, TFLOP/s and MFU.
    --phase train    one training micro-batch: the velocity of --rows training elements, the FD loss
                     (fdfo.loss.fdfo_loss) and its backward into the LoRA weights (no optimizer step),
                     eager then compiled, at each --rows: seconds per micro-batch, rows/s, TFLOP/s, MFU
                     and peak memory; the micro-batch effect is rows/s at the largest --rows over the
                     smallest. A size that runs out of memory is recorded as such, and half of it is
                     tried next (e.g. 12 when 24 does not fit).

torch.compile (--compile): ``regional`` (default) compiles each transformer block on its own
(torch.compile of every block, the rest eager; PyTorch's regional compilation: identical blocks
share one compilation, to keep the compile time within run_gpu.sh's short parts), ``full`` the
whole transformer (bench_sampling.py's way, and what ``model.compile`` does in the trainer). The compiled module is a copy that shares the weights; the eager module stays as it was.
torch.compile is not timed on CPU (minutes to build), nor CUDA graphs without CUDA: those records
say so under ``skipped``; a measurement that fails otherwise is recorded under ``error``, the
others still run, and the exit status is 1.

FLOPs: torch.utils.flop_counter on one eager call of the same shapes (fdfo.flops.count_flops): the
forward for sampling, forward and backward for training (the backward reaches the LoRA weights and
the activations, not the frozen weights). MFU = FLOPs / time / the device's dense bf16 peak
(fdfo.flops.peak_bf16_tflops: 989.4 TFLOP/s for an H100 SXM or H200; --peak-tflops overrides);
none where the peak is unknown (a CPU).

    python benchmarks/bench_train.py --phase sample --rows 6 --steps 10 --lora 32 0
    python benchmarks/bench_train.py --phase train --rows 6 24
    python benchmarks/bench_train.py --phase train --tiny        # CPU smoke run (seconds)

Writes JSON to --out, rewritten after every measurement (``"complete": false`` until the last), so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fdfo.atomic import write_text  # noqa: E402
from fdfo.config import LoraConfig  # noqa: E402
from fdfo.flops import count_flops, peak_bf16_tflops  # noqa: E402
from fdfo.models import flavours  # noqa: E402
from fdfo.models.base import Conditioning  # noqa: E402

SAMPLE_VARIANTS = ("eager", "graph", "graph+compile")
TRAIN_VARIANTS = ("eager", "compile")
NOT_ON_CPU = "torch.compile is not timed on CPU (minutes to build)"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # SD3's joint blocks; FLUX's two kinds


def compile_transformer(transformer: nn.Module, mode: str, **options) -> nn.Module:
    """The transformer under torch.compile, sharing its weights: ``full`` compiles the whole module,
    ``regional`` each of its repeated blocks (a shallow copy of the transformer whose block lists hold the
    compiled blocks; the original keeps its eager blocks). ``options`` go to torch.compile (e.g. backend)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # (one graph per shape and block kind; torch renamed it)
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    if mode == "full":
        return torch.compile(transformer, dynamic=False, **options)
    twin = copy.copy(transformer)
    twin._modules = dict(transformer._modules)  # (its own module table: the original's stays untouched)
    found = False
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            setattr(twin, name, nn.ModuleList(torch.compile(b, dynamic=False, **options) for b in blocks))
            found = True
    if not found:
        raise ValueError(f"{type(transformer).__name__} has none of {BLOCK_LISTS}: use --compile full")
    return twin


def build_model(arch: str, rank: int, lora_dtype: str, device: torch.device, dtype: torch.dtype):
    """The flow model around a random-init transformer of ``arch`` with the trainer's LoRA (rank ``rank``,
    alpha 2·rank, the family's targets, ``lora.dtype`` = lora_dtype; 0: no adapter)."""
    torch.manual_seed(0)
    model = flavours.flow_model(arch, device, dtype)
    if rank:
        model.add_lora(LoraConfig(rank=rank, alpha=2.0 * rank, dtype=lora_dtype))
    return model


def lora_dtype_of(model) -> str | None:
    """The dtype the adapter weights are held in (None without an adapter)."""
    ps = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    return str(ps[0].dtype).replace("torch.", "") if ps else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- sampling


def run_sample(args, device, dtype, save) -> list[dict]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from benchmarks.bench_sampling import run_config, velocity_fn

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(args.steps, device="cpu")
    sigmas = scheduler.sigmas.detach().clone().float()
    models = {rank: build_model(args.arch, rank, args.lora_dtype, device, dtype) for rank in args.lora}
    save.meta["lora_dtype"] = next((lora_dtype_of(m) for m in models.values() if lora_dtype_of(m)), None)
    results: list[dict] = []
    plain = [v for v in args.variants if "compile" not in v]
    compiled = [v for v in args.variants if "compile" in v]
    for variants in (plain, compiled):  # every eager and graph figure first: compilation takes the longest
        for rank, model in models.items():
            if not variants:
                continue
            ns = SimpleNamespace(arch=args.arch, latent=args.latent, text_tokens=args.text_tokens, guidance=1.0,
                                 churn=args.churn, variants=variants, lora=rank, peak_tflops=args.peak_tflops,
                                 repeats=args.repeats)
            forward = velocity_fn(model, model.transformer)
            fast = None
            if variants is compiled and device.type == "cuda":
                fast = velocity_fn(model, compile_transformer(model.transformer, args.compile))
            done, got = list(results), []

            def emit(res, done=done, got=got):
                got[:] = res
                save(done + list(res))

            try:
                run_config(ns, model, forward, fast, device, dtype, sigmas, args.rows, False, emit=emit)
            except Exception as exc:  # (a capture or compiler failure: recorded, the other models still run)
                print(f"  LoRA {rank} {variants}: failed: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                measured = {r["variant"] for r in got}
                got += [dict(arch=args.arch, rows=args.rows, cfg=False, variant=v, lora=rank,
                             error=f"{type(exc).__name__}: {exc}"[:400]) for v in variants if v not in measured]
            results += got
            save(results)
            free(device)
    return results


# --------------------------------------------------------------------------- training


def train_inputs(model, rows: int, latent: int, text_tokens: int, device: torch.device, seed: int = 0):
    """``rows`` training elements: states, σ, prompt embeddings, and the FD loss's sampled tensors."""
    cfg = model.transformer.config
    channels = cfg.in_channels // model.PATCH ** 2  # FLUX packs 2×2 latent pixels into a token's channels
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(rows, channels, latent, latent, generator=g, device=device)
    sigma = torch.rand(rows, generator=g, device=device)
    cond = Conditioning(torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=g, device=device).to(model.dtype),
                        torch.randn(rows, cfg.pooled_projection_dim, generator=g, device=device).to(model.dtype))
    v_ref = torch.randn(x.shape, generator=g, device=device)
    d = 0.05 * torch.randn(x.shape, generator=g, device=device)
    dR = 0.1 * torch.randn(rows, generator=g, device=device)
    return x, sigma, cond, v_ref, d, dR


def run_train(args, device, dtype, save) -> list[dict]:
    from fdfo.loss import fdfo_loss

    model = build_model(args.arch, args.lora, args.lora_dtype, device, dtype)
    save.meta["lora_dtype"] = lora_dtype_of(model)
    params = model.trainable_parameters()
    peak = args.peak_tflops or peak_bf16_tflops(device)
    nets = {"eager": model.transformer}
    flops: dict[int, int] = {}
    results: list[dict] = []
    for variant in args.variants:
        sizes = list(args.rows)
        while sizes:
            rows = sizes.pop(0)
            base = dict(variant=variant, rows=rows, arch=args.arch, lora=args.lora, compile=None)
            if variant == "compile":
                base["compile"] = args.compile
                if device.type != "cuda":
                    results.append({**base, "skipped": NOT_ON_CPU})
                    save(results)
                    continue
                if variant not in nets:
                    nets[variant] = compile_transformer(model.transformer, args.compile)
            net = nets[variant]
            try:
                x, sigma, cond, v_ref, d, dR = train_inputs(model, rows, args.latent, args.text_tokens, device)

                def step(net=net):
                    for p in params:
                        p.grad = None
                    v = model.velocity(x, sigma, cond, net=net)
                    loss, _ = fdfo_loss(v, v_ref, d, dR, 0.03)
                    loss.backward()

                if rows not in flops:
                    flops[rows] = count_flops(lambda: step(nets["eager"]))
                t0 = time.perf_counter()
                for _ in range(args.warmup + (1 if variant == "compile" else 0)):  # (compilation: the first call)
                    step()
                sync(device)
                warm_s = time.perf_counter() - t0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step()
                sync(device)
                seconds = (time.perf_counter() - t0) / args.iters
            except Exception as exc:  # out of memory, or a compiler failure: recorded, the next size still runs
                oom = isinstance(exc, torch.OutOfMemoryError)
                print(f"  {variant} rows={rows}: {'out of memory' if oom else 'failed'} ({str(exc)[:300]})", flush=True)
                if not oom:
                    traceback.print_exc()
                results.append({**base, **({"skipped": "out of memory"} if oom else
                                           {"error": f"{type(exc).__name__}: {exc}"[:400]})})
                half = rows // 2
                if oom and half > max([r["rows"] for r in results if "step_s" in r and r["variant"] == variant],
                                      default=0) and half not in sizes and half not in args.rows:
                    sizes.insert(0, half)  # the micro-batch effect at the largest size that may fit
                for p in params:
                    p.grad = None
                x = sigma = cond = v_ref = d = dR = step = None
                free(device)
                save(results)
                continue
            res = {**base, "step_s": seconds, "rows_per_s": rows / seconds, "warmup_s": warm_s,
                   "flops_per_step": flops[rows], "tflops": flops[rows] / seconds / 1e12,
                   "mfu": flops[rows] / seconds / (peak * 1e12) if peak else None, "peak_tflops": peak,
                   "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            results.append(res)
            print(f"  {variant} rows={rows}: {1000 * seconds:.1f} ms per micro-batch, {res['rows_per_s']:.2f} rows/s, "
                  f"{res['tflops']:.4g} TFLOP/s" + (f", MFU {100 * res['mfu']:.1f}%" if res["mfu"] else "")
                  + f" (warm-up {warm_s:.1f}s)", flush=True)
            save(results)
            x = sigma = cond = v_ref = d = dR = step = None
            for p in params:
                p.grad = None
            free(device)
    return results


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["sample", "train"], required=True)
    parser.add_argument("--arch", choices=flavours.names(), default="sd35-medium")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 512² images)")
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="rows per micro-batch (sample: one even count, default 6; train: default 6 24)")
    parser.add_argument("--steps", type=int, default=10, help="sample: sampling steps of the timed micro-batch")
    parser.add_argument("--churn", type=float, default=0.1, help="sample: churn weight γ ('raw' schedule)")
    parser.add_argument("--repeats", type=int, default=1, help="sample: timed micro-batches per variant")
    parser.add_argument("--iters", type=int, default=3, help="train: timed micro-batches per variant and size")
    parser.add_argument("--warmup", type=int, default=1, help="train: untimed micro-batches first (compile: one more)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"sample: of {', '.join(SAMPLE_VARIANTS)}; train: of {', '.join(TRAIN_VARIANTS)} "
                             "(default: all)")
    parser.add_argument("--lora", type=int, nargs="+", default=None,
                        help="LoRA rank(s): sample: each rank, 0 = no adapter (default 32 0); train: one (default 32)")
    parser.add_argument("--lora-dtype", default="auto", choices=["auto", "float32"],
                        help="lora.dtype of the adapter (auto: the model's dtype, bf16 on the GPU)")
    parser.add_argument("--text-tokens", type=int, default=205, help="77 CLIP + 128 T5 tokens")
    parser.add_argument("--compile", choices=["regional", "full"], default="regional",
                        help="torch.compile each transformer block (regional) or the whole transformer (full)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by GPU name, fdfo.flops.PEAK_BF16_TFLOPS)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny architecture, 8 text tokens")
    parser.add_argument("--out", default="benchmarks/train_results.json")
    args = parser.parse_args(argv)
    sample = args.phase == "sample"
    known = SAMPLE_VARIANTS if sample else TRAIN_VARIANTS
    args.variants = args.variants or list(known)
    if bad := [v for v in args.variants if v not in known]:
        parser.error(f"--phase {args.phase}: unknown variant(s) {bad}; known: {', '.join(known)}")
    if args.tiny:
        args.arch, args.text_tokens = "tiny", 8
        args.lora = args.lora or ([4, 0] if sample else [4])
        args.rows = args.rows or ([2] if sample else [2, 4])
        args.steps = min(args.steps, 3)
    args.lora = args.lora if args.lora is not None else ([32, 0] if sample else [32])
    args.rows = args.rows or ([6] if sample else [6, 24])
    if sample:
        if len(args.rows) != 1 or args.rows[0] % 2:
            parser.error("--phase sample: one even --rows (two rows per pair)")
        args.rows = args.rows[0]
    elif len(args.lora) != 1:
        parser.error("--phase train: one --lora rank")
    else:
        args.lora = args.lora[0]
    args.latent = args.latent or flavours.sample_size(args.arch) // 2

    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
                          else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"benchmark": "bench_train", "phase": args.phase, "device": name, "dtype": str(dtype).replace("torch.", ""),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "torch": torch.__version__, "args": vars(args), "lora_dtype": None, "complete": False, "results": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(results):
        """Rewrite the JSON with what is measured so far (atomically: a run cut short keeps it)."""
        out.update(save.meta, results=list(results))
        write_text(args.out, json.dumps(out, indent=1))

    save.meta = {}
    save([])
    print(f"{args.phase}: {args.arch}, {args.latent}×{args.latent} latents, rows {args.rows}, LoRA {args.lora}, "
          f"{args.text_tokens} text tokens, {dtype}, {name}", flush=True)
    t0 = time.perf_counter()
    results = (run_sample if sample else run_train)(args, device, dtype, save)
    out["complete"] = True
    out["seconds"] = time.perf_counter() - t0
    save(results)
    print(f"wrote {args.out}", flush=True)
    return out


def exit_on_term(signum, frame):
    """SIGTERM (run_gpu.sh's time limit) as an exception: ``finally`` blocks run (build locks released), the JSON
    holds what was measured."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_term)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a failed measurement is recorded and the others still run; the exit status says whether any failed
    sys.exit(1 if any(r.get("error") for r in main()["results"]) else 0)
