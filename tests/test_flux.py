"""FLUX.1 adapter through the real from_pretrained path, against FluxPipeline itself on tiny random pipelines.

The references are diffusers' own: the pipeline's σ grid and sampling loop, its transformer called on
latents packed here by the definition of FLUX's 2×2 patches, its LoRA loader and its VAE.
"""

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.errors import ConfigError
from fdfo.models.flux import FluxFlowModel

TEXT = 16  # T5 tokens (max_sequence_length) of the tiny pipelines


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1 [dev]-like pipeline (guidance-distilled) saved with save_pretrained."""
    from fdfo.models.tiny import build_tiny_flux_pipeline

    out = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux_pipeline(max_text_tokens=TEXT, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    """The same without the guidance input, as FLUX.1 [schnell]."""
    from fdfo.models.tiny import build_tiny_flux_pipeline

    out = tmp_path_factory.mktemp("tiny_flux_schnell")
    build_tiny_flux_pipeline(max_text_tokens=TEXT, guidance_embeds=False, seed=1).save_pretrained(out)
    return out


def _model(path, resolution=16, **kw) -> FluxFlowModel:
    kw.setdefault("dtype", torch.float32)
    return FluxFlowModel(str(path), device=torch.device("cpu"), max_sequence_length=TEXT, resolution=resolution,
                         **kw)


def _stock(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(2**31, ())))


def _pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's tokens by definition: patch (i, j) holds x[:, c, 2i + a, 2j + b] at channel 4c + 2a + b,
    patches in row-major order, with position ids (0, i, j)."""
    rows, channels, h, w = x.shape
    patches = [(i, j) for i in range(h // 2) for j in range(w // 2)]
    tokens = torch.stack([x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(rows, 4 * channels) for i, j in patches], 1)
    return tokens, torch.tensor([[0.0, i, j] for i, j in patches])


def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    rows, _, width = tokens.shape
    x = torch.empty(rows, width // 4, h, w)
    for k, (i, j) in enumerate((i, j) for i in range(h // 2) for j in range(w // 2)):
        x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = tokens[:, k].reshape(rows, width // 4, 2, 2)
    return x


def _reference_velocity(transformer, x, sigma, cond, guidance: float | None) -> torch.Tensor:
    """The stock transformer called directly, on latents packed by definition."""
    tokens, img_ids = _pack(x)
    g = None if guidance is None else torch.full((x.shape[0],), guidance)
    with torch.no_grad():
        out = transformer(hidden_states=tokens, timestep=sigma, guidance=g, pooled_projections=cond.pooled,
                          encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                          img_ids=img_ids, return_dict=False)[0]
    return _unpack(out, *x.shape[2:])


def test_loads_from_a_saved_pipeline(flux_dir, tiny_pipeline_dir):
    model = _model(flux_dir, resolution=24)
    assert model.family == "flux" and model.pipe.vae_scale_factor == 2
    assert model.latent_shape == (16, 12, 12)  # 16 channels, unpacked, at 24 px / VAE factor 2
    assert _model(flux_dir, resolution=40).latent_shape == (16, 20, 20)
    with pytest.raises(ConfigError, match="multiple of 4"):
        _model(flux_dir, resolution=18)  # 9 latent rows: no whole 2×2 patches
    with pytest.raises(ConfigError, match="not a FLUX.1"):
        _model(tiny_pipeline_dir)  # an SD3 pipeline
    # The conditioning is FluxPipeline's own prompt encoding: T5 sequence and CLIP pooled vector.
    prompts = ["a red cube", "a blue sphere on a table"]
    cond = model.encode(prompts)
    embeds, pooled, _ = _stock(flux_dir).encode_prompt(prompts, max_sequence_length=TEXT)
    assert cond.embeds.shape == (2, TEXT, 32) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.embeds, embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-5, atol=1e-6)


def test_sigma_grid_is_flux_pipelines(flux_dir):
    """The grid FluxPipeline samples with, at each resolution (its shift grows with the token count)."""
    stock = _stock(flux_dir)
    steps = int(torch.randint(3, 7, ()))
    g = _gen()
    grids = []
    for resolution in (16, 48):
        stock(prompt_embeds=torch.randn(1, TEXT, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
              height=resolution, width=resolution, num_inference_steps=steps, output_type="latent")
        grid = _model(flux_dir, resolution=resolution).sigmas(steps)
        assert grid.dtype == torch.float32 and grid.shape == (steps + 1,) and grid[0] == 1 and grid[-1] == 0
        torch.testing.assert_close(grid, stock.scheduler.sigmas.float(), rtol=0, atol=0)
        grids.append(grid)
    assert (grids[1][1:-1] > grids[0][1:-1] + 1e-3).all()  # the larger image is shifted towards noise
    # A fixed shift replaces the resolution-dependent one.
    s = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    fixed = _model(flux_dir, shift=3.0).sigmas(steps)
    torch.testing.assert_close(fixed[:-1].double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=0)


def test_velocity_is_the_transformer_on_packed_latents(flux_dir):
    from diffusers import FluxPipeline

    model, stock = _model(flux_dir), _stock(flux_dir)
    g = _gen()
    x = torch.randn(3, 16, 4, 6, generator=g)  # not square: rows and columns cannot be swapped unseen
    tokens, ids = _pack(x)  # the definition is diffusers' layout
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 3, 16, 4, 6))
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, 2, 3, "cpu", torch.float32))
    sigma = torch.rand(3, generator=g)
    cond = model.encode(["a cat", "a dog on a sofa", "two birds"])
    v = model.velocity(x, sigma, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v, _reference_velocity(stock.transformer, x, sigma, cond, 3.5), rtol=1e-5, atol=1e-5)


def test_euler_sampling_with_velocity_is_flux_pipelines(flux_dir):
    """Our σ grid, prompt encoding and velocity in a plain Euler loop reproduce FluxPipeline's latents."""
    from diffusers import FluxPipeline

    model, stock = _model(flux_dir), _stock(flux_dir)
    steps, prompts = 4, ["a cat", "a mountain lake at dawn"]
    noise = torch.randn(2, *model.latent_shape, generator=_gen())
    theirs = stock(prompts, latents=FluxPipeline._pack_latents(noise, 2, 16, 8, 8), height=16, width=16,
                   num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=TEXT,
                   output_type="latent").images
    cond, sigmas, x = model.encode(prompts), model.sigmas(steps), noise.clone()
    with torch.no_grad():
        for k in range(steps):
            x = x + (sigmas[k + 1] - sigmas[k]) * model.velocity(x, sigmas[k].expand(2), cond)
    torch.testing.assert_close(x, _unpack(theirs, 8, 8), rtol=1e-5, atol=1e-5)
    assert (x - noise).abs().mean() > 0.1  # it moved


def test_distilled_guidance_reaches_the_transformer(flux_dir, schnell_dir):
    g = _gen()
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    seen = []
    hook = lambda m, args, kwargs: seen.append(kwargs["guidance"])  # noqa: E731
    dev = _model(flux_dir, guidance=2.0)
    dev.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    cond = dev.encode(["a cat", "a dog"])
    v2 = dev.velocity(x, sigma, cond)
    dev.flux_guidance = 5.0
    v5 = dev.velocity(x, sigma, cond)
    assert torch.equal(seen[0], torch.full((2,), 2.0)) and torch.equal(seen[1], torch.full((2,), 5.0))
    assert not torch.allclose(v2, v5, atol=1e-3)
    torch.testing.assert_close(v5, _reference_velocity(dev.transformer, x, sigma, cond, 5.0), rtol=1e-5, atol=1e-5)

    schnell = _model(schnell_dir, guidance=2.0)
    schnell.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    cond = schnell.encode(["a cat", "a dog"])
    v2 = schnell.velocity(x, sigma, cond)
    schnell.flux_guidance = 5.0
    assert seen[-1] is None and torch.equal(schnell.velocity(x, sigma, cond), v2)

    # Real CFG on top: v_u + w·(v_c − v_u), the negative prompt broadcast to every row.
    uncond = dev.encode([""])
    guided = dev.velocity(x, sigma, cond, guidance_scale=4.5, uncond=uncond)
    v_c, v_u = dev.velocity(x, sigma, cond), dev.velocity(x, sigma, uncond.expand(2))
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_timesteps_stay_fp32_with_bf16_weights(flux_dir):
    model = _model(flux_dir, dtype=torch.bfloat16)
    assert model.transformer.dtype == torch.bfloat16
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    sigmas = model.sigmas(7)
    assert not torch.equal(sigmas.bfloat16().float(), sigmas)  # bf16 would move them: the test can fail
    cond = model.encode(["a cat"]).repeat_rows(2)
    for s in sigmas[:-1]:
        v = model.velocity(torch.randn(2, *model.latent_shape, generator=_gen()), s.expand(2), cond)
    assert v.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in seen) and torch.equal(torch.stack([t[0] for t in seen]), sigmas[:-1])


def test_lora_adapts_both_block_types_and_loads_into_flux_pipeline(flux_dir, tmp_path):
    model = _model(flux_dir)
    model.add_lora(LoraConfig(rank=4, alpha=6.0, target_modules=list(FluxFlowModel.LORA_TARGETS)))
    adapted = {n[: -len(".lora_A")] for n, _ in model.transformer.named_modules() if n.endswith(".lora_A")}
    double = "transformer_blocks.0.attn."
    assert adapted == {double + p for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out")} | {
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_out"}  # not the final proj_out
    params = model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)

    g = _gen()
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = model.encode(["a cat", "a dog"])
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1, generator=g)
    v = model.velocity(x, sigma, cond)
    v.square().mean().backward()  # gradients flow through the packing to every adapter weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    model.save_lora(tmp_path / "adapter")
    stock = _stock(flux_dir)
    base = _reference_velocity(stock.transformer, x, sigma, cond, 3.5)
    stock.load_lora_weights(str(tmp_path / "adapter"))
    loaded = {n[: -len(".lora_A")] for n, _ in stock.transformer.named_modules() if n.endswith(".lora_A")}
    assert loaded == adapted
    torch.testing.assert_close(_reference_velocity(stock.transformer, x, sigma, cond, 3.5), v.detach(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, v.detach(), atol=1e-3)


def test_decode_is_the_vaes(flux_dir):
    model, stock = _model(flux_dir), _stock(flux_dir)
    x = torch.randn(2, *model.latent_shape, generator=_gen())
    images = model.decode(x)
    assert images.shape == (2, 3, 16, 16)
    cfg = stock.vae.config
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
    with torch.no_grad():
        ref = stock.vae.decode(x / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    torch.testing.assert_close(images, stock.image_processor.postprocess(ref, output_type="pt"), rtol=1e-5, atol=1e-6)


def test_attention_backends_dispatch_through_diffusers(flux_dir, monkeypatch):
    """FLUX's attention goes through diffusers' dispatcher: the chosen backend runs every attention,
    also in a copy of the transformer built afterwards (as the ZeRO-3 inference copy is)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = _model(flux_dir)
    g = _gen()
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = model.encode(["a cat", "a dog"])
    v = model.velocity(x, sigma, cond)
    math = AttentionBackendName._NATIVE_MATH
    calls = []
    kernel = _AttentionBackendRegistry._backends[math]
    monkeypatch.setitem(_AttentionBackendRegistry._backends, math, lambda **kw: calls.append(1) or kernel(**kw))
    try:
        model.set_attention_backend("_native_math")
        assert model.attention_backend == "_native_math"
        torch.testing.assert_close(model.velocity(x, sigma, cond), v, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2  # one double-stream and one single-stream attention
        copy = type(model.transformer).from_config(model.transformer.config)
        copy.load_state_dict(model.transformer.state_dict())
        torch.testing.assert_close(model.velocity(x, sigma, cond, net=copy), v, rtol=1e-5, atol=1e-5)
        assert len(calls) == 4
        for name, package in (("flash", "flash-attn"), ("sage", "sageattention"), ("xformers", "xformers")):
            with pytest.raises(ConfigError, match=f"'{name}' is not usable.*{package}"):
                model.set_attention_backend(name)
        with pytest.raises(ConfigError, match="_native_flash"):  # the valid names are listed
            model.set_attention_backend("fastest")
        assert model.attention_backend == "_native_math"
    finally:
        model.set_attention_backend("native")  # diffusers' process-wide default back to its own
