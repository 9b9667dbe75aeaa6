"""CLIP-based scores through transformers' ``CLIPModel``: CLIP score, HPSv2, CLIP diversity.

``ClipModel`` loads a CLIP checkpoint (hub id or ``save_pretrained`` directory
holding the model, its tokenizer and its image preprocessor) and embeds
prompts and images; the scores on top of it differ only in how the cosine
similarity is scaled:

* CLIP score: ``100·max(cos(img, text), 0)`` (the torchmetrics convention),
  with ViT-L/14 (``clip_score``) or ViT-H/14 (``clip_score_h14``);
* HPSv2: ``100·cos`` of the HPSv2 fine-tuned ViT-H/14 (the HPSv2 paper's
  tables report this ×100 value); only where its weights are given, in
  transformers ``CLIPModel`` format (``convert_hpsv2.py`` converts the released ones);
* PickScore (``pickscore.py``): ``logit_scale·cos``.

Images go through the checkpoint's own image processor (resize, centre crop,
normalise) as 8-bit RGB, exactly as the reward model saw images in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

# mean_pairwise_distance lives in base (DreamSim uses it too); it is still importable from here.
from fdfo.rewards.base import (FrozenRewardModel, RewardUnavailable, dtype_kwargs, load_pretrained,
                               mean_pairwise_distance, resolve_source, to_uint8)

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipModel(FrozenRewardModel):
    """A frozen CLIPModel with its tokenizer and image processor; embeddings are L2-normalised."""

    default_path: str | None = CLIP_L14

    def __init__(self, path: str | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, batch_size: int = 16, max_length: int = 77,
                 processor_path: str | None = None):
        """processor_path: where the tokenizer and image processor are, if not beside the weights."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        super().__init__(device, dtype, batch_size)
        self.source = resolve_source(path, self.default_path, self.name)
        self.model = self._freeze(load_pretrained(CLIPModel.from_pretrained, self.source, self.name,
                                                  **dtype_kwargs(self.dtype)))
        proc = resolve_source(processor_path, None, self.name) if processor_path else self.source
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, proc, self.name)
        self.image_processor = load_pretrained(AutoImageProcessor.from_pretrained, proc, self.name)
        self.max_length = min(max_length, self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _features(out) -> Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """[B, C, H, W] in [0, 1] -> unit vectors [B, D] (float32, on self.device)."""
        pixels = self.image_processor(images=list(to_uint8(images)), return_tensors="pt")["pixel_values"]
        feats = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> Tensor:
        """Prompts -> unit vectors [B, D]; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        feats = self._features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"]))
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats[[unique.index(p) for p in prompts]]

    def cosine(self, prompts: list[str], images: Tensor) -> Tensor:
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)  # [B]


class ClipScore(ClipModel):
    """CLIP score = 100·max(cos(image, prompt), 0), in [0, 100]."""

    name = "clip_score"

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        return 100.0 * self.cosine(prompts, images).clamp(min=0)


class ClipScoreH14(ClipScore):
    name = "clip_score_h14"
    default_path = CLIP_H14


class HPSv2(ClipModel):
    """HPSv2 = 100·cos(image, prompt) under the HPSv2 fine-tuned CLIP ViT-H/14, in [−100, 100].

    The official weights are an open_clip checkpoint (HPS_v2_compressed.pt /
    HPS_v2.1_compressed.pt); this class reads them once converted to a
    transformers CLIPModel directory with its tokenizer and image processor
    (``python -m fdfo.rewards.convert_hpsv2 HPS_v2.1_compressed.pt DIR``, offline).
    There is no default: without weights the metric is reported as not available.
    """

    name = "hpsv2"
    default_path = None

    def __init__(self, path: str | None = None, **kwargs):
        if path in (None, "", "default"):
            raise RewardUnavailable(
                "HPSv2 is not available: no weights given. Convert the HPSv2 open_clip checkpoint "
                "(python -m fdfo.rewards.convert_hpsv2 HPS_v2.1_compressed.pt DIR) and pass DIR "
                "(reward.paths.hpsv2 or --path hpsv2=DIR)")
        super().__init__(path, **kwargs)

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        return 100.0 * self.cosine(prompts, images)


class ClipImageDiversity(ClipModel):
    """CLIP diversity of the images of one prompt: mean pairwise (1 − cos) of their CLIP image embeddings
    (ViT-L/14 by default): 0 for identical images, larger for more varied ones (at most 2). The published
    diversity figure is DreamSim's (``fdfo.rewards.dreamsim``), a different embedding."""

    name = "clip_diversity"
    note = ("mean pairwise (1 - cosine) of CLIP image embeddings across the repeats of each prompt, averaged over "
            "prompts")

    def diversity(self, images: Tensor) -> Tensor:
        """The CLIP diversity of one prompt's images (NaN for one image)."""
        return mean_pairwise_distance(self.embed_images(images).cpu())
