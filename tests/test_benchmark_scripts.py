"""What the GPU benchmarks build and time, checked without running them.

The benchmarks themselves run end to end at tiny size on CPU in tests/test_run_gpu.py
(benchmarks/run_gpu.sh's dry run); here are the tables they are built from.
"""

import torch


def test_flavours_are_the_published_architectures():
    """SD3.5 Medium and Large transformers from the table have the published parameter counts (2.24 B and
    8.06 B), and every LoRA target names attention projections of every joint block."""
    from diffusers import SD3Transformer2DModel

    from fdfo.models import SD3FlowModel
    from fdfo.models.flavours import ARCHS

    counts = {}
    for name, arch in ARCHS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            model = SD3Transformer2DModel(**arch)
        counts[name] = sum(p.numel() for p in model.parameters())
        blocks = len(model.transformer_blocks)
        for target in SD3FlowModel.LORA_TARGETS:  # (what the trainer and the benchmarks adapt)
            hits = [n for n, _ in model.named_modules() if n.endswith("." + target)]
            # the last block's text stream has no output projection (context_pre_only)
            assert blocks - 1 <= len(hits) <= blocks, (name, target, len(hits))
    assert counts["sd35-medium"] == 2_243_171_520
    assert counts["sd35-large"] == 8_056_627_520
    assert counts["tiny"] < 100_000


def test_bench_kernels_cases_select_shapes():
    from benchmarks.bench_kernels import cases

    default = cases(small=False)
    assert len(default) == 5 * (2 * 3 + 1)  # every kernel variant: bf16 at 2 sides × 3 row counts, one fp32 case
    assert [c.id for c in default if c.dtype == "fp32"][0] == "fd_loss-fwd-512px-12rows-fp32"
    chosen = cases(small=False, res=(512, 1024), rows=(6,), dtypes=("bf16",))
    assert sorted({(c.res, c.rows, c.dtype) for c in chosen}) == [(512, 6, "bf16"), (1024, 6, "bf16")]
    assert len(chosen) == 10
    assert all(c.small and c.rows == 4 for c in cases(small=True))
