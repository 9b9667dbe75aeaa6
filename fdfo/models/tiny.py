"""Tiny SD3-architecture pipelines built offline from random weights.

Used for the CPU default job's base model (pixel space, no VAE) and for tests
of the real loading path: the pipeline is written with ``save_pretrained`` and
read back with the same ``from_pretrained`` code that loads SD3.5 Medium.

The CLIP BPE tokenizer is rebuilt from the vocabulary file that ships inside
the open_clip_torch wheel (located, never imported), so no hub is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from fdfo.context import global_rng

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(out_dir: str | Path) -> Path:
    """Write vocab.json + merges.txt of the CLIP BPE tokenizer into out_dir."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP vocabulary ships in the open_clip_torch wheel; install it with "
                                "`pip install --no-deps open_clip_torch==3.3.0` (or run scripts/bootstrap.sh)")
    vocab_file = Path(list(spec.submodule_search_locations)[0]) / CLIP_VOCAB_FILE
    lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def clip_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built from the offline vocabulary.

    It is built from the vocabulary and merges in memory (transformers 5's
    tokenizers-backed class); tests check its ids against known CLIP ids.
    """
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = write_clip_tokenizer_files(tmp)
        vocab = json.loads((out / "vocab.json").read_text())
        merges = [tuple(m.split()) for m in (out / "merges.txt").read_text().split("\n")[1:] if m]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_sd3_pipeline(
    *,
    sample_size: int = 8,
    in_channels: int = 4,
    patch_size: int = 2,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    clip_hidden: int = 32,
    t5_dim: int = 64,
    max_text_tokens: int = 16,
    with_vae: bool = True,
    with_t5: bool = True,
    shift: float = 3.0,
    dual_attention_layers: tuple[int, ...] = (),
    seed: int = 0,
):
    """A StableDiffusion3Pipeline with the real component classes at tiny random size.

    sample_size is in latent pixels; with a VAE the image side is 2x that (one
    down-sampling block), without one the model works directly in pixel space.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with global_rng(seed):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, out_channels=in_channels,
            num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=t5_dim, caption_projection_dim=num_attention_heads * attention_head_dim,
            pooled_projection_dim=2 * clip_hidden, pos_embed_max_size=max(sample_size // patch_size, 2),
            dual_attention_layers=dual_attention_layers,  # SD3.5 Medium's blocks with a second self-attention
        )
        clip_cfg = dict(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=clip_hidden, intermediate_size=2 * clip_hidden,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_text_tokens,
            projection_dim=clip_hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            hidden_act="gelu",
        )
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        tokenizer = clip_tokenizer(max_text_tokens)
        text_encoder_3 = tokenizer_3 = None
        if with_t5:
            tokenizer_3 = ByT5Tokenizer()
            text_encoder_3 = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer_3), d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=2, num_heads=2,
                relative_attention_num_buckets=8,
            ))
        vae = None
        if with_vae:
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=in_channels, norm_num_groups=4, sample_size=2 * sample_size,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
            )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )
        return pipe


def build_tiny_flux_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    clip_hidden: int = 32,
    t5_dim: int = 32,
    max_text_tokens: int = 16,
    guidance_embeds: bool = True,
    seed: int = 0,
):
    """A FluxPipeline with the real component classes at tiny random size.

    As FLUX.1: 16 latent channels packed into 2×2 patches (transformer in_channels 64), a CLIP text
    model for the pooled vector and T5 for the sequence, a VAE with FLUX's scaling and shift factors
    (one down-sampling block here, so the image side is 2× the latent side), and the scheduler's
    resolution-dependent shift. ``guidance_embeds``: FLUX.1 [dev]'s distilled guidance input (False:
    [schnell]'s architecture).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    latent_channels = 16
    with global_rng(seed):
        # The rotary axes (text index, row, column) split each head's dimensions as FLUX's (16, 56, 56) splits 128.
        rope_side = attention_head_dim * 7 // 16 // 2 * 2
        rope = (attention_head_dim - 2 * rope_side, rope_side, rope_side)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads, joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_hidden, guidance_embeds=guidance_embeds, axes_dims_rope=rope,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=clip_hidden, intermediate_size=2 * clip_hidden,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_text_tokens,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
        ))
        tokenizer_2 = ByT5Tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
            layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(max_text_tokens),
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        )
