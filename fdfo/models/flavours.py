"""The transformer architectures of the published checkpoints, from their configs, for benchmarks.

``ARCHS`` holds the keyword arguments of diffusers' ``SD3Transformer2DModel`` for the
transformers of the published SD3.5 Medium and SD3.5 Large checkpoints (their
``transformer/config.json``), and a tiny transformer of the same architecture for CPU
smoke runs. ``FLUX_ARCHS`` holds those of ``FluxTransformer2DModel`` for the published
FLUX.1 [dev] transformer (19 double-stream and 38 single-stream blocks, 24 heads of 128,
the distilled guidance input) and a tiny one. Benchmarks build random-init transformers
from them, each inside its family's flow model (``flow_model``), so they time the very
transformer call and LoRA set-up that training runs: speed does not depend on the weight values.

``sample_size(name)`` is the latent side the model was trained at (1024² images, VAE factor
8); a 512² image is a 64×64 latent (for FLUX, unpacked: 32×32 tokens of 2×2 patches).
"""

from __future__ import annotations

import torch
from torch import nn

ARCHS: dict[str, dict] = {
    "sd35-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                       attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                       caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
    "tiny": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
                 pooled_projection_dim=64, pos_embed_max_size=8),
}

FLUX_ARCHS: dict[str, dict] = {
    # black-forest-labs/FLUX.1-dev, transformer/config.json: 16 latent channels packed 2×2 into 64,
    # T5-XXL's 4096-wide sequence, CLIP-L's 768-wide pooled vector, rotary axes (text, row, column).
    "flux1-dev": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                      guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "flux-tiny": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                      guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}

# The FLUX latent sides (FluxPipeline's default_sample_size: 1024² images), as SD3's sample_size.
_FLUX_SAMPLE_SIZE = {"flux1-dev": 128, "flux-tiny": 8}


def names() -> list[str]:
    return sorted(ARCHS) + sorted(FLUX_ARCHS)


def _check(name: str) -> None:
    if name not in ARCHS and name not in FLUX_ARCHS:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(names())}")


def family(name: str):
    """The ``FlowModel`` family of an architecture (``SD3FlowModel`` or ``FluxFlowModel``)."""
    from fdfo.models.flux import FluxFlowModel
    from fdfo.models.sd3 import SD3FlowModel

    _check(name)
    return SD3FlowModel if name in ARCHS else FluxFlowModel


def kwargs(name: str) -> dict:
    """The transformer's keyword arguments."""
    _check(name)
    return dict(ARCHS.get(name) or FLUX_ARCHS[name])


def build(name: str) -> nn.Module:
    """A random-init transformer of the architecture, on torch's current default device (e.g. inside
    ``with torch.device("meta")`` for shapes only, or ``"cuda"`` for a fast init)."""
    return family(name).transformer_class()(**kwargs(name))


def flow_model(name: str, device: torch.device, dtype: torch.dtype):
    """The family's flow model (``FlowModel.from_transformer``) around a random-init transformer of the
    architecture, built on ``device`` (seconds on a GPU, where the host takes minutes for billions of
    parameters) in ``dtype``; random draws from torch's global generator."""
    with torch.device(device):
        transformer = build(name).to(dtype)
    return family(name).from_transformer(transformer, device=device, dtype=dtype)


def sample_size(name: str) -> int:
    """The latent side (unpacked) of the resolution the model was trained at."""
    _check(name)
    return ARCHS[name]["sample_size"] if name in ARCHS else _FLUX_SAMPLE_SIZE[name]


def parameter_count(name: str) -> int:
    """The transformer's parameter count, from shapes only (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(name).parameters())
