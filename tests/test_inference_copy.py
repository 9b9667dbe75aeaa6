"""ZeRO-3 sampling from the persistent inference copy (one rank, in process, DS_ACCELERATOR=cpu)."""

from pathlib import Path

import torch

from tests.test_train import QUIET, tiny_run

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward_mean", "reward_std", "loss", "policy_loss", "ratio", "kl")


def _trainer(out, tiny_pipeline_dir, digit_reward_dir, **deepspeed):
    from fdfo.trainer import Trainer

    return Trainer(tiny_run(out, tiny_pipeline_dir, digit_reward_dir, fdfo={"kl_weight": 0.5},
                            deepspeed={"config": str(ROOT / "configs/ds/zero3.json"), **deepspeed}, **QUIET))


def test_zero3_samples_from_a_persistent_copy_equal_to_the_gathered_weights(tmp_path, tiny_pipeline_dir,
                                                                              digit_reward_dir):
    import deepspeed

    a = _trainer(tmp_path / "copy", tiny_pipeline_dir, digit_reward_dir)
    copy = a.model.inference_transformer
    assert copy is not None and copy is not a.model.transformer
    ptrs = [p.data_ptr() for p in copy.parameters()]
    lora_before = {n: p.clone() for n, p in copy.named_parameters() if "lora_" in n}
    records_a = [a.train_epoch(e) for e in range(2)]

    assert not any(p.requires_grad for p in copy.parameters())  # (the KL pass toggled its adapter)
    # Never reallocated (a CUDA graph over it stays valid), yet it follows training: after a refresh
    # it holds exactly the partitioned module's gathered weights, LoRA and frozen base alike.
    assert ptrs == [p.data_ptr() for p in copy.parameters()]
    with a.engine.inference_weights():  # (the refresh happens on entering)
        pass
    source = dict(a.model.transformer.named_parameters())
    with deepspeed.zero.GatheredParameters(list(source.values()), modifier_rank=None):
        for name, p in copy.named_parameters():
            assert p.dtype == source[name].dtype and torch.equal(p, source[name].data), name
    assert any(not torch.equal(p, lora_before[n]) for n, p in copy.named_parameters() if "lora_" in n)

    # The same epochs sampled from the gathered module itself (deepspeed.inference_copy: false); the KL
    # term's base pass (the copy with its adapter disabled, or the partitioned module) agrees as well.
    b = _trainer(tmp_path / "gather", tiny_pipeline_dir, digit_reward_dir, inference_copy=False)
    assert b.model.inference_transformer is None
    records_b = [b.train_epoch(e) for e in range(2)]
    for ra, rb in zip(records_a, records_b):
        for key in KEYS:
            assert ra[key] == rb[key], key
