"""Model FLOP counting for MFU: linear in rows, doubled by CFG, training ≈ forward + backward."""

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.flops import PEAK_BF16_TFLOPS, count_flops, peak_bf16_tflops, velocity_flops
from fdfo.models.sd3 import SD3FlowModel


@pytest.fixture(scope="module")
def model(tiny_pipeline_dir):
    m = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16)
    m.add_lora(LoraConfig(rank=4, alpha=8.0))
    return m


def test_count_flops_matches_the_matmul_formula():
    m, k, n = (int(v) for v in torch.randint(3, 40, (3,)))
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert count_flops(lambda: a @ b) == 2 * m * k * n


def test_velocity_flops_scale_with_rows_and_cfg(model):
    one = velocity_flops(model, 2)
    assert one > 0
    assert velocity_flops(model, 4) == 2 * one  # per-row cost: attention is within a row
    uncond = model.encode([""])
    assert velocity_flops(model, 2, 4.5, uncond) == 2 * one  # both CFG halves


def test_training_flops_are_forward_plus_backward_and_leave_grads_alone(model):
    params = model.trainable_parameters()
    marker = [torch.randn_like(p) for p in params]
    for p, g in zip(params, marker):
        p.grad = g.clone()
    fwd = velocity_flops(model, 3)
    train = velocity_flops(model, 3, train=True)
    # Backward: input gradients through the blocks after the first LoRA layer (≈ one forward of those)
    # plus the small LoRA weight gradients; the frozen embedders before it need no backward at all.
    assert 1.5 * fwd < train < 3.0 * fwd
    for p, g in zip(params, marker):
        assert torch.equal(p.grad, g)


def test_every_peak_entry_is_reachable_by_its_own_name():
    """Lookup is by substring, first match wins: a generic key ("H100") placed before a specific one
    ("H100 PCIe") would give the specific GPU the wrong peak."""
    for key, tflops in PEAK_BF16_TFLOPS:
        assert peak_bf16_tflops(f"NVIDIA {key}") == tflops, key


def test_peak_from_device_names_as_torch_reports_them():
    table = dict(PEAK_BF16_TFLOPS)
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == table["H100"]  # the SXM5 part has no "SXM" in its name
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == table["A100"]
    assert peak_bf16_tflops("nvidia h200") == table["H200"]  # case-insensitive
    assert peak_bf16_tflops("Tesla T4") is None  # unknown: no MFU is claimed


def test_no_peak_off_gpu():
    assert peak_bf16_tflops(torch.device("cpu")) is None
