"""The benchmarks time the training computation: their velocity is the trained model's, bit for bit.

A benchmark builds its model around a random-init transformer of a published architecture
(``fdfo.models.flavours.flow_model``) and sets up its adapter itself. Here, at the tiny
architectures, the same weights are loaded the way training loads them (a pipeline directory read
by ``load_flow_model``, the adapter added by ``add_lora``), and the two velocities must be equal
for fresh random inputs: in fp32 and in bf16, the GPU's dtype, where a timestep rounded to the
weights' dtype would move 1000·σ off the training times.
"""

import pytest
import torch

from benchmarks import bench_sampling, bench_zero
from fdfo.config import LoraConfig, ModelConfig
from fdfo.models import flavours, load_flow_model
from fdfo.models.base import Conditioning

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # (model.dtype names)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """A tiny pipeline of each family saved with save_pretrained, whose transformer has the benchmarks'
    tiny architecture (its weights are replaced by the benchmark model's in each test)."""
    from fdfo.models.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    dirs = {}
    for name, build in (("tiny", build_tiny_sd3_pipeline), ("flux-tiny", build_tiny_flux_pipeline)):
        pipe = build(seed=0)
        pipe.register_modules(transformer=flavours.build(name))
        dirs[name] = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(dirs[name])
    return dirs


def trained_like(bench, path, dtype: str, lora: LoraConfig | None):
    """The model training runs, loaded from ``path``, with ``lora``'s adapter (None: full fine-tuning) and
    ``bench``'s weights; each parameter's dtype and trainability must already be the same."""
    model = load_flow_model(ModelConfig(path=str(path), dtype=dtype, resolution=16, max_sequence_length=8), CPU)
    if lora is None:
        model.enable_full_finetune()
    else:
        model.add_lora(lora)
    state = {n: (p.dtype, p.requires_grad) for n, p in model.transformer.named_parameters()}
    assert state == {n: (p.dtype, p.requires_grad) for n, p in bench.transformer.named_parameters()}
    model.transformer.load_state_dict(bench.transformer.state_dict())
    return model


def randomize_adapter(model, g: torch.Generator) -> None:
    """Non-zero LoRA B matrices (their Gaussian init is zero), so the adapter's path counts in the velocity."""
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def random_cond(model, rows: int, tokens: int, g: torch.Generator) -> Conditioning:
    cfg = model.transformer.config
    return Conditioning(torch.randn(rows, tokens, cfg.joint_attention_dim, generator=g).to(model.dtype),
                        torch.randn(rows, cfg.pooled_projection_dim, generator=g).to(model.dtype))


def assert_same(bench_v: torch.Tensor, trained_v: torch.Tensor) -> None:
    assert bench_v.dtype == trained_v.dtype == torch.float32
    torch.testing.assert_close(bench_v, trained_v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_bench_sampling_velocity_is_the_training_velocity(dtype, pipeline_dirs):
    """bench_sampling's forward (eager, graph and compile variants; the FLOP count) and its LoRA at --tiny."""
    bench = bench_sampling.build_model("tiny", 4, CPU, DTYPES[dtype])
    g = torch.Generator().manual_seed(1)
    randomize_adapter(bench, g)
    trained = trained_like(bench, pipeline_dirs["tiny"], dtype, LoraConfig(rank=4, alpha=8.0))
    side = flavours.sample_size("tiny") // 2  # the benchmark's default latent side
    x = torch.randn(3, bench.transformer.config.in_channels, side, side, generator=g)
    sigma = torch.rand(3, generator=g)
    cond = random_cond(bench, 3, 8, g)
    with torch.no_grad():
        assert_same(bench_sampling.velocity_fn(bench, bench.transformer)(x, sigma, cond),
                    trained.velocity(x, sigma, cond))


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", ["tiny", "flux-tiny"])
def test_bench_zero_velocity_is_the_training_velocity(name, dtype, full, pipeline_dirs):
    """bench_zero's model (LoRA or full fine-tuning) and training inputs, SD3 and FLUX, velocity and gradient."""
    bench = bench_zero.build_model(name, full, CPU, DTYPES[dtype])
    g = torch.Generator().manual_seed(2)
    randomize_adapter(bench, g)
    trained = trained_like(bench, pipeline_dirs[name], dtype, None if full else bench_zero.LORA)
    x, sigma, cond = bench_zero.step_inputs(bench, 3, flavours.sample_size(name) // 2, 8, CPU, g)
    v_bench = bench.velocity(x, sigma, cond)  # (the benchmark calls it with net=its DeepSpeed engine)
    v_trained = trained.velocity(x, sigma, cond)
    assert_same(v_bench, v_trained)
    v_bench.square().mean().backward()
    v_trained.square().mean().backward()
    for p, q in zip(bench.trainable_parameters(), trained.trainable_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_a_model_around_a_transformer_takes_the_family_options(pipeline_dirs):
    """``from_transformer`` applies the family's options as loading does (FLUX's distilled guidance)."""
    from fdfo.models import FluxFlowModel

    options = FluxFlowModel.Options(guidance=2.0)
    cfg = ModelConfig(path=str(pipeline_dirs["flux-tiny"]), dtype="float32", resolution=16, max_sequence_length=8)
    loaded = load_flow_model(cfg, CPU, options=options)
    bare = FluxFlowModel.from_transformer(loaded.transformer, device=CPU, dtype=torch.float32, options=options)
    default = FluxFlowModel.from_transformer(loaded.transformer, device=CPU, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x, sigma, cond = torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), random_cond(bare, 2, 8, g)
    with torch.no_grad():
        assert_same(bare.velocity(x, sigma, cond), loaded.velocity(x, sigma, cond))
        assert not torch.equal(default.velocity(x, sigma, cond), loaded.velocity(x, sigma, cond))
