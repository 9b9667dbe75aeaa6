"""SD3 / SD3.5 flow models through diffusers components.

Every component is loaded with ``from_pretrained`` from a hub id or a local
diffusers directory (the same code loads SD3.5 Medium and the tiny test and
default-job pipelines). A pipeline without a VAE (``vae: [null, null]`` in
model_index.json) works in pixel space: decoding maps the model's [-1, 1] range
to images in [0, 1] (x/2 + 1/2, clamped).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fdfo.config import ConfigError, LoraConfig

COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3")


@dataclass
class Conditioning:
    """Prompt embeddings for a batch: the joint text sequence and the pooled vector."""

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


def _model_index(path: str, revision: str | None) -> dict:
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
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except Exception as exc:  # network errors, gated repos, missing repos
        raise FileNotFoundError(f"could not load model.path '{path}' from the hub ({exc}); download it first "
                                "(huggingface-cli download) or give a local directory") from exc


class SD3FlowModel:
    """The flow-model protocol for SD3-family pipelines: encode prompts, velocity (with CFG), decode."""

    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                 max_sequence_length: int = 128, resolution: int | None = None, shift: float | None = None):
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                               StableDiffusion3Pipeline)
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        index = _model_index(path, revision)
        present = {name for name in COMPONENTS if isinstance(index.get(name), list) and index[name][0] is not None}
        for required in ("transformer", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if required not in present:
                raise FileNotFoundError(f"model.path '{path}' has no '{required}' component")
        kw = dict(revision=revision)
        load = lambda cls, sub, **extra: cls.from_pretrained(path, subfolder=sub, **kw, **extra)  # noqa: E731
        self.device, self.dtype = device, dtype
        self.transformer = load(SD3Transformer2DModel, "transformer", torch_dtype=dtype).to(device)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        if shift is not None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=shift)
        parts = dict(
            transformer=self.transformer, scheduler=scheduler,
            vae=load(AutoencoderKL, "vae", torch_dtype=dtype).to(device) if "vae" in present else None,
            text_encoder=load(CLIPTextModelWithProjection, "text_encoder", torch_dtype=dtype).to(device),
            text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype).to(device),
            tokenizer=load(AutoTokenizer, "tokenizer"), tokenizer_2=load(AutoTokenizer, "tokenizer_2"),
            text_encoder_3=None, tokenizer_3=None,
        )
        if "text_encoder_3" in present:
            parts["text_encoder_3"] = load(T5EncoderModel, "text_encoder_3", torch_dtype=dtype).to(device)
            parts["tokenizer_3"] = load(AutoTokenizer, "tokenizer_3")
        self.pipe = StableDiffusion3Pipeline(**parts)
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        self.transformer.requires_grad_(False)
        # Under ZeRO-3 the engine sets a persistent unpartitioned copy here, which sampling uses.
        self.inference_transformer: nn.Module | None = None
        self.attention_backend, self._sdpa_kernel = "native", None
        self.max_sequence_length = max_sequence_length
        self.vae = parts["vae"]
        scale = self.pipe.vae_scale_factor if self.vae is not None else 1
        side = (resolution or self.transformer.config.sample_size * scale) // scale
        self.latent_shape = (self.transformer.config.in_channels, side, side)  # [C, H, W]
        self.path = path

    # ------------------------------------------------------------------ components

    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3) if m is not None]

    def frozen_modules(self) -> list[nn.Module]:
        return self.text_encoders() + ([self.pipe.vae] if self.pipe.vae is not None else [])

    def move_text_encoders(self, device: torch.device | str) -> None:
        """Put the text encoders on ``device`` (the GPU to encode, the CPU to free memory while training)."""
        for module in self.text_encoders():
            module.to(device)

    def set_attention_backend(self, name: str) -> None:
        """Choose the attention kernel: ``native`` (PyTorch SDPA picks one), or one of PyTorch's SDPA
        kernels forced (``_native_flash``, ``_native_cudnn``, ``_native_efficient``, ``_native_math``).

        diffusers' SD3 attention processor calls PyTorch SDPA directly rather than dispatching through
        diffusers' attention backends, so the backends outside PyTorch (flash-attn, FlashAttention-3,
        SageAttention, xformers) cannot reach it: asking for one is a ConfigError that says so.
        The choice applies to every forward of this model (sampling, its CUDA graph, training, the
        inference copy), through ``torch.nn.attention.sdpa_kernel``."""
        from torch.nn.attention import SDPBackend

        kernels = {"native": None, "_native_flash": SDPBackend.FLASH_ATTENTION,
                   "_native_cudnn": SDPBackend.CUDNN_ATTENTION, "_native_efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "_native_math": SDPBackend.MATH}
        if name not in kernels:
            raise ConfigError(f"model.attention_backend '{name}' is not available for SD3: diffusers' SD3 attention "
                              "calls PyTorch's scaled_dot_product_attention directly, so only PyTorch's kernels "
                              f"apply; valid values: {', '.join(kernels)}")
        self.attention_backend, self._sdpa_kernel = name, kernels[name]

    def _attention(self):
        """The context every transformer forward runs in: the chosen SDPA kernel, or PyTorch's choice."""
        if self._sdpa_kernel is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._sdpa_kernel)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward (diffusers' mechanism); sampling, without gradients, is
        unaffected."""
        self.transformer.enable_gradient_checkpointing()

    def add_lora(self, cfg: LoraConfig) -> None:
        """LoRA via peft on the attention projections; trainable weights kept in fp32."""
        from peft import LoraConfig as PeftLoraConfig

        self.transformer.add_adapter(PeftLoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        ))
        for p in self.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    def enable_full_finetune(self) -> None:
        """Train every transformer weight; in bf16 on GPU, DeepSpeed keeps the fp32 master copy."""
        self.transformer.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ the protocol

    def sigmas(self, steps: int) -> torch.Tensor:
        """The scheduler's own σ grid for `steps` solver steps: [steps + 1], ending at 0."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.sigmas.detach().clone().float()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds.to(self.dtype), pooled.to(self.dtype))

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

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # The timestep stays fp32 (the scheduler's `timesteps`) whatever the weights' dtype: in bf16,
        # 1000·σ would move by up to 3 of 1000, off the times the base model was trained at.
        with self._attention():
            out = net(hidden_states=x.to(self.dtype), timestep=sigma.float() * 1000,
                      encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3 or C, H, W] in [0, 1]."""
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

    def save_lora(self, directory: str | Path) -> None:
        """Writes pytorch_lora_weights.safetensors that StableDiffusion3Pipeline.load_lora_weights(dir) loads."""
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(
            str(directory), transformer_lora_layers=self.lora_state_dict(),
            transformer_lora_adapter_metadata=self.lora_metadata())
