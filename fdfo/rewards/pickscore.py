"""PickScore (Kirstain et al. 2023): a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

    score = logit_scale.exp() · cos(image embedding, prompt embedding)

exactly as the reference implementation computes it (about 18-23 for typical
SD images; the bound is ±logit_scale.exp() = ±100). The weights are
``yuvalkirstain/PickScore_v1``; its processor is the one of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, used by default when the hub id is
given. A local directory must hold both (``save_pretrained`` the model and
the CLIP-H processor into it) unless ``processor_path`` says where it is.
"""

from __future__ import annotations

from torch import Tensor

from fdfo.rewards.base import resolve_source
from fdfo.rewards.clip_score import CLIP_H14, ClipModel

PICKSCORE = "yuvalkirstain/PickScore_v1"


class PickScore(ClipModel):
    name = "pickscore"
    default_path = PICKSCORE

    def __init__(self, path: str | None = None, *, processor_path: str | None = None, **kwargs):
        if processor_path is None and resolve_source(path, PICKSCORE, self.name) == PICKSCORE:
            processor_path = CLIP_H14  # the published model repository holds no tokenizer/preprocessor
        super().__init__(path, processor_path=processor_path, **kwargs)

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(prompts, images)
