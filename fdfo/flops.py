"""Model FLOP utilisation: FLOPs counted by torch.utils.flop_counter, peaks by GPU name.

MFU here is "model FLOPs": the matmul and attention FLOPs torch's counter attributes to
the transformer's forward (and, for training, its backward), divided by wall time and by
the GPU's dense bf16 peak. Element-wise work (norms, activations, the churn step, the loss)
is not counted, as is usual for MFU.
"""

from __future__ import annotations

import torch

# Dense (not sparse) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s. Matched
# in order against torch.cuda.get_device_name, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.5),
    ("H800", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
)


def peak_bf16_tflops(name_or_device) -> float | None:
    """The dense bf16 peak of a GPU by name (or of a CUDA device); None when unknown or not a GPU."""
    if isinstance(name_or_device, str) and not name_or_device.startswith("cuda"):
        name = name_or_device
    else:
        device = torch.device(name_or_device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def count_flops(fn) -> int:
    """FLOPs of everything ``fn()`` runs, by torch.utils.flop_counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def velocity_flops(model, rows: int, guidance_scale: float = 1.0, uncond=None, *, train: bool = False) -> int:
    """FLOPs of one ``model.velocity`` on ``rows`` rows at the model's latent shape (both CFG halves
    when guidance_scale != 1); with ``train``, forward plus backward to the trainable weights, as one
    training micro-batch costs. Random inputs: the count depends on shapes only."""
    g = torch.Generator().manual_seed(0)
    device = model.device
    x = torch.randn(rows, *model.latent_shape, generator=g).to(device)
    sigma = torch.rand(rows, generator=g).to(device)
    model.move_text_encoders(device)  # (a trainer may have parked them on the CPU after sampling)
    with torch.no_grad():
        cond = model.encode(["a photo"]).expand(rows)
    params = model.trainable_parameters() if train else []
    saved = [p.grad for p in params]
    for p in params:  # (backward would accumulate into the existing gradient tensors in place)
        p.grad = None

    def run():
        if train:
            v = model.velocity(x, sigma, cond, guidance_scale, uncond, net=model.transformer)
            v.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                model.velocity(x, sigma, cond, guidance_scale, uncond)

    try:
        return count_flops(run)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
