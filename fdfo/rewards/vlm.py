"""The VLM yes/no alignment reward (docs/algorithm.md §2) with Qwen2.5-VL through transformers.

For each (prompt, image) the VLM is asked, in its chat format,

    Does this image match the caption "<prompt>"? Answer Yes or No.

and the reward is ``100·sigmoid(logit(Yes) − logit(No))`` of the next-token
logits at the last position (the start of the assistant's answer), so it lies
in [0, 100]. Images are resized to 504×504 (bicubic, antialiased) and
quantised to 8 bits before the checkpoint's image processor patchifies them.

Inputs are built from the checkpoint's tokenizer (and its chat template) and
its image processor, the two parts of the Qwen2.5-VL processor: each image
placeholder is expanded to ``t·h·w / merge²`` image tokens as the processor
does. (The processor class itself also wants a video processor, which needs
torchvision; scoring images does not.) Prompts are left-padded, so the last
position of every row is its answer position.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from fdfo.rewards.base import FrozenRewardModel, dtype_kwargs, load_pretrained, resolve_source, to_uint8

QWEN25_VL_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
QUESTION = 'Does this image match the caption "{caption}"? Answer Yes or No.'
IMAGE_SIZE = 504  # 18 merged 28-pixel patches per side

# Qwen2-VL / Qwen2.5-VL chat format, used when a checkpoint's tokenizer carries no template.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class VLMYesNoReward(FrozenRewardModel):
    """100·sigmoid(logit(Yes) − logit(No)) of Qwen2.5-VL asked whether the image matches the prompt."""

    name = "vlm_alignment"

    def __init__(self, path: str | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, batch_size: int = 4, image_size: int = IMAGE_SIZE,
                 question: str = QUESTION):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        super().__init__(device, dtype, batch_size)
        self.source = resolve_source(path, QWEN25_VL_7B, self.name)
        self.model = self._freeze(load_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained, self.source,
                                                  self.name, **dtype_kwargs(self.dtype)))
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.source, self.name)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_processor = load_pretrained(AutoImageProcessor.from_pretrained, self.source, self.name)
        self.chat_template = self.tokenizer.chat_template or QWEN_VL_CHAT_TEMPLATE
        self.question = question
        self.image_size = image_size
        unit = self.image_processor.patch_size * self.image_processor.merge_size
        if image_size % unit:
            raise ValueError(f"reward '{self.name}': image_size {image_size} must be a multiple of {unit} "
                             "(patch size × merge size), or the processor would resize it again")
        self.image_token = "<|image_pad|>"
        self.image_token_id = self.model.config.image_token_id
        self.yes_id, self.no_id = self._single_token("Yes"), self._single_token("No")
        params = inspect.signature(self.model.forward).parameters
        self._extra = {k: v for k, v in (("logits_to_keep", 1), ("use_cache", False)) if k in params}
        self._wants_mm_types = "mm_token_type_ids" in params

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"reward '{self.name}': the tokenizer of '{self.source}' splits '{word}' into {ids}; "
                             "the yes/no score needs it to be one token")
        return ids[0]

    def prompt_text(self, caption: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.question.format(caption=caption)}]}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def inputs(self, prompts: list[str], images: Tensor) -> dict:
        """Model inputs for a batch: token ids with expanded image tokens, pixel patches, grid sizes."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.detach().float(), size=(self.image_size, self.image_size), mode="bicubic",
                                   antialias=True, align_corners=False)
        vision = self.image_processor(images=list(to_uint8(images)), return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        texts = []
        for caption, grid in zip(prompts, vision["image_grid_thw"]):
            text = self.prompt_text(caption)
            if text.count(self.image_token) != 1:
                raise ValueError(f"reward '{self.name}': the chat template must place exactly one "
                                 f"{self.image_token} per image")
            texts.append(text.replace(self.image_token, self.image_token * (int(grid.prod()) // merge)))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        batch = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     pixel_values=vision["pixel_values"].to(self.dtype), image_grid_thw=vision["image_grid_thw"])
        if self._wants_mm_types:
            batch["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).int()
        return {k: v.to(self.device) for k, v in batch.items()}

    def _score_batch(self, prompts: list[str], images: Tensor) -> Tensor:
        logits = self.model(**self.inputs(prompts, images), **self._extra).logits[:, -1].float()  # [b, vocab]
        return 100.0 * torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id])
