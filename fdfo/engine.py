"""The training engine: DeepSpeed around the flow model's transformer, with AdamW on its trainable weights.

A single-process run uses the same DeepSpeed engine at world size 1, so there is
one code path from a laptop CPU to many GPUs. The engine runs the training
forwards (``Engine.module``), backward and optimizer steps, materialises the
weights for sampling under ZeRO-3 (``inference_weights``), and saves, loads and
exports its state for ``fdfo.checkpoint``, which owns the checkpoint layout.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from fdfo import compilation, distributed
from fdfo.context import RunContext
from fdfo.errors import ConfigError

ADAPTER_DIR = "adapter"
TRANSFORMER_DIR = "transformer"


def deepspeed_config(cfg, layout, world_size: int, bf16: bool = False) -> dict:
    """The DeepSpeed config, derived from the run config (the single source of batch sizes).

    ``deepspeed.config`` (a JSON such as configs/ds/zero3.json) adds ZeRO and offload
    settings; a batch size or ZeRO stage there that contradicts the run config is an error.
    Mixed precision is DeepSpeed's own (``bf16``), never an autocast around the engine.
    """
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": layout.micro_batch_rows,
        "gradient_accumulation_steps": layout.grad_accum,
        "train_batch_size": layout.micro_batch_rows * layout.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device at every forward and step: off, so that the
        # micro-batch loop never waits for the GPU (the trainer times epochs itself).
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.deepspeed.config:
        path, extra = Path(cfg.deepspeed.config), _read_ds_file(cfg)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in extra and extra[key] not in ("auto", ds[key]):
                raise ConfigError(f"{path}: '{key}' is {extra[key]} but the run config gives {ds[key]} "
                                  "(train.micro_batch_rows and the epoch layout); remove it or set it to \"auto\"")
            extra.pop(key, None)
        ds.update(extra)
    ds.setdefault("zero_optimization", {})["stage"] = zero_stage(cfg)
    if bf16:
        ds.setdefault("bf16", {"enabled": True})
    return ds


def _read_ds_file(cfg) -> dict:
    """The JSON of ``deepspeed.config`` ({} without one)."""
    if not cfg.deepspeed.config:
        return {}
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config '{path}' does not exist; see configs/ds/ "
                          "(zero2.json, zero3.json, zero3_offload.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config '{path}' is not valid JSON: {exc}") from exc


def zero_stage(cfg) -> int:
    """The run's ZeRO stage: deepspeed.zero_stage, else the stage in deepspeed.config, else 0."""
    file_stage = (_read_ds_file(cfg).get("zero_optimization") or {}).get("stage")
    run_stage = cfg.deepspeed.zero_stage
    if file_stage is not None and run_stage is not None and file_stage != run_stage:
        raise ConfigError(f"deepspeed.zero_stage={run_stage} contradicts stage {file_stage} in "
                          f"{cfg.deepspeed.config}; set one of them")
    return run_stage if run_stage is not None else (file_stage or 0)


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


def use_tf32(device) -> None:
    """On a CUDA device, TF32 tensor cores for the fp32 matmuls and convolutions that remain (fp32 adapters
    with lora.dtype "float32", fp32 reward models, fp32 runs): 10-bit mantissa products, fp32 accumulation.
    Process-wide, set once by the engine; bf16 work is unaffected, and the Triton kernels choose their own."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def _undo_warmup_step(wrapper, optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's stage-0 fp32-master wrapper (FP16_UnfusedOptimizer: bf16 mode at stage 0) initialises the
    optimizer's state by stepping it once on zero gradients: AdamW's step count then starts at 1 (the first
    real update is about 0.74 of AdamW's at the default betas) and weight decay shrinks the fp32 masters once.
    Undone here (state cleared, masters copied again from the weights they were cloned from), so the first
    step is AdamW's first step, as in fp32. ZeRO's wrappers take no such step."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        optimizer.state.clear()
        wrapper.refresh_fp32_params()


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

    def __init__(self, cfg, model, layout, ctx: RunContext):
        import deepspeed

        self.cfg, self.model, self.ctx = cfg, model, ctx
        params = model.trainable_parameters()
        if not params:
            raise ValueError("the model has no trainable parameters (check lora.target_modules)")
        t = cfg.train
        use_tf32(ctx.device)
        # Trainable weights in bf16 (full fine-tuning of a bf16 model, or LoRA with lora.dtype "auto" on one):
        # DeepSpeed's bf16 mode, whose optimizer wrapper keeps the fp32 master weights and steps them (at
        # stage 0 FP16_UnfusedOptimizer: the bf16 gradients, accumulated over the micro-batches in bf16 as
        # DeepSpeed 0.19 does at stages 0, 2 and 3, are copied to fp32, clipped and stepped; the masters are
        # copied back to the bf16 weights). LoRA with lora.dtype "float32" keeps fp32 adapters beside the
        # frozen base and needs no mode: its forward upcasts each adapted input to fp32.
        lora_dtype = model.lora_dtype(cfg.lora.dtype) if cfg.lora.enabled else model.dtype
        bf16 = model.dtype == torch.bfloat16 and lora_dtype == torch.bfloat16
        if cfg.lora.enabled and not bf16:
            model.cast_trainable(lora_dtype)  # (an adapter loaded in the model's dtype: fp32 as configured)
        self.ds_config = deepspeed_config(cfg, layout, ctx.world_size, bf16=bf16)
        optimizer = adamw(params, self.ds_config, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                          eps=t.adam_eps, weight_decay=t.weight_decay)
        # ``module``: the DeepSpeed engine wrapping the transformer; training forwards go through it
        # so that its hooks (ZeRO gathers, gradient partitioning) run.
        self.module, _, _, _ = deepspeed.initialize(
            model=model.transformer, optimizer=optimizer, config=self.ds_config)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        # DeepSpeed reports the gradient norm from its ZeRO and mixed-precision optimizer wrappers only;
        # when it steps our optimizer unwrapped (stage 0 in fp32) the engine measures the norm itself.
        self._measure_norm = self.module.optimizer is optimizer
        self._grad_norm: float | None = None
        _undo_warmup_step(self.module.optimizer, optimizer)
        # ZeRO-3: sample from a persistent gathered copy (deepspeed.inference_copy), refreshed per phase;
        # not when the parameters are offloaded to the CPU, whose point is to keep full weights off the GPU.
        self.inference_copy = None
        if self.zero_stage == 3 and cfg.deepspeed.inference_copy:
            if offload_device(self.ds_config, "param"):
                distributed.print0("parameters are offloaded (offload_param): no persistent inference copy; "
                                   "sampling gathers the weights for each phase instead")
            else:
                self.inference_copy = InferenceCopy(model.transformer, model.device)
                model.inference_transformer = self.inference_copy.module
        # model.compile: one transformer compiled in place, once, after DeepSpeed's set-up (which casts and
        # hooks it) and the inference copy: sampling (inside the CUDA graph), training and evaluation call it.
        # At stages 0-2 the engine's forward calls the compiled transformer itself (DeepSpeed's engine.compile()
        # does exactly this, module.compile(), without the eager fallback). Under ZeRO-3 only the inference copy
        # is compiled: the partitioned training module stays eager, because DeepSpeed 0.19's ZeRO-3 gather and
        # release hooks are torch.compiler.disable'd (a graph break at every hooked submodule, many small
        # graphs) and its compiler path for ZeRO-3 (DeepCompile) is experimental and untested here.
        if compilation.wanted(cfg.model.compile, ctx.device):
            if self.zero_stage == 3 and self.inference_copy is None:
                distributed.print0("model.compile: ZeRO-3 without an inference copy partitions the transformer "
                                   "that samples; it runs eagerly")
            else:
                model.compile(log=distributed.print0)

    # ------------------------------------------------------------------ sampling

    @contextlib.contextmanager
    def inference_weights(self, params=None) -> Iterator[None]:
        """Context for sampling and evaluation with materialised weights (entered on every rank).

        Under ZeRO-3 every forward would all-gather each layer again; for the T × micro-batch
        forwards of an epoch's sampling the weights are gathered once instead: on entering, into
        the persistent inference copy (``model.inference_transformer``, which sampling then uses)
        when there is one, else into the partitioned module itself for the duration of the context.
        ``params``: gather just these into the module (e.g. the weights to export). Other stages keep
        full weights on every rank: nothing to do.
        """
        if self.zero_stage != 3:
            yield
            return
        if params is None and self.inference_copy is not None:
            self.inference_copy.sync()
            yield
            return
        import deepspeed

        params = list(self.model.transformer.parameters()) if params is None else list(params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    # ------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)  # scales by 1/grad_accum: gradients are averaged over the step

    def step(self) -> None:
        """Optimizer step at the gradient-accumulation boundary (DeepSpeed counts the micro-batches)."""
        if self._measure_norm and self.module.is_gradient_accumulation_boundary():
            # (the gradients are averaged over ranks by now: DeepSpeed all-reduces them in backward)
            norms = [p.grad.detach().float().norm() for p in self.model.trainable_parameters() if p.grad is not None]
            self._grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
        self.module.step()

    def set_hyperparameters(self, t) -> None:
        """The optimizer hyperparameters of ``train`` (``t``) on every parameter group.

        A loaded optimizer state brings the values it was saved with; the run config is the one
        source of them, so a resume with another learning rate trains with that rate."""
        for group in self.module.optimizer.param_groups:
            group.update(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                         weight_decay=t.weight_decay)

    def grad_norm(self) -> float | None:
        """The 2-norm of the last step's gradient before clipping (None before the first step)."""
        norm = self._grad_norm if self._measure_norm else self.module.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ state (for fdfo.checkpoint)

    def save_state(self, directory: Path, tag: str, client_state: dict) -> None:
        """DeepSpeed's sharded state into ``directory/tag`` (every rank writes its shard)."""
        self.module.save_checkpoint(str(directory), tag=tag, client_state={"trainer": client_state},
                                    exclude_frozen_parameters=True)

    def load_state(self, directory: Path, tag: str, universal: bool = False) -> dict:
        """Loads ``directory/tag`` (``universal``: a state converted for another number of ranks) and
        returns the client state saved with it."""
        # The clean form is checkpoint.load_universal in the DeepSpeed config, but the engine exists
        # before the checkpoint to resume is known; load_checkpoint alone reads this flag.
        self.module._config.load_universal_checkpoint = universal
        try:
            path, client = self.module.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            self.module._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in '{directory}'")
        return client["trainer"]

    def export(self, directory: Path) -> None:
        """The trained weights in diffusers' format: ``adapter/`` (LoRA) or ``transformer/`` (full)."""
        directory = Path(directory)
        if not self.cfg.lora.enabled and self.inference_copy is not None:
            # Full fine-tuning under ZeRO-3: refresh the persistent copy (gathered in bounded chunks)
            # and write it, rather than gathering the whole model a second time beside it.
            self.inference_copy.sync()
            if self.ctx.rank == 0:
                self.inference_copy.module.save_pretrained(directory / TRANSFORMER_DIR)
            return
        transformer = self.model.transformer
        exported = self.model.trainable_parameters() if self.cfg.lora.enabled else list(transformer.parameters())
        with self.inference_weights(exported):  # ZeRO-3: gather what is exported into the module, every rank
            if self.ctx.rank == 0:
                if self.cfg.lora.enabled:
                    self.model.save_lora(directory / ADAPTER_DIR)
                else:
                    transformer.save_pretrained(directory / TRANSFORMER_DIR)
