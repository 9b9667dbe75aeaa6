"""lora.dtype: a bf16 adapter beside a bf16 base, fp32 master weights in DeepSpeed's bf16 optimizer.

On CPU with the tiny SD3 transformer in bf16 (DeepSpeed's bf16 mode runs on its CPU accelerator): with
lora.dtype "auto" the adapted layers see bf16 activations only, the gradients and one optimizer step match
the fp32-adapter path ("float32", today's behaviour) within bf16 tolerance, gradient clipping and the
gradient norm work through DeepSpeed's wrapper, a checkpoint resumes exactly, and the exported adapter
(bf16: the weights the model sampled with) loads into bf16 and fp32 models.
"""

from __future__ import annotations

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.models import Conditioning, flavours

LR = 1e-2
# bf16 keeps 8 significant bits (relative rounding 2**-9 ≈ 0.2 %): through two transformer blocks forward and
# backward each LoRA gradient tensor differs from the fp32 adapter's by 0.2-1 % of its norm (1.9 % for the one
# whose gradient is 100 times smaller than the others); allowed: 5 %.
GRAD_RTOL = 0.05
# AdamW's first update is lr·g/(|g| + eps) ≈ lr·sign(g): where a gradient component is not small (over 5 % of
# its tensor's largest) the bf16 and fp32 updates are equal to 1e-3·lr; near-zero components may flip sign
# (at most 0.8 % of a tensor's here); allowed: 3 %.
BIG, STEP_ATOL, FLIPS = 0.05, 1e-3 * LR, 0.03


@pytest.fixture(scope="module", autouse=True)
def process_group():
    from fdfo import distributed

    distributed.init()


def make(lora_dtype: str, grad_clip: float = 1.0, micro_batches: int = 2):
    """The tiny bf16 model with a rank-4 adapter in ``lora_dtype`` whose initial weights are the same bf16
    values on both paths (B non-zero), and its engine (stage 0, ``micro_batches`` of 2 rows per step)."""
    from fdfo.algorithms.base import Layout
    from fdfo.context import RunContext
    from fdfo.engine import Engine
    from fdfo.settings import build_config

    torch.manual_seed(0)
    model = flavours.flow_model("tiny", torch.device("cpu"), torch.bfloat16)
    model.add_lora(LoraConfig(rank=4, alpha=8.0, dtype=lora_dtype))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).mul(0.1).bfloat16())
            elif "lora_A" in name:
                p.copy_(p.bfloat16())
    cfg = build_config({"lora": {"rank": 4, "alpha": 8.0, "dtype": lora_dtype}, "model": {"compile": False},
                        "train": {"micro_batch_rows": 2, "learning_rate": LR, "grad_clip": grad_clip},
                        "sampling": {"steps": 2}, "fdfo": {"pairs_per_epoch": 2, "optimizer_steps_per_epoch": 1}})
    layout = Layout(rows_per_rank=4, elements_per_rank=2 * micro_batches, optimizer_steps=1, micro_batch_rows=2)
    return model, Engine(cfg, model, layout, RunContext.local())


def batch(rows: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g),
            Conditioning(torch.randn(rows, 8, 64, generator=g).bfloat16(),
                         torch.randn(rows, 64, generator=g).bfloat16()))


def train_step(model, engine, seed: int = 0) -> dict[str, torch.Tensor]:
    """One optimizer step over two micro-batches of 2 rows; returns the accumulated LoRA gradients (fp32)."""
    x, sigma, cond = batch(seed=seed)
    grads = {}
    for i in (0, 2):
        v = model.velocity(x[i:i + 2], sigma[i:i + 2], cond[i:i + 2], net=engine.module)
        engine.backward(v.square().mean())
        if i == 2:
            grads = {n: p.grad.float().clone() for n, p in model.transformer.named_parameters() if p.grad is not None}
        engine.step()
    return grads


def lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.transformer.named_parameters() if p.requires_grad}


def masters(model, engine) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer steps: DeepSpeed's masters in bf16 mode, else the weights themselves."""
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    groups = getattr(engine.module.optimizer, "fp32_groups", None)
    if groups is None:
        return {n: p.float() for n, p in lora(model).items()}
    return {n: p.detach().clone() for n, p in zip(names, [p for g in groups for p in g])}


def lora_inputs(model) -> list[torch.dtype]:
    """Hooks recording the dtype of every input an adapter's A matrix sees (peft casts the adapted layer's
    input to the adapter's dtype there)."""
    seen = []
    for name, module in model.transformer.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_adapter_trains_like_the_fp32_adapter():
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    runs = {}
    for dtype in ("float32", "auto"):
        model, engine = make(dtype)
        seen = lora_inputs(model)
        start = masters(model, engine)
        grads = train_step(model, engine)
        runs[dtype] = dict(model=model, engine=engine, seen=set(seen), start=start, grads=grads,
                           after=masters(model, engine), norm=engine.grad_norm())
    fp32, bf16 = runs["float32"], runs["auto"]
    # "float32": today's path, fp32 adapters stepped by AdamW unwrapped, fp32 activations into the adapters.
    assert {p.dtype for p in lora(fp32["model"]).values()} == {torch.float32} and fp32["seen"] == {torch.float32}
    assert isinstance(fp32["engine"].module.optimizer, torch.optim.AdamW)
    # "auto" on a bf16 model: bf16 adapters, bf16 activations only, DeepSpeed's fp32-master wrapper.
    assert {p.dtype for p in lora(bf16["model"]).values()} == {torch.bfloat16} and bf16["seen"] == {torch.bfloat16}
    assert isinstance(bf16["engine"].module.optimizer, FP16_UnfusedOptimizer)
    assert all(p.dtype == torch.float32 for p in bf16["after"].values())
    # The same starting values; DeepSpeed's warm-up step on zero gradients undone (no weight decay, no step 1).
    for name, w in fp32["start"].items():
        assert torch.equal(bf16["start"][name], w)
    assert {s["step"].item() for s in bf16["engine"].module.optimizer.optimizer.state.values()} == {1.0}
    assert sorted(bf16["grads"]) == sorted(fp32["grads"])
    for name, g in fp32["grads"].items():
        if not g.any():  # (the last block's context projections feed nothing: zero on both paths)
            assert not bf16["grads"][name].any(), name
            continue
        assert rel(bf16["grads"][name], g) < GRAD_RTOL, name
        update, update_bf16 = fp32["after"][name] - fp32["start"][name], bf16["after"][name] - bf16["start"][name]
        big = g.abs() > BIG * g.abs().max()
        torch.testing.assert_close(update_bf16[big], update[big], rtol=0, atol=STEP_ATOL)
        assert (update_bf16.sign() != update.sign()).float().mean() < FLIPS, name
        # the bf16 weights the forward uses are the masters rounded
        assert torch.equal(lora(bf16["model"])[name], bf16["after"][name].bfloat16())
    assert bf16["norm"] == pytest.approx(fp32["norm"], rel=GRAD_RTOL)


def test_gradient_clipping_and_norm_through_the_bf16_wrapper():
    """grad_norm() is the norm before clipping; the fp32 gradients the optimizer steps are clipped to grad_clip."""
    model, engine = make("auto", grad_clip=1e-3)
    inner, stepped = engine.module.optimizer.optimizer, []
    step = inner.step

    def recording_step(*args, **kwargs):
        stepped.append(float(torch.stack([p.grad.norm() for g in inner.param_groups for p in g["params"]]).norm()))
        return step(*args, **kwargs)

    inner.step = recording_step
    train_step(model, engine)
    assert engine.grad_norm() > 1e-2 and stepped == [pytest.approx(1e-3, rel=1e-3)]


def test_float32_keeps_fp32_adapters_even_when_loaded_in_bf16(tmp_path):
    """lora.dtype float32: an adapter that arrives in the model's dtype (a starting adapter loaded with the
    default) is made fp32 by the engine; load_adapter(trainable, lora_dtype) reads an fp32 file exactly."""
    model, _ = make("float32")
    model.save_lora(tmp_path)
    fresh = flavours.flow_model("tiny", torch.device("cpu"), torch.bfloat16)
    fresh.load_adapter(tmp_path, trainable=True, lora_dtype="float32")
    assert all(torch.equal(p, lora(model)[n]) for n, p in lora(fresh).items())  # fp32 in, fp32 kept
    fresh = flavours.flow_model("tiny", torch.device("cpu"), torch.bfloat16)
    fresh.load_adapter(tmp_path, trainable=True)  # lora_dtype "auto": the model's bf16
    assert {p.dtype for p in lora(fresh).values()} == {torch.bfloat16}


def test_a_bf16_adapter_checkpoint_resumes_exactly(tmp_path):
    model, engine = make("auto")
    train_step(model, engine, seed=0)
    engine.save_state(tmp_path, "state", {"epoch": 1})
    train_step(model, engine, seed=1)

    resumed_model, resumed = make("auto")
    assert resumed.load_state(tmp_path, "state") == {"epoch": 1}
    train_step(resumed_model, resumed, seed=1)
    for name, w in masters(model, engine).items():
        assert torch.equal(masters(resumed_model, resumed)[name], w), name
    for name, w in lora(model).items():
        assert torch.equal(lora(resumed_model)[name], w), name


def test_the_exported_bf16_adapter_loads_into_bf16_and_fp32_models(tmp_path):
    """save_lora writes the adapter in its own dtype, bf16: the weights the model sampled with (the fp32 masters
    are the optimizer's; a checkpoint keeps them). Both loaders read it; an fp32 model gets the same values."""
    from safetensors import safe_open

    model, engine = make("auto")
    train_step(model, engine)
    model.save_lora(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    x, sigma, cond = batch(rows=2)
    with torch.no_grad():
        want = model.velocity(x, sigma, cond)
    for load in ("load_adapter", "load_lora"):
        torch.manual_seed(0)
        fresh = flavours.flow_model("tiny", torch.device("cpu"), torch.bfloat16)
        getattr(fresh, load)(tmp_path)
        with torch.no_grad():
            assert torch.equal(fresh.velocity(x, sigma, cond), want), load
    fp32 = flavours.flow_model("tiny", torch.device("cpu"), torch.float32)
    fp32.load_adapter(tmp_path)
    trained = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in fp32.transformer.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(trained)
    assert all(p.dtype == torch.float32 and torch.equal(p, trained[n].float()) for n, p in loaded.items())
