"""The flow-model protocol: the one way sampling, kernels, graphs, algorithms and the engine touch a model.

A model family (SD3/SD3.5 in ``sd3.py``, FLUX.1 in ``flux.py``) is one subclass of ``FlowModel``
that loads its diffusers components with ``from_pretrained`` and implements the family's own parts:

    text_encoders()           the frozen text encoders (moved to the CPU while training)
    attention_backends()      class method: the valid ``model.attention_backend`` names
    set_attention_backend(n)  apply one to every forward of the transformer
    sigmas(steps)             the family's σ grid for ``steps`` solver steps, [steps + 1] ending at 0
    encode(prompts)           ``Conditioning`` (a text sequence and a pooled vector per prompt)
    _forward(net, x, σ, c)    one transformer call on the state x [B, C, H, W] -> velocity, fp32

and declares ``family``, ``TRANSFORMER`` (the diffusers class name that ``model_index.json`` gives its
transformer: how a model directory's family is recognised), ``PIPELINE`` (the diffusers pipeline class
whose components it loads), ``LORA_TARGETS`` (the default adapted modules), ``Options`` (a dataclass
of the settings only this family takes: the run config's section named after the family, e.g.
``flux.guidance``) and ``PATCH`` (latent pixels per token side packed outside the transformer).
Everything else (CFG, decoding, LoRA and its export in the family pipeline's own format, gradient
checkpointing, full fine-tuning) is written once here. ``fdfo.models.FAMILIES`` lists the families.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fdfo import adapters, hub
from fdfo.compilation import Compiled
from fdfo.config import LoraConfig
from fdfo.errors import ConfigError


@dataclass
class Conditioning:
    """Prompt embeddings for a batch: the text sequence and the pooled vector."""

    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, Dp]

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], self.pooled[idx])

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, device) -> "Conditioning":
        return Conditioning(self.embeds.to(device), self.pooled.to(device))

    def repeat_rows(self, n: int) -> "Conditioning":
        return Conditioning(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def expand(self, rows: int) -> "Conditioning":
        """Broadcast a single-row conditioning (e.g. the negative prompt) to `rows` rows."""
        return Conditioning(self.embeds.expand(rows, -1, -1), self.pooled.expand(rows, -1))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([c.embeds for c in items]), torch.cat([c.pooled for c in items]))


HUB_FIX = "download it where there is network (huggingface-cli download) or give a local directory"


def model_index(path: str, revision: str | None) -> dict:
    """model_index.json of a local directory or hub repository, with a clear error when absent."""
    local = Path(path).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"model.path '{path}' has no model_index.json: it is not a diffusers "
                                    "pipeline directory (save one with pipeline.save_pretrained(dir))")
        return json.loads(index.read_text())
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model.path '{path}' does not exist; give a local diffusers pipeline directory "
                                "or a hub id such as 'stabilityai/stable-diffusion-3.5-medium'")
    source = hub.resolve(path, "model.path", HUB_FIX, revision=revision)
    if Path(source).is_dir():  # the cached snapshot (the hub is off or out of reach)
        return model_index(source, None)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except Exception as exc:  # network errors, gated repos, missing repos
        raise FileNotFoundError(f"could not load model.path '{path}' from the hub ({exc}); download it first "
                                "(huggingface-cli download) or give a local directory") from exc


def components(path: str, revision: str | None, names: tuple[str, ...],
               required: tuple[str, ...]) -> tuple[dict, set[str]]:
    """model_index.json of ``path`` and which of ``names`` it holds (``[library, class]``, not
    ``[null, null]``); a FileNotFoundError naming the first of ``required`` it lacks."""
    index = model_index(path, revision)
    present = {n for n in names if isinstance(index.get(n), list) and index[n][0] is not None}
    for name in required:
        if name not in present:
            raise FileNotFoundError(f"model.path '{path}' has no '{name}' component")
    return index, present


class FlowModel(ABC):
    """A text-to-image flow model: encode prompts, velocity (with CFG), decode; LoRA and its export."""

    family: ClassVar[str]
    TRANSFORMER: ClassVar[str]
    PIPELINE: ClassVar[str]
    LORA_TARGETS: ClassVar[tuple[str, ...]]
    # The family's own settings, a frozen dataclass whose fields are keyword arguments of its constructor;
    # the run config's section named after the family holds them. None: the family has none.
    Options: ClassVar[type | None] = None
    PATCH: ClassVar[int] = 1  # latent pixels per token side outside the transformer's own patch_size (FLUX packs 2×2)

    # Set by a family's constructor.
    pipe: object  # the family's diffusers pipeline (components only; its __call__ is not used)
    transformer: nn.Module
    vae: nn.Module | None
    device: torch.device
    dtype: torch.dtype
    latent_shape: tuple[int, int, int]  # [C, H, W] of the state the sampler and kernels see
    path: str
    max_sequence_length: int
    attention_backend: str = "native"
    # Under ZeRO-3 the engine sets a persistent unpartitioned copy here, which sampling uses.
    inference_transformer: nn.Module | None = None
    # The sampling transformer compiled in place (``compile``; fdfo.compilation), or None: eager.
    compiled: Compiled | None = None

    # ------------------------------------------------------------------ the family's own parts

    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """The text encoders."""

    @classmethod
    @abstractmethod
    def attention_backends(cls) -> tuple[str, ...]:
        """The ``model.attention_backend`` names this family can apply."""

    @abstractmethod
    def set_attention_backend(self, name: str) -> None:
        """Apply an attention backend to every forward of this model (sampling, graphs, training, copies)."""

    @abstractmethod
    def sigmas(self, steps: int) -> torch.Tensor:
        """The family pipeline's σ grid for ``steps`` solver steps at this model's resolution: [steps + 1]."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings, in the model's dtype."""

    @abstractmethod
    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One call of ``net`` (the transformer, its engine or its inference copy): state [B, C, H, W] at
        σ [B] -> velocity [B, C, H, W] in fp32. σ reaches the network in fp32 whatever the weights' dtype."""

    @classmethod
    def check_settings(cls, model_cfg) -> None:
        """A ConfigError for an attention backend this family cannot apply (before any weight is read)."""
        if model_cfg.attention_backend not in cls.attention_backends():
            raise ConfigError(f"model.attention_backend '{model_cfg.attention_backend}' is not available for "
                              f"{cls.family}; valid values: {', '.join(cls.attention_backends())}")

    @classmethod
    def transformer_class(cls) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, cls.TRANSFORMER)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, *, device: torch.device, dtype: torch.dtype,
                         options=None) -> "FlowModel":
        """The family's model around a transformer alone (weights in ``dtype`` on ``device``): no scheduler,
        text encoders or VAE, so ``encode``, ``decode``, ``sigmas``, the LoRA export and the image geometry
        are missing, while the transformer's side (``velocity``, ``add_lora``, ``enable_full_finetune``, the
        attention backends) runs exactly as on a loaded model. The benchmarks time the published
        architectures from random weights this way (``fdfo.models.flavours``), with no pipeline directory of
        many gigabytes to write first. options: an instance of the family's ``Options`` (None: defaults)."""
        import diffusers

        pipeline = getattr(diffusers, cls.PIPELINE)
        absent = {name: None for name, p in inspect.signature(pipeline).parameters.items() if p.default is p.empty}
        model = cls.__new__(cls)  # (the constructor reads every component from a pipeline directory)
        model.pipe = pipeline(**{**absent, "transformer": transformer})
        model.transformer, model.vae, model.device, model.dtype = transformer, None, device, dtype
        transformer.eval().requires_grad_(False)  # as from_pretrained and freeze() leave a loaded one
        if options is None and cls.Options is not None:
            options = cls.Options()
        model._init_state(**(dataclasses.asdict(options) if options is not None else {}))
        return model

    def _init_state(self) -> None:
        """What a model holds beside its components, set alike by the constructor and ``from_transformer``
        (a family adds its own, and takes its ``Options`` here): no inference copy yet, the default
        attention backend."""
        self.inference_transformer = None
        self.attention_backend = "native"

    def image_channels(self) -> int:
        """Channels of the decoded images (the VAE's outputs, or the state's own without a VAE)."""
        return self.vae.config.out_channels if self.vae is not None else self.latent_shape[0]

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the decoded images."""
        scale = self.pipe.vae_scale_factor if self.vae is not None else 1
        return self.latent_shape[1] * scale, self.latent_shape[2] * scale

    def resolution_step(self) -> tuple[int, int | None]:
        """(multiple, largest) image side this model takes in pixels (largest None: no limit)."""
        scale = self.pipe.vae_scale_factor if self.vae is not None else 1
        step = scale * getattr(self.transformer.config, "patch_size", 1) * self.PATCH
        limit = getattr(self.transformer.config, "pos_embed_max_size", None)
        return step, step * limit if limit else None

    def lora_targets(self, names: list[str]) -> list[str]:
        """The peft target names for ``lora.target_modules`` (a family may make a name more specific)."""
        return names

    # ------------------------------------------------------------------ components

    def frozen_modules(self) -> list[nn.Module]:
        return self.text_encoders() + ([self.vae] if self.vae is not None else [])

    def freeze(self) -> None:
        """Text encoders and VAE frozen in eval mode; the transformer frozen until LoRA or full fine-tuning."""
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        self.transformer.requires_grad_(False)

    def move_text_encoders(self, device: torch.device | str) -> None:
        """Put the text encoders on ``device`` (the GPU to encode, the CPU to free memory while training).

        Off a GPU they go to pinned host memory, copied there once: they are frozen, so that copy stays
        valid, and every later move off the GPU only drops the device tensors; a move back uploads from
        pinned memory without blocking the host."""
        device = torch.device(device)
        pinned: dict[int, torch.Tensor] = self.__dict__.setdefault("_pinned_encoders", {})
        for module in self.text_encoders():
            tensors = [*module.parameters(), *module.buffers()]
            where = tensors[0].device if tensors else device
            if device.type == "cpu" and where.type == "cuda":
                for t in tensors:
                    if id(t) not in pinned:
                        pinned[id(t)] = t.data.to("cpu").pin_memory()
                    t.data = pinned[id(t)]
            elif device.type == "cuda" and where.type == "cpu" and tensors and id(tensors[0]) in pinned:
                for t in tensors:
                    t.data = pinned[id(t)].to(device, non_blocking=True)
            else:
                module.to(device)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward (diffusers' mechanism); sampling, without gradients, is
        unaffected."""
        self.transformer.enable_gradient_checkpointing()

    def lora_dtype(self, setting: str = "auto") -> torch.dtype:
        """The trainable adapter's dtype for ``lora.dtype``: "auto" = the model's dtype when that is bf16 or
        fp32 (with bf16 the engine runs DeepSpeed's bf16 mode, whose optimizer keeps fp32 master weights),
        fp32 beside an fp16 model (DeepSpeed's fp16 mode would need loss scaling); "float32" = fp32."""
        if setting == "auto" and self.dtype in (torch.bfloat16, torch.float32):
            return self.dtype
        return torch.float32

    def cast_trainable(self, dtype: torch.dtype) -> None:
        """The trainable weights in ``dtype`` (in place: the parameters stay the same objects)."""
        for p in self.transformer.parameters():
            if p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)

    def add_lora(self, cfg: LoraConfig) -> None:
        """LoRA via peft on ``lora.target_modules`` (default: the family's ``LORA_TARGETS``), its weights in
        ``lora_dtype(lora.dtype)``. peft draws the initial weights in fp32 and casts them to the adapted
        layer's dtype (diffusers' ``add_adapter`` does not upcast them again), so a bf16 adapter starts from
        the bf16 rounding of the fp32 one the same seed gives."""
        from peft import LoraConfig as PeftLoraConfig

        names = list(cfg.target_modules) if cfg.target_modules is not None else list(self.LORA_TARGETS)
        self.transformer.add_adapter(PeftLoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=self.lora_targets(names),
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        ))
        self.cast_trainable(self.lora_dtype(cfg.dtype))

    def enable_full_finetune(self) -> None:
        """Train every transformer weight; in bf16 on GPU, DeepSpeed keeps the fp32 master copy."""
        self.transformer.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ compilation

    def compile(self, log=None) -> Compiled:
        """torch.compile the transformer that samples in place (fdfo.compilation): the inference copy under
        ZeRO-3, else the transformer itself, whose compiled call then also serves training (the DeepSpeed
        engine calls the module) and evaluation. Every later caller (``velocity``, a CUDA graph captured over
        it) runs the compiled module; a compiler failure makes it eager for good, said once through ``log``.
        Call it after anything that replaces the module's weights or hooks (DeepSpeed's set-up, adapters)."""
        if self.compiled is None:
            net = self.inference_transformer if self.inference_transformer is not None else self.transformer
            self.compiled = Compiled(net, log)
        return self.compiled

    def compile_stats(self) -> dict:
        """``compiled`` and ``compile_s`` (cumulative seconds of the calls that compiled) for the run's
        metrics; empty when nothing was compiled."""
        return self.compiled.stats() if self.compiled is not None else {}

    # ------------------------------------------------------------------ velocity and decoding

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0,
                 uncond: Conditioning | None = None, net: nn.Module | None = None) -> torch.Tensor:
        """v(x, σ) ≈ ε − x₀ for rows x [B, C, H, W] at σ [B]; with CFG v_u + w·(v_c − v_u).

        net: the module to call (the DeepSpeed engine while training, so its hooks run);
        defaults to the inference copy under ZeRO-3 (``inference_transformer``), else the transformer.
        """
        if net is None:
            net = self.inference_transformer if self.inference_transformer is not None else self.transformer
        rows = x.shape[0]
        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs the negative-prompt conditioning")
            both = Conditioning.cat([uncond.expand(rows) if len(uncond) == 1 else uncond, cond])
            v_u, v_c = self._forward(net, torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            return v_u + guidance_scale * (v_c - v_u)
        return self._forward(net, x, sigma, cond)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3 or C, H, W] in [0, 1]; without a VAE the state is the
        image in [-1, 1]."""
        if self.vae is None:
            return (x0.float() / 2 + 0.5).clamp(0, 1)
        cfg = self.vae.config
        latents = x0.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ LoRA export

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def lora_metadata(self) -> dict:
        """The adapter's peft config (rank, alpha, targets): without it a loader would assume alpha = rank."""
        return self.transformer.peft_config["default"].to_dict()

    def load_lora(self, directory: str | Path) -> None:
        """Load an adapter the way the family's pipeline does (``load_lora_weights``): our exports, and
        the adapters diffusers' LoRA loaders read."""
        self.pipe.load_lora_weights(str(directory))

    def load_adapter(self, directory: str | Path, *, trainable: bool = False, lora_dtype: str = "auto") -> None:
        """Add a peft-format adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as
        ``PeftModel.save_pretrained`` writes it: the published FDFO adapters) with its own rank, alpha and
        targets; ``trainable``: to train on from it, its weights in ``lora_dtype(lora_dtype)`` (``lora.dtype``;
        a frozen adapter takes the model's dtype)."""
        adapters.load_into(self.transformer, adapters.read(Path(directory)), trainable=trainable,
                           dtype=self.lora_dtype(lora_dtype) if trainable else None)

    def remove_adapters(self) -> None:
        """Drop every LoRA adapter (ours, diffusers' or peft's): the transformer is the base model again
        (LoRA never changes the base weights), ready for another adapter."""
        names = list(getattr(self.transformer, "peft_config", None) or {})
        if names:
            self.transformer.delete_adapters(names)

    def save_lora(self, directory: str | Path) -> None:
        """Writes the adapter twice into ``directory``: ``pytorch_lora_weights.safetensors``, which the
        family's own pipeline loads with ``load_lora_weights(dir)`` (StableDiffusion3Pipeline, FluxPipeline),
        and peft's ``adapter_config.json`` + ``adapter_model.safetensors``, which ``PeftModel.from_pretrained``
        and the published tools read."""
        state = self.lora_state_dict()
        type(self.pipe).save_lora_weights(str(directory), transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=self.lora_metadata())
        adapters.save(self.transformer, state, Path(directory))
