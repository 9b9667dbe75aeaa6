"""The training engine: process group, DeepSpeed, optimizer and checkpoints.

A single-process run uses the same DeepSpeed engine at world size 1, so
there is one code path from a laptop CPU to many GPUs. Checkpoints hold the
DeepSpeed state (trainable weights, optimizer, counters), the trainer's own
state (epoch, history, every RNG state) and an exported adapter that
``StableDiffusion3Pipeline.load_lora_weights(dir)`` loads directly. Each is
written to a temporary directory that is renamed into place only when
complete, so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fdfo import atomic

CHECKPOINT_TAG = "state"
UNIVERSAL_TAG = "state_universal"  # the same state, converted for another number of ranks
UNIVERSAL_TIMEOUT = datetime.timedelta(hours=6)  # how long ranks wait for rank 0's conversion
ADAPTER_DIR = "adapter"
TRANSFORMER_DIR = "transformer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Initialise the process group (DeepSpeed's launcher or a plain single process).

    Returns (rank, world_size, local_rank, device). A plain ``python fdfo/train.py``
    becomes rank 0 of a world of 1 on a free local port.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device


def deepspeed_config(cfg, layout: dict, world_size: int, bf16: bool = False) -> dict:
    """The DeepSpeed config, derived from the run config (the single source of batch sizes).

    ``deepspeed.config`` (a JSON such as configs/ds/zero3.json) adds ZeRO and offload
    settings; a batch size or ZeRO stage there that contradicts the run config is an error.
    Mixed precision is DeepSpeed's own (``bf16``), never an autocast around the engine.
    """
    from fdfo.config import ConfigError

    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_rows,
        "gradient_accumulation_steps": layout["grad_accum"],
        "train_batch_size": t.micro_batch_rows * layout["grad_accum"] * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config '{path}' does not exist; see configs/ds/ "
                              "(zero2.json, zero3.json, zero3_offload.json)")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config '{path}' is not valid JSON: {exc}") from exc
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in extra and extra[key] not in ("auto", ds[key]):
                raise ConfigError(f"{path}: '{key}' is {extra[key]} but the run config gives {ds[key]} "
                                  "(train.micro_batch_rows and the epoch layout); remove it or set it to \"auto\"")
            extra.pop(key, None)
        ds.update(extra)
    zero = ds.setdefault("zero_optimization", {})
    file_stage, run_stage = zero.get("stage"), cfg.deepspeed.zero_stage
    if file_stage is not None and run_stage is not None and file_stage != run_stage:
        raise ConfigError(f"deepspeed.zero_stage={run_stage} contradicts stage {file_stage} in "
                          f"{cfg.deepspeed.config}; set one of them")
    zero["stage"] = run_stage if run_stage is not None else (file_stage or 0)
    if bf16:
        ds.setdefault("bf16", {"enabled": True})
    return ds


def offload_device(ds_config: dict, what: str) -> str | None:
    """The device ZeRO offloads ``what`` ("optimizer" or "param") to ("cpu", "nvme"), or None."""
    device = (ds_config.get("zero_optimization", {}).get(f"offload_{what}") or {}).get("device", "none")
    return None if device in (None, "none") else device


def adamw(params, ds_config: dict, **hyper) -> torch.optim.Optimizer:
    """AdamW for the engine: torch's, or under ZeRO-Offload of the optimizer DeepSpeed's vectorised
    CPU Adam in AdamW mode (DeepSpeed refuses a torch optimizer there; its op is built on first use)."""
    if offload_device(ds_config, "optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
    return torch.optim.AdamW(params, **hyper)


class InferenceCopy:
    """A persistent, unpartitioned copy of a ZeRO-3-partitioned module, for sampling.

    Under ZeRO-3 each rank holds a slice of every weight, and a forward all-gathers them layer by
    layer. Sampling runs T forwards per micro-batch, so it samples from this copy instead: built
    once (same architecture and adapters, every tensor allocated straight on the device in its
    source dtype, nothing materialised twice), refreshed in place from the partitioned weights
    before each sampling phase (the frozen base once, the trainable weights every time), so its
    tensors never move and a CUDA graph captured over it stays valid for the whole run.
    """

    GATHER_NUMEL = 1 << 27  # elements gathered at once while refreshing (bounds the transient memory)

    def __init__(self, source: nn.Module, device: torch.device):
        self.source, self.device = source, torch.device(device)
        with torch.device("meta"):
            module = type(source).from_config(source.config)
            for name, peft_config in (getattr(source, "peft_config", None) or {}).items():
                module.add_adapter(peft_config, adapter_name=name)
        params = dict(source.named_parameters(remove_duplicate=False))
        buffers = dict(source.named_buffers(remove_duplicate=False))
        made: dict[int, nn.Parameter] = {}  # id(source parameter) -> its copy: tied weights stay tied
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for leaf, p in list(sub._parameters.items()):
                if p is None:
                    continue
                src = params[f"{prefix}.{leaf}" if prefix else leaf]
                if id(src) not in made:
                    shape = getattr(src, "ds_shape", src.shape)  # the full shape of a partitioned weight
                    made[id(src)] = nn.Parameter(torch.empty(shape, dtype=src.dtype, device=self.device),
                                                 requires_grad=False)
                sub._parameters[leaf] = made[id(src)]
            for leaf, b in list(sub._buffers.items()):
                if b is not None:  # buffers are never partitioned
                    sub._buffers[leaf] = buffers[f"{prefix}.{leaf}" if prefix else leaf].detach().to(self.device).clone()
        self.module = module.eval()
        self.synced_frozen = False
        self.sync()  # never holds uninitialised memory (a collective: every rank builds its copy)

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the current weights in: all of them the first time, then only the trainable ones."""
        import deepspeed

        dst = dict(self.module.named_parameters(remove_duplicate=False))

        def copy_in(group):
            with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
                for name, p in group:
                    dst[name].copy_(p.data)

        group, numel = [], 0
        for name, p in self.source.named_parameters():
            if p.requires_grad or not self.synced_frozen:
                group.append((name, p))
                numel += int(getattr(p, "ds_numel", p.numel()))
                if numel >= self.GATHER_NUMEL:
                    copy_in(group)
                    group, numel = [], 0
        if group:
            copy_in(group)
        self.synced_frozen = True


class Engine:
    """DeepSpeed engine around the flow model's transformer, with AdamW on its trainable weights."""

    def __init__(self, cfg, model, layout: dict, rank: int, world_size: int):
        import deepspeed

        self.cfg, self.model, self.rank, self.world_size = cfg, model, rank, world_size
        params = model.trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (check lora.target_modules)")
        t = cfg.train
        # Full fine-tuning of a bf16 model: DeepSpeed's bf16 mode (fp32 master weights in the optimizer).
        # LoRA keeps its trainable weights in fp32 beside the frozen bf16 base, so it needs no mode.
        bf16 = not cfg.lora.enabled and model.dtype == torch.bfloat16
        self.ds_config = deepspeed_config(cfg, layout, world_size, bf16=bf16)
        optimizer = adamw(params, self.ds_config, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                          eps=t.adam_eps, weight_decay=t.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model.transformer, optimizer=optimizer, config=self.ds_config)
        self.grad_accum = layout["grad_accum"]
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        if cfg.train.compile:
            self.engine.compile()  # torch.compile of the module, in place, with DeepSpeed's hooks in mind
        # ZeRO-3: sample from a persistent gathered copy (deepspeed.inference_copy), refreshed per phase;
        # not when the parameters are offloaded to the CPU, whose point is to keep full weights off the GPU.
        self.inference_copy = None
        if self.zero_stage == 3 and cfg.deepspeed.inference_copy:
            if offload_device(self.ds_config, "param"):
                if rank == 0:
                    print("[fdfo] parameters are offloaded (offload_param): no persistent inference copy; "
                          "sampling gathers the weights for each phase instead", flush=True)
            else:
                self.inference_copy = InferenceCopy(model.transformer, model.device)
                model.inference_transformer = self.inference_copy.module

    # ------------------------------------------------------------------ sampling

    def inference_weights(self, params=None):
        """Context for sampling and evaluation with materialised weights.

        Under ZeRO-3 every forward would all-gather each layer again; for the T × micro-batch
        forwards of an epoch's sampling the weights are gathered once instead: into the persistent
        inference copy (``model.inference_transformer``, which sampling then uses) when there is one,
        else into the partitioned module itself for the duration of the context. ``params``: gather
        just these into the module (e.g. the weights to export). Other stages keep full weights on
        every rank: nothing to do.
        """
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        if params is None and self.inference_copy is not None:
            self.inference_copy.sync()
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.transformer.parameters()) if params is None else list(params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    # ------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum: gradients are averaged over the step

    def step(self) -> bool:
        """Optimizer step at the accumulation boundary; returns True when the weights changed."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: Path, trainer_state: dict) -> None:
        """Atomically writes directory/{state/ (DeepSpeed), adapter/ or transformer/, trainer.json}."""
        import torch.distributed as dist

        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = dict(trainer_state, rng=rng_state())
        self.engine.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, client_state={"trainer": state},
                                    exclude_frozen_parameters=True)
        if not self.cfg.lora.enabled and self.inference_copy is not None:
            # Full fine-tuning under ZeRO-3: refresh the persistent copy (gathered in bounded chunks)
            # and write it, rather than gathering the whole model a second time beside it.
            self.inference_copy.sync()
            if self.rank == 0:
                self.inference_copy.module.save_pretrained(tmp / TRANSFORMER_DIR)
        else:
            transformer = self.model.transformer
            exported = self.model.trainable_parameters() if self.cfg.lora.enabled else list(transformer.parameters())
            with self.inference_weights(exported):  # ZeRO-3: gather what is exported into the module, every rank
                if self.rank == 0:
                    if self.cfg.lora.enabled:
                        self.model.save_lora(tmp / ADAPTER_DIR)
                    else:
                        transformer.save_pretrained(tmp / TRANSFORMER_DIR)
        if self.rank == 0:
            (tmp / "trainer.json").write_text(json.dumps(
                {k: v for k, v in trainer_state.items() if k != "history"}, indent=1))
            atomic.replace_dir(tmp, directory)
            atomic.write_text(directory.parent / "latest", directory.name)
        dist.barrier()

    def load(self, directory: Path) -> dict:
        """Resume from ``directory``; a checkpoint written by another number of ranks is first converted
        to DeepSpeed's universal format (once, kept beside the sharded state as ``state_universal/``)."""
        directory = Path(directory)
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"'{directory}' is not an fdfo checkpoint (no '{CHECKPOINT_TAG}/' inside)")
        saved_ranks = saved_world_size(directory / CHECKPOINT_TAG)
        tag = CHECKPOINT_TAG
        if saved_ranks is not None and saved_ranks != self.world_size:
            tag = self._universal(directory, saved_ranks)
            self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
        try:
            path, client = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in '{directory}'")
        state = client["trainer"]
        rng = state.pop("rng")
        if saved_ranks in (None, self.world_size):
            set_rng_state(rng)  # (per-rank streams; nothing the trainer draws depends on them across ranks)
        return state

    def _universal(self, directory: Path, saved_ranks: int) -> str:
        """Rank 0 converts ``state/`` to ``state_universal/`` (atomically) unless it exists; returns the tag."""
        import torch.distributed as dist

        out = directory / UNIVERSAL_TAG
        # The other ranks wait for rank 0's conversion, which can outlast the process group's timeout
        # (DeepSpeed's default is 10 minutes) on a large state: they wait on a gloo group of their own.
        group = dist.new_group(backend="gloo", timeout=UNIVERSAL_TIMEOUT)
        error = [None]
        if self.rank == 0 and not out.is_dir():
            print(f"[fdfo] checkpoint '{directory}' was written by {saved_ranks} rank(s), this run has "
                  f"{self.world_size}: converting it to DeepSpeed's universal format in '{out}'", flush=True)
            try:
                convert_to_universal(directory / CHECKPOINT_TAG, out)
            except Exception as e:  # noqa: BLE001  (every rank must hear of it, not wait at a barrier)
                error = [str(e)]
        dist.broadcast_object_list(error, src=0, group=group)  # also the barrier: the others wait here
        if error[0] is not None:
            raise RuntimeError(error[0])
        missing = torch.tensor([0 if out.is_dir() else 1])
        dist.all_reduce(missing, op=dist.ReduceOp.SUM, group=group)  # every rank stops together
        dist.destroy_process_group(group)
        if int(missing):
            raise RuntimeError(f"{int(missing)} rank(s) cannot see '{out}': resuming on another number of ranks "
                               "needs the run directory on a file system all ranks share")
        return UNIVERSAL_TAG


def saved_world_size(state_dir: Path) -> int | None:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint directory (one optimizer shard each under
    ZeRO 1-3); None for an unsharded (stage 0) checkpoint, which loads on any number of ranks."""
    state_dir = Path(state_dir)
    shards = list(state_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if shards:
        return len(shards)
    if (state_dir / "mp_rank_00_model_states.pt").is_file():
        return None
    raise FileNotFoundError(f"'{state_dir}' holds neither ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt) "
                            "nor mp_rank_00_model_states.pt; is it a complete checkpoint?")


def convert_to_universal(state_dir: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal on ``state_dir`` into ``out``, written to a temporary sibling first."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    state_dir, out = Path(state_dir), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker: DeepSpeed's parallel path forks a process pool from this (CUDA- and process-group-
    # initialised) rank. A large state takes a while; the other ranks wait up to UNIVERSAL_TIMEOUT.
    args = Namespace(input_folder=str(state_dir), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"converting '{state_dir}' to a universal checkpoint failed ({e}); resume on the "
                           "number of ranks that wrote it, or start a new run from its exported adapter") from e
    stray = tmp.parent / "latest_universal"  # ds_to_universal also writes a 'latest' file beside its output
    if stray.is_file():
        stray.unlink()
    atomic.replace_dir(tmp, out)


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """``--resume auto`` = the run directory's latest checkpoint (None if there is none), else a path."""
    if resume == "auto":
        latest = Path(out_dir) / "checkpoints" / "latest"
        return latest.parent / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume '{resume}' does not exist; give a checkpoint directory "
                                "(runs/<name>/checkpoints/epoch_XXXX) or 'auto'")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
