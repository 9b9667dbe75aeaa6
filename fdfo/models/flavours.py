"""The SD3.5 architecture flavours, from the published configs.

``ARCHS`` holds the keyword arguments of diffusers' ``SD3Transformer2DModel`` for the
transformers of the published SD3.5 Medium and SD3.5 Large checkpoints (their
``transformer/config.json``), and a tiny transformer of the same architecture for CPU
smoke runs. Benchmarks build random-init transformers from them: speed does not depend on
the weight values. ``sample_size`` is the latent side the model was trained at (1024²
images); a 512² image is a 64×64 latent.
"""

from __future__ import annotations

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
