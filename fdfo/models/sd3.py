"""SD3 / SD3.5 flow models through diffusers components.

Every component is loaded with ``from_pretrained`` from a hub id or a local
diffusers directory (the same code loads SD3.5 Medium and the tiny test and
default-job pipelines). A pipeline without a VAE (``vae: [null, null]`` in
model_index.json) works in pixel space: decoding maps the model's [-1, 1] range
to images in [0, 1] (x/2 + 1/2, clamped).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fdfo.errors import ConfigError
from fdfo.models.base import Conditioning, FlowModel, components

COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3")
# PyTorch's SDPA kernels by model.attention_backend name (None: PyTorch picks one).
SDPA_KERNELS = {"native": None, "_native_flash": "FLASH_ATTENTION", "_native_cudnn": "CUDNN_ATTENTION",
                "_native_efficient": "EFFICIENT_ATTENTION", "_native_math": "MATH"}


class SD3FlowModel(FlowModel):
    """SD3 and SD3.5 pipelines (``StableDiffusion3Pipeline``'s components)."""

    family = "sd3"
    TRANSFORMER = "SD3Transformer2DModel"
    PIPELINE = "StableDiffusion3Pipeline"
    # The published adapter's modules: the joint attention's projections (image and text stream) of every
    # block. peft matches a target against the end of a module's name, so the "attn." prefix keeps SD3.5
    # Medium's second self-attention (attn2 in its dual-attention blocks) out; a bare "to_q" would reach it.
    LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                 max_sequence_length: int = 128, resolution: int | None = None, shift: float | None = None):
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                               StableDiffusion3Pipeline)
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        _, present = components(path, revision, COMPONENTS, required=(
            "transformer", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
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
        self.vae = parts["vae"]
        self.freeze()
        self._init_state()
        self.max_sequence_length = max_sequence_length
        scale = self.pipe.vae_scale_factor if self.vae is not None else 1
        side = (resolution or self.transformer.config.sample_size * scale) // scale
        self.latent_shape = (self.transformer.config.in_channels, side, side)  # [C, H, W]
        self.path = path

    def _init_state(self) -> None:
        super()._init_state()
        self._sdpa_kernel = None  # PyTorch picks the SDPA kernel

    # ------------------------------------------------------------------ components

    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3) if m is not None]

    @classmethod
    def attention_backends(cls) -> tuple[str, ...]:
        """``native`` (PyTorch SDPA picks a kernel) or one of PyTorch's SDPA kernels forced. diffusers' SD3
        attention processor calls PyTorch SDPA directly rather than dispatching through diffusers'
        attention backends, so the backends outside PyTorch (flash-attn, FlashAttention-3, SageAttention,
        xformers) cannot reach it."""
        return tuple(SDPA_KERNELS)

    def set_attention_backend(self, name: str) -> None:
        """The choice applies to every forward of this model (sampling, its CUDA graph, training, the
        inference copy), through ``torch.nn.attention.sdpa_kernel``."""
        from torch.nn.attention import SDPBackend

        if name not in SDPA_KERNELS:
            raise ConfigError(f"model.attention_backend '{name}' is not available for SD3: diffusers' SD3 attention "
                              "calls PyTorch's scaled_dot_product_attention directly, so only PyTorch's kernels "
                              f"apply; valid values: {', '.join(SDPA_KERNELS)}")
        kernel = SDPA_KERNELS[name]
        self.attention_backend, self._sdpa_kernel = name, None if kernel is None else getattr(SDPBackend, kernel)

    def _attention(self):
        """The context every transformer forward runs in: the chosen SDPA kernel, or PyTorch's choice."""
        if self._sdpa_kernel is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._sdpa_kernel)

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

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # The timestep stays fp32 (the scheduler's `timesteps`) whatever the weights' dtype: in bf16,
        # 1000·σ would move by up to 3 of 1000, off the times the base model was trained at.
        with self._attention():
            out = net(hidden_states=x.to(self.dtype), timestep=sigma.float() * 1000,
                      encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled, return_dict=False)[0]
        return out.float()
