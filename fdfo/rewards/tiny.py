"""Tiny random reward models, built offline with transformers' own classes, for tests and benchmarks.

Each builder writes a directory with ``save_pretrained`` (model, tokenizer,
image processor) that the real loading code reads like the published
weights: a CLIPModel with the real CLIP BPE tokenizer, and a
Qwen2.5-VL model with a small byte-level BPE tokenizer built in code (Qwen's
special tokens, and "Yes"/"No" as single tokens) and the Qwen2-VL image
processor. Scores are random but have the real shapes, ranges and code paths.
"""

from __future__ import annotations

from pathlib import Path

from fdfo.context import global_rng

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
_WORDS = ["Yes", "No", "Does", "this", "image", "match", "the", "caption", "Answer", "or", "user", "assistant",
          "system", "You", "are", "helpful"]


def _clip_image_processor(image_size: int):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, projection_dim: int = 16, logit_scale: float | None = None) -> Path:
    """A random CLIPModel (text + vision towers, 2 layers each) with the real CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from fdfo.models.tiny import CLIP_VOCAB_SIZE, clip_tokenizer

    with global_rng(seed):
        text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                    pad_token_id=49407, projection_dim=projection_dim)
        vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                      image_size=image_size, patch_size=patch_size, projection_dim=projection_dim)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
        if logit_scale is not None:
            model.logit_scale.data.fill_(logit_scale)
        out = Path(out_dir)
        model.save_pretrained(out)
        clip_tokenizer().save_pretrained(out)
        _clip_image_processor(image_size).save_pretrained(out)
        return out


def qwen_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's format: 256 byte symbols, merges that make a few words
    (Yes, No, ...) single tokens, and Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    from fdfo.models.tiny import _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        for w in (word, "Ġ" + word):  # Ġ is the byte-level symbol of a leading space
            cur = w[0]
            for ch in w[1:]:
                if cur + ch not in vocab:
                    merges.append((cur, ch))
                    vocab[cur + ch] = len(vocab)
                cur += ch
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    from fdfo.rewards.vlm import QWEN_VL_CHAT_TEMPLATE

    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


def build_tiny_qwen_vl(out_dir: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Qwen2_5_VLForConditionalGeneration (vision tower + language model) with tokenizer and
    image processor; the processor accepts the reward's 504×504 images unchanged."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import Qwen2VLImageProcessor as Processor

    with global_rng(seed):
        tok = qwen_tokenizer()
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        head_dim = hidden // 4
        cfg = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, bos_token_id=ids["<|endoftext|>"],
                             eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                              "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]}),
            vision_config=dict(depth=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2,
                               out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               window_size=112, fullatt_block_indexes=[layers - 1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
        out = Path(out_dir)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        Processor(min_pixels=28 * 28, max_pixels=1024 * 1024, patch_size=14, merge_size=2,
                  temporal_patch_size=2).save_pretrained(out)
        return out
