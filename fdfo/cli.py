"""What the commands that sample images share on their command lines: the flags of the model, the
checkpoint, the prompts, the sampler and the metrics, their checks, and running on this process's rank.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fdfo import distributed
from fdfo.inference import OVERRIDES

# What --adapter takes (generate, evaluate and the evaluation protocol).
CHECKPOINT_FORMS = ("a run dir, checkpoints/epoch_XXXX or its adapter/ folder, a peft adapter folder, or "
                    "owner/name/subfolder on the hub")


def add_source_arguments(p: argparse.ArgumentParser, adapter_note: str = "") -> None:
    """The base model, the checkpoint and the prompts (a file or the prompts themselves) of generate and
    evaluate; ``adapter_note`` ends the help of --adapter."""
    p.add_argument("--model", help="diffusers pipeline directory (SD3/SD3.5 or FLUX.1), hub id or builtin:digits "
                                   "(default: the checkpoint's run config)")
    p.add_argument("--adapter", help=f"checkpoint: {CHECKPOINT_FORMS}{adapter_note}")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file with one prompt per line (or builtin:digits)")
    src.add_argument("--prompt", nargs="+", help="one or more prompts")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler settings that override a checkpoint's run config, and the batch, dtype and device of
    sampling: the same flags in every command that samples images."""
    p.add_argument("--guidance", type=float, help="CFG scale (1.0 = none)")
    p.add_argument("--negative-prompt", help="the unconditional prompt of CFG (default: empty)")
    p.add_argument("--steps", type=int, help="Euler steps")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the run's, else the model's)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda if available, else cpu")


def add_metric_arguments(p: argparse.ArgumentParser) -> None:
    """Where the metric models' weights are, and how they run (evaluate and the evaluation protocol)."""
    p.add_argument("--path", nargs="+", default=[], metavar="NAME=DIR", help="weights of a metric")
    p.add_argument("--reward-batch-size", type=int, default=8)
    p.add_argument("--reward-device", help="run the metric models on another device, e.g. cuda:1")


def sampling_overrides(args) -> dict:
    """The sampling settings the command line gives (None where a flag is not given), for
    ``fdfo.inference.resolve``."""
    return {key: getattr(args, key, None) for key in OVERRIDES}


def read_prompts(args) -> list[str]:
    """The prompts of ``--prompts`` (a file or a built-in set) or ``--prompt``."""
    from fdfo.prompts import load_prompts

    if not args.prompts:
        return list(args.prompt)
    return load_prompts(args.prompts)  # (a missing, unreadable or empty file: one line, from load_prompts)


def check_args(args) -> None:
    """The numbers and devices of a generate/evaluate command line, before anything is loaded."""
    for key in ("steps", "resolution", "max_sequence_length", "batch_size", "reward_batch_size"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1 (got {value})")
    _check_device(args.device, "--device")
    _check_device(getattr(args, "reward_device", None), "--reward-device")


def run_ranked(prog: str, args, body) -> int:
    """An evaluation command on this process's rank: joins the process group a multi-rank launcher set up
    (none otherwise), puts the rank on its GPU, runs ``body(rank, world)`` and turns a FileNotFoundError or
    ValueError into one line on stderr and exit status 1."""
    created = not torch.distributed.is_initialized()
    device = distributed.init(deepspeed=False)  # a process group only under a multi-rank launcher
    if args.device is None and device.type == "cuda":
        args.device = str(device)
    if args.device and args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    try:
        return body(distributed.rank(), distributed.world_size())
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if created:
            distributed.close()


def _check_device(spec: str | None, flag: str) -> None:
    """A device name torch knows; a CUDA device only where there is one."""
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"{flag} '{spec}' is not a device; give e.g. cpu, cuda or cuda:1") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} '{spec}': this machine has no CUDA device; give {flag} cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} '{spec}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
