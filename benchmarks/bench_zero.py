"""Peak memory and training throughput of the FDFO training step under DeepSpeed ZeRO stages.

Random-init weights in the real SD3.5 architectures (speed does not depend on the
values): LoRA (rank 32 on the attention projections) or full fine-tuning, one
micro-batch of training elements per forward/backward, the FD loss, the
optimizer step through the DeepSpeed engine.

    deepspeed --num_gpus 1 benchmarks/bench_zero.py --arch sd35-medium --stage 0 2 3
    python benchmarks/bench_zero.py --arch sd35-medium --stage 3 --full   # one GPU: a plain process is rank 0
    deepspeed --num_gpus 8 benchmarks/bench_zero.py --arch sd35-large --stage 3 --offload
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 benchmarks/bench_zero.py --arch tiny --stage 0 3 --steps 2

Prints one line per stage and appends a JSON line per stage to --out as it goes (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time

import torch

from fdfo.engine import adamw
from fdfo.models.sd3 import SD3FlowModel
from fdfo.models.flavours import ARCHS


def run_stage(args, stage: int, device: torch.device, rank: int, world: int) -> dict:
    import deepspeed
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from fdfo.loss import fdfo_loss

    arch = ARCHS[args.arch]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent = args.latent or arch["sample_size"] // 2  # 512² images = 64×64 latents for SD3.5
    offload = bool(args.offload and stage == 3)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, where the host takes minutes for 8B parameters
        model = SD3Transformer2DModel(**arch).to(dtype)
    if args.full:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=list(SD3FlowModel.LORA_TARGETS),
                                     init_lora_weights="gaussian"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
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
        model = model.cpu()  # ZeRO-3 offload keeps the parameters in host memory; DeepSpeed pins its partitions
    if device.type == "cuda":  # the peak from here on: the model as trained, not its fp32 construction
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt = adamw(params, ds, lr=3e-5, weight_decay=1e-4)  # DeepSpeed's CPU AdamW under optimizer offload
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    C, L = arch["in_channels"], args.text_tokens
    g = torch.Generator(device).manual_seed(rank)
    x = torch.randn(args.rows, C, latent, latent, generator=g, device=device)
    emb = torch.randn(args.rows, L, arch["joint_attention_dim"], generator=g, device=device).to(dtype)
    pooled = torch.randn(args.rows, arch["pooled_projection_dim"], generator=g, device=device).to(dtype)
    v_ref = torch.randn_like(x)
    d = 0.05 * torch.randn_like(x)
    dR = 0.1 * torch.randn(args.rows, generator=g, device=device)
    sigma = torch.rand(args.rows, generator=g, device=device)

    def step():
        v = engine(hidden_states=x.to(dtype), timestep=sigma.to(dtype) * 1000, encoder_hidden_states=emb,
                   pooled_projections=pooled, return_dict=False)[0].float()
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
    result = {"arch": args.arch, "stage": stage, "offload": offload, "full": args.full,
              "world": world, "rows": args.rows, "latent": latent, "step_s": seconds,
              "samples_per_s": args.rows * world / seconds, "peak_gib": peak,
              "steps": args.steps, "warmup": args.warmup, "text_tokens": args.text_tokens,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    del engine, model, opt
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd35-medium")
    parser.add_argument("--stage", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with CPU offload of parameters and optimizer")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--rows", type=int, default=6, help="training elements per micro-batch")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 512² images)")
    parser.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens for SD3.5")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/zero_results.jsonl")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()

    from fdfo import distributed

    device = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    for stage in args.stage:
        res = run_stage(args, stage, device, rank, world)
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
