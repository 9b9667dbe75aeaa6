"""End-to-end pairs/s of one full FDFO epoch: the fast path, the published formulation, and each MFU lever.

One epoch of ``fdfo.trainer.Trainer`` (``train_epoch``): text encoding, paired sampling
(40 steps with churn), VAE decode, PickScore-sized reward, pair differences, the global
shuffle and 4 optimizer steps. Its record's ``pairs_per_s`` (pairs / epoch seconds) and its
split ``sample_s`` (encode + sample + decode + reward) / ``train_s`` (optimizer steps) are
reported per variant, each a fresh Trainer in this process, same config and seed:

    fast        the defaults: train.kernels auto (Triton kernels on CUDA), sampling.cuda_graphs
                true (fdfo.graphs.GraphSampler captures one sampling step and replays it), and
                every MFU lever at its default (model.compile, lora.dtype, the micro-batches and
                train.offload_text_encoders "auto", reward.overlap true)
    published   train.kernels torch, sampling.cuda_graphs false, no MFU lever (as baseline), and
                the Trainer's sampler swapped for fdfo.sampling.sample_pairs (PyTorch churn step,
                noise from torch.randn) with a velocity wrapper that reads σ back to the host
                (.item()) before every forward: the published loop's per-step host synchronisation

The MFU levers (docs/performance.md), each measured against ``baseline`` in the same run
(``vs_baseline``: pairs/s over baseline's, and baseline's phase times over the variant's):

    baseline    today's path: the fast path with every lever off: model.compile false, lora.dtype
                float32, train.micro_batch_rows 6, sampling.micro_batch_pairs 3, reward.overlap
                false, train.offload_text_encoders true
    compile     baseline + model.compile true (one compiled transformer for both phases)
    lora_bf16   baseline + lora.dtype auto (bf16 adapter weights on the bf16 model)
    rows_12     baseline + train.micro_batch_rows 12 (the epoch's layout must divide: an optimizer
    rows_24     step's 2·pairs·steps / optimizer_steps elements, e.g. 6 pairs × 8 steps / 2 = 48)
    overlap     baseline + reward.overlap true (decode and score beside sampling)

The large-model levers, each on the fast path: ``host`` (train.trajectory_device host) and
``sdpa_{flash,cudnn,efficient,math}`` (model.attention_backend). A variant that fails is
recorded with its error and the others still run; the exit status is 1 if any failed.

MFU: the transformer FLOPs of each phase (torch's FLOP counter on a meta-device twin of the
trainer's transformer with its adapter, guidance and shapes: ``flops_per_row``) over the phase's
time and the device's dense bf16 peak (fdfo.flops; 989.4 TFLOP/s for an H100 SXM or H200), on CUDA
only. On a CPU, ``model.compile``
runs with torch.compile's ``aot_eager`` backend (--compile-backend): the plumbing, no speed claim.

What is and isn't emulated in "published": emulated are the PyTorch (unfused) loss,
churn step and pair delta, eager sampling without graphs, noise from torch.randn and one
host synchronisation per sampling step (per CFG forward pair). Not emulated: the published
code's trajectory lists + torch.stack (here preallocated buffers), its own training loop,
data loading and reward code (the Trainer's are used for both variants), and anything else
that differs outside sampling kernels/graphs. The ratio is therefore what the kernels,
graphs, sync-free step loop and the levers buy inside this trainer, not a comparison with
the published repository itself.

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
    python benchmarks/bench_epoch.py --pairs 6 --steps 10 --warmup-epochs 1   # run_gpu.sh quick
    python benchmarks/bench_epoch.py --pairs 6 --steps 8 --optimizer-steps 2 --warmup-epochs 1 \
        --variants baseline overlap lora_bf16 rows_12 rows_24 compile fast           # run_gpu.sh levers
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
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fdfo.atomic import write_text
from fdfo.models.flavours import ARCHS

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train": {"kernels": "auto"}, "sampling": {"cuda_graphs": True}}  # every other setting at its default
TODAY_ROWS, TODAY_PAIRS = 6, 3  # the published micro-batches: 6 training rows, 3 pairs (6 rows) per sampling forward
# Today's path: the fast path with every MFU lever off (the trainer before model.compile, lora.dtype, the
# "auto" micro-batches, reward.overlap and train.offload_text_encoders "auto"), each lever's reference.
BASELINE = {"model": {"compile": False}, "lora": {"dtype": "float32"},
            "train": {"kernels": "auto", "micro_batch_rows": TODAY_ROWS, "offload_text_encoders": True},
            "sampling": {"cuda_graphs": True, "micro_batch_pairs": TODAY_PAIRS}, "reward": {"overlap": False}}


def lever(**sections) -> dict:
    """BASELINE with the settings of ``sections`` changed (one lever)."""
    return {k: {**BASELINE.get(k, {}), **sections.get(k, {})} for k in {*BASELINE, *sections}}


# What each MFU lever changes, against baseline (run_gpu.sh's "levers" part runs them all).
LEVERS = {
    "baseline": "today's path: no compile, fp32 LoRA, 6 training rows, 3 sampling pairs, serial scoring, "
                "text encoders offloaded",
    "compile": "model.compile true",
    "lora_bf16": "lora.dtype auto (bf16 adapter, fp32 masters)",
    "rows_12": "train.micro_batch_rows 12",
    "rows_24": "train.micro_batch_rows 24",
    "overlap": "reward.overlap true",
    "fast": "every default (the levers together, micro-batches and offload auto)",
}
VARIANTS = {
    "fast": FAST,
    # The published formulation: PyTorch kernels, no graphs (and the sampler swapped, emulate_published_sampler),
    # no lever: today's path otherwise.
    "published": lever(train={"kernels": "torch"}, sampling={"cuda_graphs": False}),
    "baseline": BASELINE,
    "compile": lever(model={"compile": True}),
    "lora_bf16": lever(lora={"dtype": "auto"}),
    "rows_12": lever(train={"micro_batch_rows": 12}),
    "rows_24": lever(train={"micro_batch_rows": 24}),
    "overlap": lever(reward={"overlap": True}),
    # The levers for large models, each on top of the fast path (--variants; run_gpu.sh's "large_levers" part):
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
        "sampling": {"steps": args.steps, "guidance_scale": args.guidance},
        "train": {"epochs": 1 + args.warmup_epochs},
        "fdfo": {"pairs_per_epoch": args.pairs, "optimizer_steps_per_epoch": args.optimizer_steps},
        "data": {"prompts": str(ROOT / "prompts" / "examples.txt")},
        "reward": {"weights": {"pickscore": 1.0}, "paths": {"pickscore": str(reward_dir)}},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"out_dir": str(out_dir), "plot_every": 0, "progress": False},
    }
    for key, value in args.set:  # under the variant's own settings: a variant that sets the key keeps its value
        *path, last = key.split(".")
        node = overrides
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    if args.micro_pairs is not None:  # (a variant that sets its own micro-batch keeps it: baseline, the levers)
        overrides["sampling"]["micro_batch_pairs"] = args.micro_pairs
    if args.micro_rows is not None:
        overrides["train"]["micro_batch_rows"] = args.micro_rows
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


_FLOPS: dict[tuple, dict[str, float]] = {}  # per-row FLOPs by what they depend on (shared by the variants)


def flops_per_row(trainer) -> dict[str, float]:
    """Transformer FLOPs of one row's velocity (torch.utils.flop_counter, fdfo.flops.count_flops) with the
    trainer's architecture, adapter (or full fine-tuning), guidance, latent and text shapes: ``sample`` the
    forward, ``train`` the forward and the backward to the trainable weights. Counted on a twin of the
    transformer on the meta device (shapes only: no memory, no time on the GPU), so neither a compiled
    transformer (model.compile) nor DeepSpeed's gradient hooks on the trained weights are touched, and the
    attention is counted by its formula whichever kernel runs it. FLOPs are linear in the rows."""
    from fdfo.flops import count_flops
    from fdfo.models import Conditioning

    model, policy, lora = trainer.model, trainer.policy, trainer.cfg.lora
    model.move_text_encoders(model.device)  # (the trainer may have parked them on the CPU)
    with torch.no_grad():
        real = model.encode(["a photo"])  # the text shapes
    key = (type(model.transformer).__name__, json.dumps(dict(model.transformer.config), sort_keys=True, default=str),
           lora.enabled, lora.rank, lora.alpha, str(lora.target_modules), policy.guidance, tuple(model.latent_shape),
           tuple(real.embeds.shape[1:]), tuple(real.pooled.shape[1:]), str(model.dtype))
    if key in _FLOPS:
        return _FLOPS[key]
    meta, rows = torch.device("meta"), 2
    with torch.device(meta):
        twin = type(model.transformer).from_config(model.transformer.config).to(model.dtype)
    flow = type(model).from_transformer(twin, device=meta, dtype=model.dtype)
    if lora.enabled:
        flow.add_lora(lora)
    else:
        flow.enable_full_finetune()

    def empty(t: torch.Tensor, n: int) -> torch.Tensor:
        return torch.empty(n, *t.shape[1:], dtype=t.dtype, device=meta)

    cond = Conditioning(empty(real.embeds, rows), empty(real.pooled, rows))
    uncond = Conditioning(empty(real.embeds, 1), empty(real.pooled, 1)) if policy.uncond is not None else None
    x = torch.empty(rows, *model.latent_shape, device=meta)
    sigma = torch.empty(rows, device=meta)

    def sample():
        with torch.no_grad():
            flow.velocity(x, sigma, cond, policy.guidance, uncond)

    def train():
        flow.velocity(x, sigma, cond, policy.guidance, uncond).float().pow(2).mean().backward()

    _FLOPS[key] = {"sample": count_flops(sample) / rows, "train": count_flops(train) / rows}
    return _FLOPS[key]


def model_flop_utilisation(args, trainer, rec: dict) -> dict:
    """Transformer TFLOP/s and MFU of the epoch's sampling phase and training phase.

    The sampling phase evaluates the velocity once per sampled (row, step): rows × sampling.steps forwards
    (both CFG halves when guidance is on); the training phase once per training element (forward and
    backward): ``layout.elements_per_rank``. Each phase's FLOPs are that count times the per-row FLOPs of
    ``flops_per_row``; the times are this rank's. The sampling phase's time also holds text
    encoding, VAE decode and the reward, which are not counted: its MFU is a lower bound on the sampler's
    own. MFU = TFLOP/s over the device's dense bf16 peak (fdfo.flops.peak_bf16_tflops, by its name; none on
    a CPU)."""
    from fdfo.flops import peak_bf16_tflops

    layout = trainer.layout
    count = {"sample": layout.rows_per_rank * trainer.cfg.sampling.steps, "train": layout.elements_per_rank}
    flops = flops_per_row(trainer)
    out = {}
    for phase, seconds in (("sample", rec.get("sample_s")), ("train", rec.get("train_s"))):
        per_row = flops[phase]
        out[f"{phase}_flops_per_row"] = per_row
        out[f"{phase}_tflops"] = per_row * count[phase] / seconds / 1e12 if seconds else None
    peak = args.peak_tflops or peak_bf16_tflops(trainer.device)
    out["peak_tflops"] = peak
    for phase in ("sample", "train"):
        tf = out[f"{phase}_tflops"]
        out[f"{phase}_mfu"] = tf / peak if (tf is not None and peak) else None
    return out


def use_compile_backend(backend: str) -> None:
    """Every model.compile of this process with torch.compile's ``backend`` (fdfo.compilation.Compiled takes it
    as a keyword; the trainer passes none, so inductor by default)."""
    from fdfo import compilation

    original = compilation.Compiled.__init__
    if getattr(original, "backend", None) == backend:
        return

    def init(self, module, log=None, **kwargs):
        original(self, module, log, **{"backend": backend, **kwargs})

    init.backend = backend
    compilation.Compiled.__init__ = init


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
    tuned = getattr(trainer, "tuned", None)
    lora_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.trainable_parameters()})
    compile_stats = trainer.model.compile_stats() if hasattr(trainer.model, "compile_stats") else {}
    result = {
        "variant": variant, "lever": LEVERS.get(variant), "kernels": cfg.train.kernels,
        "cuda_graphs": cfg.sampling.cuda_graphs, "sampler": sampler, "kernel_backend": trainer.policy.kernels,
        "trajectory_device": cfg.train.trajectory_device, "attention_backend": cfg.model.attention_backend,
        "trajectory_mib": rec.get("trajectory_mib"), "trajectory_device_mib": rec.get("trajectory_device_mib"),
        "pairs": cfg.fdfo.pairs_per_epoch, "steps": cfg.sampling.steps, "guidance": cfg.sampling.guidance_scale,
        # the settings, and what the run chose for the "auto" ones (fdfo.tuning)
        "settings": {"model.compile": cfg.model.compile, "lora.dtype": cfg.lora.dtype,
                     "train.micro_batch_rows": cfg.train.micro_batch_rows,
                     "sampling.micro_batch_pairs": cfg.sampling.micro_batch_pairs,
                     "reward.overlap": cfg.reward.overlap,
                     "train.offload_text_encoders": cfg.train.offload_text_encoders},
        "micro_batch_rows": trainer.layout.micro_batch_rows,
        "micro_batch_pairs": tuned.sample_pairs if tuned is not None else cfg.sampling.micro_batch_pairs,
        "offload_text_encoders": tuned.offload_text_encoders if tuned is not None else None,
        "lora_dtype": ",".join(lora_dtypes), "compiled": compile_stats.get("compiled", False),
        "compile_s": compile_stats.get("compile_s"),
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


def setting(text: str) -> tuple[str, object]:
    """SECTION.KEY=VALUE -> (key, value), the value read as JSON where it parses (true, 12, "auto"), else text."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.KEY=VALUE, e.g. model.compile=false")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def vs_baseline(r: dict, base: dict | None) -> dict | None:
    """A variant's speed-ups over baseline measured in the same run: pairs/s, and each phase's time."""
    if not base or not base.get("pairs_per_s") or not r.get("pairs_per_s"):
        return None
    return {"pairs_per_s": r["pairs_per_s"] / base["pairs_per_s"],
            "sample": base["sample_s"] / r["sample_s"] if r.get("sample_s") else None,
            "train": base["train_s"] / r["train_s"] if r.get("train_s") else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="pairs per epoch (default 24; --tiny 6)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 40; --tiny 4)")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG weight (1.0 = off; 4.5 for CFG)")
    parser.add_argument("--micro-pairs", type=int, default=None,
                        help="sampling.micro_batch_pairs of the variants that do not set their own (fast, host, "
                             "sdpa_*; default: the config's, \"auto\")")
    parser.add_argument("--micro-rows", type=int, default=None,
                        help="train.micro_batch_rows of the variants that do not set their own (default: \"auto\")")
    parser.add_argument("--optimizer-steps", type=int, default=4, help="fdfo.optimizer_steps_per_epoch")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="untimed epochs before the timed one")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="fast and published by default; baseline and the MFU levers (" + ", ".join(
                            v for v in LEVERS if v not in ("baseline", "fast")) + ") each against baseline; host "
                        "and sdpa_* are the large-model levers (a variant that fails is recorded with its error, "
                        "and the others still run)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of model.compile (default: inductor on CUDA; on CPU aot_eager, "
                             "which traces and partitions the model like inductor but runs the captured graphs "
                             "eagerly: the compile variant's plumbing in seconds, where inductor's CPU code takes "
                             "minutes to build; no speed claim)")
    parser.add_argument("--set", action="append", default=[], type=setting, metavar="SECTION.KEY=VALUE",
                        help="a config setting for every variant that does not set it itself (repeatable; "
                             "e.g. model.compile=false for the large-model levers)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: by GPU name, fdfo.flops.PEAK_BF16_TFLOPS)")
    parser.add_argument("--out", default="benchmarks/epoch_results.json", help="JSON output")
    args = parser.parse_args(argv)
    for key, value in (dict(pairs=6, steps=4) if args.tiny else dict(pairs=24, steps=40)).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
                          else "cpu")
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    if args.compile_backend != "inductor":
        use_compile_backend(args.compile_backend)
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
            "optimizer_steps": args.optimizer_steps, "compile_backend": args.compile_backend,
            "set": dict(args.set), "variants": results, "speedup_fast_over_published": None,
            "speedup_over_baseline": {}, "failed": [], "complete": False,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(report, indent=2))  # (a run cut short in its first variant still says what it ran)
        for v in args.variants:
            try:
                results.append(run_variant(args, v, pipeline_dir, reward_dir, work))
            except Exception as exc:  # e.g. an SDPA kernel this GPU or dtype does not support
                results.append({"variant": v, "lever": LEVERS.get(v), "error": f"{type(exc).__name__}: {exc}"[:400],
                                "pairs_per_s": None})
                report["failed"].append(v)
                print(f"{v:>9}: failed: {results[-1]['error']}", flush=True)
                traceback.print_exc()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            by = {r["variant"]: r for r in results}
            if "fast" in by and "published" in by and by["published"]["pairs_per_s"] and by["fast"]["pairs_per_s"]:
                report["speedup_fast_over_published"] = by["fast"]["pairs_per_s"] / by["published"]["pairs_per_s"]
            for r in results:
                r["vs_baseline"] = vs_baseline(r, by.get("baseline")) if r["variant"] != "baseline" else None
                if r["vs_baseline"]:
                    report["speedup_over_baseline"][r["variant"]] = r["vs_baseline"]["pairs_per_s"]
            report["complete"] = len(results) == len(args.variants)
            write_text(out, json.dumps(report, indent=2))  # after each variant: a run cut short keeps it
    ratio = report["speedup_fast_over_published"]

    print(f"\none epoch, {args.pairs} pairs, {args.steps} steps, guidance {args.guidance}, {gpu}")
    print(f"{'variant':>9} | {'pairs/s':>9} | {'×base':>6} | {'sample_s':>9} | {'train_s':>9} | {'epoch_s':>9} | "
          f"{'sample TF/s':>11} | {'train TF/s':>10} | {'MFU s/t':>11}")
    for r in results:
        if r.get("error") or r.get("skipped_reason"):
            print(f"{r['variant']:>9} | {r.get('skipped_reason') or 'failed: ' + r['error']}")
            continue
        if r.get("skipped") or r["pairs_per_s"] is None:
            print(f"{r['variant']:>9} | epoch skipped (non-finite rewards)")
            continue
        mfu = "-" if r["sample_mfu"] is None else f"{100 * r['sample_mfu']:.1f}/{100 * r['train_mfu']:.1f}%"
        base = f"{r['vs_baseline']['pairs_per_s']:.2f}" if r.get("vs_baseline") else "-"
        print(f"{r['variant']:>9} | {r['pairs_per_s']:>9.4g} | {base:>6} | {r['sample_s']:>9.4g} | "
              f"{r['train_s']:>9.4g} | {r['epoch_s']:>9.4g} | {r['sample_tflops']:>11.4g} | "
              f"{r['train_tflops']:>10.4g} | {mfu:>11}")
    if ratio is not None:
        print(f"fast / published: {ratio:.3g}x pairs/s")
    print(f"JSON: {out}")
    return report


def exit_on_term(signum, frame):
    """SIGTERM (run_gpu.sh's time limit) as an exception: ``finally`` blocks run, so a build lock of a JIT
    extension (DeepSpeed's CPU ops, torch.utils.cpp_extension) is released instead of left to block every later
    process; the JSON holds what was measured."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_term)
    # a failed variant is recorded and the others still run; the exit status says whether any failed
    sys.exit(1 if main()["failed"] else 0)
