"""Pretrained rewards at tiny random size, saved with save_pretrained and loaded through the real code path:
PickScore, CLIP score, HPSv2 (CLIPModel) and the VLM yes/no reward (Qwen2.5-VL); presets and the weighted sum."""

from __future__ import annotations

import warnings

import pytest
import torch

from fdfo.rewards import (PRESETS, REGISTRY, RewardUnavailable, build_reward, build_weighted_reward,
                          preset_weights, reward_factories)

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "a red bicycle leaning on a wall", "a photo of a cat", "two birds on a wire"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from fdfo.rewards.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from fdfo.rewards.tiny import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny_qwen_vl"), seed=0)


def images(n=4, c=3, h=40, w=48, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def one_by_one(reward, prompts, imgs):
    return torch.cat([reward(prompts[i:i + 1], imgs[i:i + 1]) for i in range(len(prompts))])


def test_pickscore_is_logit_scale_times_cosine_and_batch_invariant(clip_dir):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    reward = build_reward("pickscore", str(clip_dir), CPU, batch_size=4)
    x = images()
    s = reward(PROMPTS, x)
    assert s.shape == (4,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    bound = float(reward.model.logit_scale.exp())
    assert (s.abs() <= bound + 1e-4).all()
    torch.testing.assert_close(one_by_one(reward, PROMPTS, x), s, rtol=0, atol=1e-4)
    torch.testing.assert_close(build_reward("pickscore", str(clip_dir), CPU, batch_size=3)(PROMPTS, x), s,
                               rtol=0, atol=1e-4)
    assert not torch.allclose(s[0], s[1])

    # The reference formula of PickScore: CLIPModel's logits_per_image (logit_scale·cos), diagonal.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok, proc = AutoTokenizer.from_pretrained(clip_dir), AutoImageProcessor.from_pretrained(clip_dir)
    pixels = proc(images=[(im * 255).round().to(torch.uint8) for im in x], return_tensors="pt")["pixel_values"]
    text = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                    pixel_values=pixels).logits_per_image.diagonal()
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)


def test_clip_score_hpsv2_ranges_grey_images_and_missing_weights(clip_dir):
    x = images(seed=1)
    cs = build_reward("clip_score", str(clip_dir), CPU)
    hps = build_reward("hpsv2", str(clip_dir), CPU)
    cos = cs.cosine(PROMPTS, x)
    s_cs, s_hps = cs(PROMPTS, x), hps(PROMPTS, x)
    assert s_cs.shape == s_hps.shape == (4,)
    assert (s_cs >= 0).all() and (s_cs <= 100).all() and (s_hps.abs() <= 100).all()
    torch.testing.assert_close(s_cs, 100 * cos.clamp(min=0), rtol=0, atol=1e-4)
    torch.testing.assert_close(s_hps, 100 * cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(one_by_one(hps, PROMPTS, x), s_hps, rtol=0, atol=1e-3)
    grey = x[:, :1]  # one channel (the digits model's images) is scored as grey RGB
    torch.testing.assert_close(hps(PROMPTS, grey), hps(PROMPTS, grey.expand(-1, 3, -1, -1)))

    with pytest.raises(RewardUnavailable, match="HPSv2 is not available"):
        build_reward("hpsv2", None, CPU)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward("pickscore", "/nonexistent/pickscore", CPU)
    with pytest.raises(FileNotFoundError, match="is a file"):
        build_reward("clip_score", str(clip_dir / "config.json"), CPU)


def test_nonfinite_image_gets_a_nan_score_and_a_warning_with_its_prompt(clip_dir):
    x = images(seed=2)
    x[1, 0, 3, 3] = float("nan")
    weighted = build_weighted_reward({"pickscore": 1.0, "clip_score": 0.5},
                                     {"pickscore": str(clip_dir), "clip_score": str(clip_dir)}, CPU,
                                     options={"pickscore": {"batch_size": 2}})
    assert weighted.terms["pickscore"][1].batch_size == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total, parts = weighted(PROMPTS, x)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    for name, msg in zip(("clip_score", "pickscore"), messages):
        assert msg.startswith(f"non-finite reward '{name}' for 1 of 4 image(s): #1 'a red bicycle")
    assert torch.isnan(total[1]) and torch.isfinite(total[[0, 2, 3]]).all()
    torch.testing.assert_close(total, parts["pickscore"] + 0.5 * parts["clip_score"], equal_nan=True)


def test_presets_and_registry():
    assert preset_weights("combined") == {"pickscore": 1.0, "vlm_alignment": 0.1}
    assert preset_weights("pickscore") == {"pickscore": 1.0}
    assert preset_weights("vlm_alignment") == {"vlm_alignment": 1.0}
    assert set(PRESETS) == {"pickscore", "vlm_alignment", "combined"}
    assert set(REGISTRY) == {"pickscore", "vlm_alignment", "clip_score", "clip_score_h14", "hpsv2", "remote"}
    # The built-in tasks' rewards come from their task, not from this registry.
    assert set(reward_factories()) == set(REGISTRY) | {"digit_probability", "digit_judge_accuracy"}
    with pytest.raises(ValueError, match="available presets"):
        preset_weights("aesthetic")
    with pytest.raises(ValueError, match="available rewards: clip_score, clip_score_h14, digit_judge_accuracy"):
        build_reward("aesthetic", None, CPU)
    # Default config weights are the published 'combined' preset.
    from fdfo.config import RewardConfig

    assert RewardConfig().weights == preset_weights("combined")


def test_options_are_checked_and_honoured(clip_dir):
    reward = build_reward("clip_score", str(clip_dir), CPU, batch_size=3, dtype="float64")
    assert reward.batch_size == 3 and reward.dtype == torch.float64
    assert build_reward("clip_score", str(clip_dir), CPU).batch_size == 16  # the reward's own default
    with pytest.raises(ValueError, match="reward 'clip_score' takes no option 'batch_sise'; its options: "
                                         "batch_size, dtype"):
        build_reward("clip_score", str(clip_dir), CPU, batch_sise=3)
    with pytest.raises(ValueError, match="takes no option 'device'"):  # the device is an argument
        build_weighted_reward({"clip_score": 1.0}, {"clip_score": str(clip_dir)}, CPU,
                              options={"clip_score": {"device": "cpu"}})
    with pytest.raises(ValueError, match="reward 'digit_probability' takes no option 'dtype'; its options: "
                                         "batch_size"):
        build_reward("digit_probability", "unused", CPU, dtype="float32")


def test_vlm_yes_no_reward_shape_range_batch_invariance(qwen_dir):
    reward = build_reward("vlm_alignment", str(qwen_dir), CPU, batch_size=4)
    assert reward.image_size == 504
    x = images(seed=3, h=64, w=64)
    inputs = reward.inputs(PROMPTS[:1], x[:1])
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36]]  # resized to 504² = 36×36 patches of 14
    assert int((inputs["input_ids"] == reward.image_token_id).sum()) == 36 * 36 // 4
    text = reward.prompt_text("a cat")
    assert 'Does this image match the caption "a cat"? Answer Yes or No.' in text
    assert text.endswith("<|im_start|>assistant\n")

    s = reward(PROMPTS, x)
    assert s.shape == (4,) and s.dtype == torch.float32 and ((s >= 0) & (s <= 100)).all()
    torch.testing.assert_close(one_by_one(reward, PROMPTS, x), s, rtol=0, atol=1e-3)

    # Reference: the full forward (all positions' logits) of the padded batch, last position, Yes vs No.
    with torch.no_grad():
        logits = reward.model(**reward.inputs(PROMPTS, x)).logits[:, -1].float()
    ref = 100 * torch.sigmoid(logits[:, reward.yes_id] - logits[:, reward.no_id])
    torch.testing.assert_close(s, ref, rtol=0, atol=1e-3)
