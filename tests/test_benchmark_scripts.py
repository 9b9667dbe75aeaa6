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


def test_flux1_dev_flavour_is_the_published_transformer():
    """FLUX.1 [dev]'s transformer from the table: 19 double-stream and 38 single-stream blocks, 24 heads of 128,
    the distilled guidance input; 11,901,408,320 parameters (the published ≈ 11.9 B), counted on the meta
    device. The default LoRA targets reach every block of both kinds and not the final projection."""
    from fdfo.models import FluxFlowModel, flavours

    assert flavours.parameter_count("flux1-dev") == 11_901_408_320
    assert flavours.parameter_count("flux-tiny") < 100_000
    assert flavours.family("flux1-dev") is FluxFlowModel and flavours.sample_size("flux1-dev") == 128
    with torch.device("meta"):
        model = flavours.build("flux1-dev")
    cfg = model.config
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.in_channels, cfg.joint_attention_dim,
            cfg.pooled_projection_dim, cfg.guidance_embeds) == (24, 128, 64, 4096, 768, True)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    flow = FluxFlowModel.from_transformer(model, device=torch.device("meta"), dtype=torch.float32)
    targets = flow.lora_targets(list(FluxFlowModel.LORA_TARGETS))  # what add_lora adapts by default
    hits = {n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)}
    assert "proj_out" not in hits
    double = [f"transformer_blocks.{i}.attn.{p}" for i in range(19) for p in
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    single = [f"single_transformer_blocks.{i}.{p}" for i in range(38) for p in
              ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")]
    assert hits == set(double) | set(single)


def test_bench_zero_runs_and_inputs():
    """bench_zero's --arch list (each at --stage or its own NAME:STAGES) and the training inputs it
    builds per family: the flow model's velocity on the meta device of FLUX.1 [dev] and SD3.5 Large at 512²
    (tests/test_bench_models.py compares the velocity with training's at the tiny sizes)."""
    import pytest

    from benchmarks.bench_zero import parse_runs, step_inputs
    from fdfo.models import flavours

    assert parse_runs(["sd35-medium", "flux1-dev:3", "sd35-large:2,3"], [0, 2, 3]) == [
        ("sd35-medium", [0, 2, 3]), ("flux1-dev", [3]), ("sd35-large", [2, 3])]
    for bad, match in (("flux2", "unknown architecture"), ("flux1-dev:x", "comma-separated"),
                       ("tiny:4", "stages are 0, 1, 2 or 3")):
        with pytest.raises(ValueError, match=match):
            parse_runs([bad], [0])
    meta = torch.device("meta")
    shape = (2, 16, 64, 64)  # both take 16 latent channels (FLUX packs them 2×2 in its transformer call)
    for name, tokens in (("flux1-dev", 512), ("sd35-large", 333)):
        model = flavours.flow_model(name, meta, torch.bfloat16)
        x, sigma, cond = step_inputs(model, 2, 64, tokens, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert (x.shape, sigma.shape, cond.embeds.shape[1]) == (shape, (2,), tokens)
        assert (x.dtype, sigma.dtype, cond.embeds.dtype, cond.pooled.dtype) == (torch.float32, torch.float32,
                                                                                torch.bfloat16, torch.bfloat16)
        v = model.velocity(x.to(meta), sigma.to(meta), cond.to(meta))
        assert (v.shape, v.dtype) == (shape, torch.float32)
