"""FLUX.1 flow models ([dev], [schnell]) through diffusers components.

The same protocol as ``SD3FlowModel``, so sampling, the kernels and the
training loop see no difference: the state is the VAE's unpacked latent
[B, 16, H/8, W/8] (the kernels are elementwise over it). Only the transformer
call packs it into FLUX's 2×2-patch token sequence, with the image position
ids and the all-zero text ids FluxPipeline builds, and unpacks the predicted
velocity again; diffusers' own static helpers do both, so the layout cannot
drift from the pipeline's.

FLUX.1 [dev] is guidance-distilled: the guidance strength is an input of the
transformer (``flux.guidance``, FluxPipeline's ``guidance_scale``), not a
second forward. Real classifier-free guidance (``guidance_scale`` of
``velocity`` with a negative prompt) works as for SD3 and is off by default.

The σ grid is FluxPipeline's: ``linspace(1, 1/T, T)`` shifted by the
resolution-dependent ``mu`` of the scheduler config (``use_dynamic_shifting``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fdfo.config import above, check
from fdfo.errors import ConfigError
from fdfo.models.base import Conditioning, FlowModel, components

COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class FluxOptions:
    """FLUX.1's own settings (read when model.path is a FLUX.1 pipeline)."""

    # FLUX.1 [dev]'s distilled guidance strength, an input of its transformer (FluxPipeline's guidance_scale);
    # [schnell] takes none.
    guidance: float = field(default=3.5, metadata=check(above(0)))


class FluxFlowModel(FlowModel):
    """FLUX.1 pipelines (``FluxPipeline``'s components)."""

    family = "flux"
    TRANSFORMER = "FluxTransformer2DModel"
    PIPELINE = "FluxPipeline"
    Options = FluxOptions
    PATCH = 2  # the pipeline packs 2×2 latent patches into a token (the transformer's patch_size is 1)
    # Attention projections of the double-stream blocks (image and text streams) and of the single-stream
    # blocks. A single block has no attention output projection of its own: its `proj_out` maps the
    # concatenated attention and MLP outputs, and is its output projection. The model's final layer is
    # also named `proj_out`; ``add_lora`` keeps it out.
    LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "proj_out")

    def __init__(self, path: str, *, device: torch.device, dtype: torch.dtype, revision: str | None = None,
                 max_sequence_length: int = 512, resolution: int | None = None, shift: float | None = None,
                 guidance: float = 3.5):
        """shift: None = the scheduler's resolution-dependent shift (FluxPipeline's); a number replaces it
        by that fixed shift. guidance: the distilled guidance strength given to the transformer when it
        takes one (FLUX.1 [dev]: ``guidance_embeds``); ignored otherwise ([schnell])."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        index, _ = components(path, revision, COMPONENTS, required=COMPONENTS)
        if index["transformer"][1] != FluxTransformer2DModel.__name__:
            raise ConfigError(f"model.path '{path}' holds a {index['transformer'][1]}, not a FLUX.1 "
                              f"{FluxTransformer2DModel.__name__}")
        if max_sequence_length > 512:  # FluxPipeline's limit: T5's positions FLUX was trained with
            raise ConfigError(f"model.max_sequence_length {max_sequence_length} is above FLUX's 512")
        kw = dict(revision=revision)
        load = lambda cls, sub, **extra: cls.from_pretrained(path, subfolder=sub, **kw, **extra)  # noqa: E731
        self.device, self.dtype = device, dtype
        self.transformer = load(FluxTransformer2DModel, "transformer", torch_dtype=dtype).to(device)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        if shift is not None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=shift,
                                                                    use_dynamic_shifting=False)
        self.vae = load(AutoencoderKL, "vae", torch_dtype=dtype).to(device)
        self.pipe = FluxPipeline(
            transformer=self.transformer, scheduler=scheduler, vae=self.vae,
            text_encoder=load(CLIPTextModel, "text_encoder", torch_dtype=dtype).to(device),
            text_encoder_2=load(T5EncoderModel, "text_encoder_2", torch_dtype=dtype).to(device),
            tokenizer=load(AutoTokenizer, "tokenizer"), tokenizer_2=load(AutoTokenizer, "tokenizer_2"),
        )
        self.freeze()
        self._init_state(guidance)
        self.max_sequence_length = max_sequence_length
        scale = self.pipe.vae_scale_factor
        resolution = resolution or self.pipe.default_sample_size * scale  # FluxPipeline's default size
        if resolution % (2 * scale):
            raise ConfigError(f"model.resolution {resolution} must be a multiple of {2 * scale} for FLUX "
                              f"(VAE factor {scale} × the 2×2 patches)")
        side = resolution // scale
        self.latent_shape = (self.transformer.config.in_channels // 4, side, side)  # [C, H, W], unpacked
        self.path = path

    def _init_state(self, guidance: float) -> None:
        super()._init_state()
        self.flux_guidance = guidance
        # Position ids and guidance vectors per shape and device, built once: a tensor made on the CPU and
        # copied to the GPU inside a CUDA-graph capture would fail (the sampler's warm-up builds them first).
        self._inputs: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ components

    def text_encoders(self) -> list[nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @classmethod
    def attention_backends(cls) -> tuple[str, ...]:
        """diffusers' attention backends (FLUX's attention processor dispatches through them)."""
        from diffusers.models.attention_dispatch import AttentionBackendName

        return tuple(b.value for b in AttentionBackendName)

    @classmethod
    def check_settings(cls, model_cfg) -> None:
        """The protocol's checks, and an attention backend whose package is missing (flash-attn,
        sageattention, xformers, ...): all before any weight is read."""
        super().check_settings(model_cfg)
        check_backend_usable(model_cfg.attention_backend)

    def set_attention_backend(self, name: str) -> None:
        """Choose the attention kernel among diffusers' attention backends: ``native`` (PyTorch SDPA picks
        one), PyTorch's kernels forced (``_native_flash``, ``_native_cudnn``, ``_native_efficient``,
        ``_native_math``), or a library's (``flash`` for flash-attn, ``_flash_3``, ``sage``, ``xformers``, ...).

        diffusers' FLUX attention processor calls ``dispatch_attention_fn`` with the backend stored on the
        processor, so the transformer's own ``set_attention_backend`` applies the choice to every FLUX
        attention. It also makes the choice diffusers' process-wide default, which reaches a copy of the
        transformer built later (the ZeRO-3 inference copy) through its unset processors. A backend whose
        package is missing is a ConfigError naming the package (diffusers' own check)."""
        valid = self.attention_backends()
        if name not in valid:
            raise ConfigError(f"model.attention_backend '{name}' is not one of diffusers' attention backends: "
                              f"{', '.join(valid)}")
        check_backend_usable(name)
        try:
            self.transformer.set_attention_backend(name)
        except (RuntimeError, ImportError, ValueError) as exc:
            raise ConfigError(f"model.attention_backend '{name}' is not usable here: {exc}") from exc
        self.attention_backend = name

    def lora_targets(self, names: list[str]) -> list[str]:
        """peft matches a name by its end, so a bare ``proj_out`` (the single blocks' output projection) would
        also reach the model's final layer, the top-level ``proj_out``: it is replaced by the single blocks'
        full names, which the saved adapter config then lists for diffusers' loader."""
        targets = [t for t in names if t != "proj_out"]
        if len(targets) < len(names):
            blocks = len(self.transformer.single_transformer_blocks)
            targets += [f"single_transformer_blocks.{i}.proj_out" for i in range(blocks)]
        return targets

    # ------------------------------------------------------------------ the protocol

    def sigmas(self, steps: int) -> torch.Tensor:
        """FluxPipeline's σ grid for `steps` solver steps at this model's resolution: [steps + 1], ending at 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipe.scheduler
        cfg = scheduler.config
        _, h, w = self.latent_shape
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),  # tokens of the image
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler.sigmas.detach().clone().float()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """T5's sequence [B, L, D] and CLIP's pooled vector [B, 768] (the text ids are FLUX's zeros: not kept)."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds.to(self.dtype), pooled.to(self.dtype))

    def _ids(self, h: int, w: int, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """FluxPipeline's position ids: (row, column) of each 2×2 patch [h/2·w/2, 3], zeros for the text [L, 3]."""
        from diffusers import FluxPipeline

        key = ("ids", h, w, text_len, device)
        if key not in self._inputs:
            self._inputs[key] = (FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, self.dtype),
                                 torch.zeros(text_len, 3, device=device, dtype=self.dtype))
        return self._inputs[key]

    def _guidance(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The distilled guidance input [rows] (fp32, as FluxPipeline), or None for a model without one."""
        if not self.transformer.config.guidance_embeds:
            return None
        key = ("guidance", rows, device, self.flux_guidance)
        if key not in self._inputs:
            self._inputs[key] = torch.full((rows,), self.flux_guidance, device=device, dtype=torch.float32)
        return self._inputs[key]

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from diffusers import FluxPipeline

        rows, channels, h, w = x.shape
        tokens = FluxPipeline._pack_latents(x.to(self.dtype).contiguous(), rows, channels, h, w)  # [B, h/2·w/2, 4C]
        img_ids, txt_ids = self._ids(h, w, cond.embeds.shape[1], x.device)
        # FluxPipeline gives σ (timestep / 1000); it is passed in fp32 whatever the weights' dtype. The
        # transformer itself then casts σ and the guidance to its weights' dtype before scaling by 1000
        # (diffusers' FLUX forward, as the reference FLUX sampler feeds t in the latents' dtype).
        out = net(hidden_states=tokens, timestep=sigma.float(), guidance=self._guidance(rows, x.device),
                  pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                  img_ids=img_ids, return_dict=False)[0]
        scale = self.pipe.vae_scale_factor  # _unpack_latents takes the image size in pixels
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale).float()


def check_backend_usable(name: str) -> None:
    """A ConfigError naming the missing package when diffusers' attention backend ``name`` cannot run here
    (diffusers' own requirement check, which ``set_attention_backend`` runs too); nothing for a name that
    is not a backend (the caller lists the valid ones)."""
    from diffusers.models import attention_dispatch

    check = getattr(attention_dispatch, "_check_attention_backend_requirements", None)
    try:
        backend = attention_dispatch.AttentionBackendName(name)
    except ValueError:
        return
    if check is None:  # (a diffusers without the check: set_attention_backend reports it)
        return
    try:
        check(backend)
    except (RuntimeError, ImportError, ValueError) as exc:
        raise ConfigError(f"model.attention_backend '{name}' is not usable here: {exc}") from exc
