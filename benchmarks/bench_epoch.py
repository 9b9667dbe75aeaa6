"""End-to-end pairs/s of one full FDFO epoch: the fast path against the published formulation.

One epoch of ``fdfo.trainer.Trainer`` (``train_epoch``): text encoding, paired sampling
(40 steps with churn), VAE decode, PickScore-sized reward, pair differences, the global
shuffle and 4 optimizer steps. Its record's ``pairs_per_s`` (pairs / epoch seconds) and its
split ``sample_s`` (encode + sample + decode + reward) / ``train_s`` (optimizer steps) are
reported for two variants, each a fresh Trainer in this process, same config and seed:

    fast        the defaults: train.kernels auto (Triton kernels on CUDA), sampling.cuda_graphs
                true (fdfo.graphs.GraphSampler captures one sampling step and replays it)
    published   train.kernels torch, sampling.cuda_graphs false, and the Trainer's sampler
                swapped for fdfo.sampling.sample_pairs (PyTorch churn step, noise from
                torch.randn) with a velocity wrapper that reads σ back to the host (.item())
                before every forward: the published loop's per-step host synchronisation

What is and isn't emulated in "published": emulated are the PyTorch (unfused) loss,
churn step and pair delta, eager sampling without graphs, noise from torch.randn and one
host synchronisation per sampling step (per CFG forward pair). Not emulated: the published
code's trajectory lists + torch.stack (here preallocated buffers), its own training loop,
data loading and reward code (the Trainer's are used for both variants), and anything else
that differs outside sampling kernels/graphs. The ratio is therefore what the kernels,
graphs and sync-free step loop buy inside this trainer, not a comparison with the
published repository itself.

Models (random init, written with save_pretrained to a temp dir, loaded through the
Trainer's own from_pretrained path; speed does not depend on weight values):

* SD3 pipeline: the real SD3.5 Medium transformer (fdfo.models.flavours.ARCHS["sd35-medium"]) and
  the real SD3.5 VAE architecture (AutoencoderKL, 16 latent channels, blocks 128-256-512-512,
  2 layers per block, scaling 1.5305, shift 0.0609), 512² images (64×64 latents). The text
  encoders are SMALL (two 2-layer CLIP towers of width 1024 whose pooled outputs give the
  transformer's 2048, and a 2-layer T5 of width 4096; 77 + 128 text tokens as in training),
  so text encoding, which runs once per epoch batch before sampling, costs less here than
  with CLIP-L, CLIP-G and T5-XXL; the transformer sees the real shapes.
* Reward: ``pickscore`` as a transformers CLIPModel with the CLIP-H/14 config (vision 32
  layers, width 1280, patch 14, 224²; text 24 layers, width 1024; projection 1024) with the
  offline CLIP tokenizer and a CLIP image processor beside it (the PickScore loader's layout).

Each variant's timed epoch is its FIRST epoch (one-off costs included: Triton JIT and graph
capture on the fast path); ``--warmup-epochs N`` runs N epochs first and times the next one
(the warm-up epochs' own figures are kept in the JSON under ``warmup``, so one run gives the
cold and the steady-state epoch).

    python benchmarks/bench_epoch.py                       # GPU: 24 pairs, 40 steps, CFG off
    python benchmarks/bench_epoch.py --guidance 4.5        # CFG on
    python benchmarks/bench_epoch.py --warmup-epochs 1     # steady-state epoch
    python benchmarks/bench_epoch.py --pairs 6 --warmup-epochs 1   # two sampling micro-batches (run_gpu.sh)
    python benchmarks/bench_epoch.py --tiny                # CPU smoke run, tiny models (seconds)

Prints one line per variant, a short table last, and writes JSON to --out, rewritten after
each variant (``"complete": false`` until the last), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fdfo.atomic import write_text
from fdfo.models.flavours import ARCHS

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train": {"kernels": "auto"}, "sampling": {"cuda_graphs": True}}
VARIANTS = {
    "fast": FAST,
    "published": {"train": {"kernels": "torch"}, "sampling": {"cuda_graphs": False}},
    # The levers for large models, each on top of the fast path (--variants; run_gpu.sh's "levers" part):
    # trajectories in pinned host memory, and each of PyTorch's SDPA kernels forced.
    "host": {**FAST, "train": {**FAST["train"], "trajectory_device": "host"}},
    **{f"sdpa_{k}": {**FAST, "model": {"attention_backend": f"_native_{k}"}}
       for k in ("flash", "cudnn", "efficient", "math")},
}
DEFAULT_VARIANTS = ("fast", "published")

SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=16, norm_num_groups=32, act_fn="silu", sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
CLIP_H14_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, hidden_act="gelu")
CLIP_H14_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu")


# --------------------------------------------------------------------------- models


def build_sd35_pipeline(out: Path, device: torch.device) -> Path:
    """SD3.5 Medium transformer + SD3.5 VAE at random init, small text encoders; save_pretrained to out."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from fdfo.models.tiny import build_tiny_sd3_pipeline

    arch = ARCHS["sd35-medium"]
    # Small text towers with the real output widths: CLIP-L/G pooled 2×1024 = 2048, T5 width 4096.
    pipe = build_tiny_sd3_pipeline(clip_hidden=arch["pooled_projection_dim"] // 2, t5_dim=arch["joint_attention_dim"],
                                   max_text_tokens=77, in_channels=16, seed=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes for 2.5B parameters
        pipe.transformer = SD3Transformer2DModel(**arch).to(dtype)
        pipe.vae = AutoencoderKL(**SD35_VAE).to(dtype)
    pipe.register_modules(transformer=pipe.transformer, vae=pipe.vae)
    pipe.save_pretrained(out)
    del pipe
    return out


def build_tiny_pipeline(out: Path) -> Path:
    from fdfo.models.tiny import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline(sample_size=8, in_channels=4, max_text_tokens=16, seed=0).save_pretrained(out)
    return out


def build_pickscore_h14(out: Path, device: torch.device) -> Path:
    """A CLIPModel with the CLIP-H/14 config at random init, tokenizer + image processor beside it."""
    from transformers import CLIPConfig, CLIPModel

    from fdfo.models.tiny import CLIP_VOCAB_SIZE, clip_tokenizer
    from fdfo.rewards.tiny import _clip_image_processor

    text = dict(CLIP_H14_TEXT, vocab_size=CLIP_VOCAB_SIZE, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=1024)
    vision = dict(CLIP_H14_VISION, projection_dim=1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024))
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    _clip_image_processor(224).save_pretrained(out)
    del model
    return out


def build_tiny_pickscore(out: Path) -> Path:
    from fdfo.rewards.tiny import build_tiny_clip

    return build_tiny_clip(out)


# --------------------------------------------------------------------------- one variant


def make_config(args, variant: str, pipeline_dir: Path, reward_dir: Path, out_dir: Path):
    from fdfo.settings import build_config

    overrides = {
        "name": f"bench-epoch-{variant}",
        "model": {"path": str(pipeline_dir)},
        "sampling": {"steps": args.steps, "guidance_scale": args.guidance, "micro_batch_pairs": args.micro_pairs},
        "train": {"epochs": 1 + args.warmup_epochs, "micro_batch_rows": args.micro_rows},
        "fdfo": {"pairs_per_epoch": args.pairs, "optimizer_steps_per_epoch": args.optimizer_steps},
        "data": {"prompts": str(ROOT / "prompts" / "examples.txt")},
        "reward": {"weights": {"pickscore": 1.0}, "paths": {"pickscore": str(reward_dir)}},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"out_dir": str(out_dir), "plot_every": 0, "progress": False},
    }
    if args.tiny:
        overrides["model"].update(resolution=16, max_sequence_length=16)
        overrides["lora"] = {"rank": 4, "alpha": 8.0}
    else:
        overrides["model"].update(resolution=512, max_sequence_length=128)
    return build_config(overrides, VARIANTS[variant])


def emulate_published_sampler(trainer) -> None:
    """Sample with fdfo.sampling.sample_pairs (torch.randn noise, PyTorch churn step) and read σ back to
    the host before every forward, as the published step loop does with ``sigmas[k].item()``."""
    trainer.algorithm.graph_sampler = None
    policy = trainer.policy
    inner = policy.velocity_fn

    def velocity_fn(cond):
        v = inner(cond)

        def synced(x, t):
            float(t.reshape(-1)[0].item())  # host synchronisation, every step
            return v(x, t)

        return synced

    policy.velocity_fn = velocity_fn


def model_flop_utilisation(args, trainer, rec: dict) -> dict:
    """Transformer TFLOP/s and MFU of the epoch's sampling phase and training phase.

    Every one of the epoch's 2·P·T (row, step) elements is evaluated once while sampling and trained
    once, so each phase's FLOPs are 2·P·T times the per-row FLOPs that torch's counter gives for one
    velocity (forward; forward + backward for training). The sampling phase's time also holds text
    encoding, VAE decode and the reward, which are not counted: its MFU is a lower bound on the
    sampler's own.
    """
    from fdfo.flops import peak_bf16_tflops, velocity_flops

    cfg, model = trainer.cfg, trainer.model
    rows = cfg.train.micro_batch_rows
    elements = trainer.layout.elements_per_rank  # this rank's 2·P·T: the times are this rank's too
    out = {}
    for phase, train, seconds in (("sample", False, rec.get("sample_s")), ("train", True, rec.get("train_s"))):
        per_row = velocity_flops(model, rows, trainer.policy.guidance, trainer.policy.uncond, train=train) / rows
        out[f"{phase}_flops_per_row"] = per_row
        out[f"{phase}_tflops"] = per_row * elements / seconds / 1e12 if seconds else None
    peak = args.peak_tflops or peak_bf16_tflops(trainer.device)
    out["peak_tflops"] = peak
    for phase in ("sample", "train"):
        tf = out[f"{phase}_tflops"]
        out[f"{phase}_mfu"] = tf / peak if (tf is not None and peak) else None
    return out


def run_variant(args, variant: str, pipeline_dir: Path, reward_dir: Path, work: Path) -> dict:
    from fdfo.trainer import Trainer

    cfg = make_config(args, variant, pipeline_dir, reward_dir, work / variant)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    if variant == "published":
        emulate_published_sampler(trainer)
    device = trainer.device
    warmup = []
    for epoch in range(args.warmup_epochs):  # untimed for the headline figure, but recorded: the cold epoch
        w = trainer.train_epoch(epoch)
        warmup.append({k: w.get(k) for k in ("pairs_per_s", "sample_s", "train_s", "epoch_s")})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rec = trainer.train_epoch(args.warmup_epochs)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    util = model_flop_utilisation(args, trainer, rec)
    sampler = "sample_pairs+sync" if variant == "published" else (
        trainer.algorithm.graph_sampler.mode if trainer.algorithm.graph_sampler is not None else "sample_pairs")
    result = {
        "variant": variant, "kernels": cfg.train.kernels, "cuda_graphs": cfg.sampling.cuda_graphs,
        "sampler": sampler, "kernel_backend": trainer.policy.kernels,
        "trajectory_device": cfg.train.trajectory_device, "attention_backend": cfg.model.attention_backend,
        "trajectory_mib": rec.get("trajectory_mib"), "trajectory_device_mib": rec.get("trajectory_device_mib"),
        "pairs": cfg.fdfo.pairs_per_epoch, "steps": cfg.sampling.steps, "guidance": cfg.sampling.guidance_scale,
        "micro_batch_pairs": cfg.sampling.micro_batch_pairs, "micro_batch_rows": cfg.train.micro_batch_rows,
        "warmup_epochs": args.warmup_epochs, "warmup": warmup, "setup_s": setup_s,
        "pairs_per_s": rec.get("pairs_per_s"), "sample_s": rec.get("sample_s"), "train_s": rec.get("train_s"),
        "epoch_s": rec.get("epoch_s"), "skipped": rec.get("skipped"), "reward_mean": rec.get("reward_mean"),
        "peak_gib": peak, **util,
    }
    mfu = "".join(f"  MFU {k[:-4]} {100 * util[k]:.1f}%" for k in ("sample_mfu", "train_mfu") if util[k] is not None)
    if result["pairs_per_s"] is None:
        print(f"{variant:>9}: epoch skipped (non-finite rewards): no throughput", flush=True)
    else:
        print(f"{variant:>9}: {result['pairs_per_s']:.4g} pairs/s  epoch {result['epoch_s']:.3g}s "
              f"(sample {result['sample_s']:.3g}s, train {result['train_s']:.3g}s)  sampler={sampler} "
              f"kernels={cfg.train.kernels}" + (f"  peak {peak:.1f} GiB" if peak is not None else "") + mfu,
              flush=True)
    trainer.report.close()
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per epoch (default 24; --tiny 4)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 40; --tiny 4)")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG weight (1.0 = off; 4.5 for CFG)")
    parser.add_argument("--micro-pairs", type=int, default=None, help="sampling.micro_batch_pairs (default 3; --tiny 2)")
    parser.add_argument("--micro-rows", type=int, default=None, help="train.micro_batch_rows (default 6; --tiny 4)")
    parser.add_argument("--optimizer-steps", type=int, default=4, help="fdfo.optimizer_steps_per_epoch")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="untimed epochs before the timed one")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="fast and published by default; host and sdpa_* are the large-model levers (a lever "
                             "this GPU cannot run is recorded with its error, and the others still run)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by GPU name, fdfo.flops.PEAK_BF16_TFLOPS)")
    parser.add_argument("--out", default="benchmarks/epoch_results.json", help="JSON output")
    args = parser.parse_args(argv)
    tiny_defaults = dict(pairs=4, steps=4, micro_pairs=2, micro_rows=4)
    full_defaults = dict(pairs=24, steps=40, micro_pairs=3, micro_rows=6)
    for key, value in (tiny_defaults if args.tiny else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
                          else "cpu")
    if not args.tiny and device.type != "cuda":
        print("warning: full-size models on CPU take a very long time; use --tiny for a smoke run", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.tiny:
            pipeline_dir = build_tiny_pipeline(work / "sd3")
            reward_dir = build_tiny_pickscore(work / "pickscore")
            models = "tiny SD3 pipeline (fdfo.models.tiny) + tiny CLIP as pickscore (fdfo.rewards.tiny)"
        else:
            pipeline_dir = build_sd35_pipeline(work / "sd3", device)
            reward_dir = build_pickscore_h14(work / "pickscore", device)
            models = ("SD3.5 Medium transformer + SD3.5 VAE (512²), small text encoders; "
                      "pickscore = CLIP-H/14-sized CLIPModel; all random init")
        build_s = time.perf_counter() - t0
        print(f"models: {models} (built and saved in {build_s:.1f}s)", flush=True)
        print("text encoders are small: text encoding runs once per epoch batch, before sampling; "
              "its real cost (CLIP-L, CLIP-G, T5-XXL) is not in these numbers", flush=True)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results = []
        report = {
            "benchmark": "bench_epoch", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": gpu, "torch": torch.__version__, "tiny": args.tiny, "models": models,
            "text_encoders": "small (not the real CLIP-L/CLIP-G/T5-XXL)", "build_s": build_s,
            "pairs": args.pairs, "steps": args.steps, "guidance": args.guidance,
            "variants": results, "speedup_fast_over_published": None, "complete": False,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for v in args.variants:
            try:
                results.append(run_variant(args, v, pipeline_dir, reward_dir, work))
            except Exception as exc:  # e.g. an SDPA kernel this GPU or dtype does not support
                if v in DEFAULT_VARIANTS:
                    raise
                results.append({"variant": v, "error": f"{type(exc).__name__}: {exc}"[:400], "pairs_per_s": None})
                print(f"{v:>9}: failed: {results[-1]['error']}", flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            by = {r["variant"]: r for r in results}
            if "fast" in by and "published" in by and by["published"]["pairs_per_s"] and by["fast"]["pairs_per_s"]:
                report["speedup_fast_over_published"] = by["fast"]["pairs_per_s"] / by["published"]["pairs_per_s"]
            report["complete"] = len(results) == len(args.variants)
            write_text(out, json.dumps(report, indent=2))  # after each variant: a run cut short keeps it
    ratio = report["speedup_fast_over_published"]

    print(f"\none epoch, {args.pairs} pairs, {args.steps} steps, guidance {args.guidance}, {gpu}")
    print(f"{'variant':>9} | {'pairs/s':>9} | {'sample_s':>9} | {'train_s':>9} | {'epoch_s':>9} | "
          f"{'sample TF/s':>11} | {'train TF/s':>10} | {'MFU s/t':>11}")
    for r in results:
        if r.get("error"):
            print(f"{r['variant']:>9} | failed: {r['error']}")
            continue
        if r.get("skipped") or r["pairs_per_s"] is None:
            print(f"{r['variant']:>9} | epoch skipped (non-finite rewards)")
            continue
        mfu = "-" if r["sample_mfu"] is None else f"{100 * r['sample_mfu']:.1f}/{100 * r['train_mfu']:.1f}%"
        print(f"{r['variant']:>9} | {r['pairs_per_s']:>9.4g} | {r['sample_s']:>9.4g} | {r['train_s']:>9.4g} | "
              f"{r['epoch_s']:>9.4g} | {r['sample_tflops']:>11.4g} | {r['train_tflops']:>10.4g} | {mfu:>11}")
    if ratio is not None:
        print(f"fast / published: {ratio:.3g}x pairs/s")
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()
