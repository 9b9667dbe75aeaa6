"""Peak memory and training throughput of the FDFO training step under DeepSpeed ZeRO stages.

Random-init weights in the real SD3.5 and FLUX.1 [dev] architectures (``fdfo.models.flavours``;
speed does not depend on the values): LoRA (rank 32 on the family's default targets, as the
trainer adapts them) or full fine-tuning, one micro-batch of training elements per
forward/backward, the FD loss, the optimizer step through the DeepSpeed engine. The
transformer sits in its family's flow model (``fdfo.models.flavours.flow_model``), whose
velocity and LoRA set-up are the trainer's: SD3 on the latent with 1000·σ, FLUX on the
2×2-packed tokens with their position ids, σ and the distilled guidance.

    deepspeed --num_gpus 1 benchmarks/bench_zero.py --arch sd35-medium --stage 0 2 3
    python benchmarks/bench_zero.py --arch sd35-medium --stage 3 --full   # one GPU: a plain process is rank 0
    deepspeed --num_gpus 8 benchmarks/bench_zero.py --arch sd35-large --stage 3 --offload
    python benchmarks/bench_zero.py --arch sd35-medium flux1-dev:3 sd35-large:3 --stage 0 2 3
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 benchmarks/bench_zero.py --arch tiny flux-tiny:3 --stage 0 3 --steps 2

``--arch`` takes several architectures, each run at every ``--stage``, or at its own stages when
written ``NAME:STAGES`` (``flux1-dev:3``, ``sd35-large:2,3``). Prints one line per run and appends
a JSON line per run to --out as it goes (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time

import torch

from fdfo.config import LoraConfig
from fdfo.engine import adamw
from fdfo.models import flavours
from fdfo.models.base import Conditioning, FlowModel

LORA = LoraConfig(rank=32, alpha=64.0)  # the trainer's default adapter, on the family's default targets

SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens (SD3.5)
FLUX_TEXT_TOKENS = 512  # T5 tokens (FluxPipeline's max_sequence_length for FLUX.1 [dev])


def parse_runs(specs: list[str], stages: list[int]) -> list[tuple[str, list[int]]]:
    """``NAME`` or ``NAME:STAGES`` (comma-separated) -> (architecture, its ZeRO stages)."""
    runs = []
    for spec in specs:
        name, sep, own = spec.partition(":")
        if name not in flavours.names():
            raise ValueError(f"unknown architecture '{name}'; known: {', '.join(flavours.names())}")
        try:
            arch_stages = [int(s) for s in own.split(",")] if sep else list(stages)
        except ValueError:
            raise ValueError(f"'{spec}': the stages after ':' are comma-separated integers, e.g. {name}:3") from None
        if not arch_stages or any(s not in (0, 1, 2, 3) for s in arch_stages):
            raise ValueError(f"'{spec}': ZeRO stages are 0, 1, 2 or 3")
        runs.append((name, arch_stages))
    return runs


def build_model(name: str, full: bool, device: torch.device, dtype: torch.dtype) -> FlowModel:
    """The flow model around a random-init transformer of ``name``, trained as the trainer trains it:
    every weight (``full``) or the ``LORA`` adapter."""
    torch.manual_seed(0)
    model = flavours.flow_model(name, device, dtype)
    if full:
        model.enable_full_finetune()
    else:
        model.add_lora(LORA)
    return model


def step_inputs(model: FlowModel, rows: int, latent: int, text_tokens: int, device: torch.device,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """``rows`` random training elements for ``model.velocity``: states [rows, C, latent, latent] (unpacked,
    as the trainer stores them), σ [rows], and prompt embeddings in the model's dtype."""
    cfg = model.transformer.config
    channels = cfg.in_channels // model.PATCH ** 2  # FLUX packs 2×2 latent pixels into a token's channels
    x = torch.randn(rows, channels, latent, latent, generator=g, device=device)
    sigma = torch.rand(rows, generator=g, device=device)
    embeds = torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=g, device=device).to(model.dtype)
    pooled = torch.randn(rows, cfg.pooled_projection_dim, generator=g, device=device).to(model.dtype)
    return x, sigma, Conditioning(embeds, pooled)


def run_stage(args, name: str, stage: int, device: torch.device, rank: int, world: int) -> dict:
    import deepspeed

    from fdfo.loss import fdfo_loss

    family = flavours.family(name).family
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = args.latent or flavours.sample_size(name) // 2  # 512² images = 64×64 latents (VAE factor 8)
    text_tokens = args.text_tokens or (SD3_TEXT_TOKENS if family == "sd3" else FLUX_TEXT_TOKENS)
    offload = bool(args.offload and stage == 3)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(name, args.full, device, dtype)
    params = model.trainable_parameters()
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=100000)
        if args.offload:
            zero.update(offload_param={"device": "cpu", "pin_memory": True},
                        offload_optimizer={"device": "cpu", "pin_memory": True})
    ds = {"train_micro_batch_size_per_gpu": args.rows, "gradient_accumulation_steps": 1,
          "train_batch_size": args.rows * world, "gradient_clipping": 1.0, "zero_optimization": zero,
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if args.full and dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    if offload:
        model.transformer.cpu()  # ZeRO-3 offload keeps the parameters in host memory; DeepSpeed pins them
    if device.type == "cuda":  # the peak from here on: the model as trained, not its fp32 construction
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt = adamw(params, ds, lr=3e-5, weight_decay=1e-4)  # DeepSpeed's CPU AdamW under optimizer offload
    engine, *_ = deepspeed.initialize(model=model.transformer, optimizer=opt, config=ds)
    g = torch.Generator(device).manual_seed(rank)
    x, sigma, cond = step_inputs(model, args.rows, latent, text_tokens, device, g)
    v_ref = torch.randn(x.shape, generator=g, device=device)
    d = 0.05 * torch.randn_like(v_ref)
    dR = 0.1 * torch.randn(args.rows, generator=g, device=device)

    def step():
        v = model.velocity(x, sigma, cond, net=engine)  # through the engine, as Policy.train_velocity
        loss, _ = fdfo_loss(v, v_ref, d, dR, 0.03)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"arch": name, "family": family, "stage": stage, "offload": offload, "full": args.full,
              "world": world, "rows": args.rows, "latent": latent, "step_s": seconds,
              "samples_per_s": args.rows * world / seconds, "peak_gib": peak,
              "steps": args.steps, "warmup": args.warmup, "text_tokens": text_tokens,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if hasattr(engine, "destroy"):  # ZeRO-3's hooks hold the module: release it before the next (larger) model
        engine.destroy()
    del engine, model, opt, x, sigma, cond, v_ref, d, dR
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sd35-medium"], metavar="NAME[:STAGES]",
                        help=f"architectures ({', '.join(flavours.names())}), each at --stage or at its own "
                             "comma-separated stages (flux1-dev:3)")
    parser.add_argument("--stage", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with CPU offload of parameters and optimizer")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--rows", type=int, default=6, help="training elements per micro-batch")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 512² images)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"default: {SD3_TEXT_TOKENS} for SD3.5 (77 CLIP + 256 T5), {FLUX_TEXT_TOKENS} T5 for FLUX.1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/zero_results.jsonl")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    try:
        runs = parse_runs(args.arch, args.stage)
    except ValueError as exc:
        parser.error(str(exc))

    from fdfo import distributed

    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    for name, stages in runs:
        for stage in stages:
            res = run_stage(args, name, stage, device, rank, world)
            if rank == 0:
                peak = f"{res['peak_gib']:.1f} GiB" if res["peak_gib"] is not None else "n/a (CPU)"
                print(f"{res['arch']} stage={stage}{' offload' if res['offload'] else ''} "
                      f"{'full' if args.full else 'LoRA'} world={world}: {res['samples_per_s']:.2f} samples/s, "
                      f"step {res['step_s'] * 1000:.0f} ms, peak {peak}", flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
