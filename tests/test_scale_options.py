"""Levers for large models: gradient checkpointing and the attention backend, on the tiny SD3 pipeline."""

import random

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.errors import ConfigError
from fdfo.models import SD3FlowModel


def _model(path):
    return SD3FlowModel(str(path), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16)


def _grads(model, seed):
    """Gradients of a loss on the velocity at fresh random inputs, and how often block 0 ran forward."""
    calls = []
    # (a pre-hook: recomputation stops early, once it has what backward needs)
    handle = model.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(3, *model.latent_shape, generator=g), torch.rand(3, generator=g)
    cond = model.encode(["a cat", "a dog", "a red cube"])
    target = torch.randn(3, *model.latent_shape, generator=g)
    model.transformer.zero_grad(set_to_none=True)
    (model.velocity(x, sigma, cond) - target).pow(2).mean().backward()
    handle.remove()
    return {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipeline_dir, lora):
    seed = random.randrange(10**6)
    grads = {}
    for checkpointing in (False, True):
        model = _model(tiny_pipeline_dir)
        torch.manual_seed(seed)  # the same LoRA initialisation for both
        model.add_lora(LoraConfig(rank=4, alpha=8.0)) if lora else model.enable_full_finetune()
        if lora:  # (gaussian LoRA init starts B at zero; move it so that every LoRA weight has a gradient)
            for n, p in model.transformer.named_parameters():
                if "lora_B" in n:
                    p.data.normal_(std=0.02)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.transformer.train()
        grads[checkpointing], calls = _grads(model, seed)
        assert calls == (2 if checkpointing else 1)  # the block ran again in backward: activations not kept
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_under_zero3_trains_like_without(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from pathlib import Path

    from fdfo.trainer import Trainer
    from tests.test_train import QUIET, lora_weights, tiny_run

    zero3 = str(Path(__file__).resolve().parents[1] / "configs" / "ds" / "zero3.json")
    finals = {}
    for checkpointing in (False, True):
        cfg = tiny_run(tmp_path / str(checkpointing), tiny_pipeline_dir, digit_reward_dir, **dict(
            QUIET, train={"epochs": 1, "gradient_checkpointing": checkpointing}, deepspeed={"config": zero3}))
        t = Trainer(cfg)
        assert t.engine.zero_stage == 3 and t.model.transformer.gradient_checkpointing == checkpointing
        t.run()
        finals[checkpointing] = lora_weights(t)
    for k in finals[False]:
        torch.testing.assert_close(finals[True][k], finals[False][k], rtol=1e-5, atol=1e-7)


def test_attention_backend_forces_a_pytorch_sdpa_kernel(tiny_pipeline_dir):
    from fdfo.settings import build_config

    g = torch.Generator().manual_seed(random.randrange(10**6))
    model = _model(tiny_pipeline_dir)
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = model.encode(["a cat", "a dog"])
    with torch.no_grad():
        expected = model.velocity(x, sigma, cond)
        model.set_attention_backend("_native_math")  # PyTorch's reference kernel: on any device
        torch.testing.assert_close(model.velocity(x, sigma, cond), expected, rtol=1e-4, atol=1e-5)
        if not torch.cuda.is_available():  # the choice reaches every forward: cuDNN attention has no CPU kernel
            model.set_attention_backend("_native_cudnn")
            with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
                model.velocity(x, sigma, cond)
        model.set_attention_backend("native")
        torch.testing.assert_close(model.velocity(x, sigma, cond), expected, rtol=0, atol=0)
    for name in ("flash", "sage", "flashy"):
        with pytest.raises(ConfigError, match=f"'{name}' is not available for SD3.*_native_math"):
            model.set_attention_backend(name)
        with pytest.raises(ConfigError, match=f"model.attention_backend '{name}' is not available for sd3"):
            SD3FlowModel.check_settings(build_config({"model": {"attention_backend": name}}).model)  # before loading
