"""SD3 adapter through the real from_pretrained path, on tiny random pipelines saved to disk."""

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.models import SD3FlowModel, load_flow_model
from fdfo.models.tiny import clip_tokenizer


def _model(path, **kw):
    return SD3FlowModel(str(path), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16, **kw)


def test_offline_clip_tokenizer_gives_real_clip_ids():
    tok = clip_tokenizer()
    # Known ids of the public CLIP BPE vocabulary.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_load_encode_velocity_decode(tiny_pipeline_dir):
    model = _model(tiny_pipeline_dir)
    assert model.latent_shape == (4, 8, 8) and model.vae is not None
    cond = model.encode(["a red cube", "a blue sphere", "a red cube"])
    assert cond.embeds.shape[0] == 3 and cond.pooled.shape == (3, 64)
    torch.testing.assert_close(cond[0].embeds, cond[2].embeds)
    assert not torch.allclose(cond[0].embeds, cond[1].embeds)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *model.latent_shape, generator=g)
    sigma = torch.rand(3, generator=g)
    v = model.velocity(x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    images = model.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    sig = model.sigmas(10)
    assert sig.shape == (11,) and sig[0] == 1.0 and sig[-1] == 0.0 and torch.all(sig[:-1] > sig[1:])


def test_cfg_is_v_u_plus_w_times_difference(tiny_pipeline_dir):
    model = _model(tiny_pipeline_dir)
    cond, uncond = model.encode(["a cat", "a dog"]), model.encode([""])
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    v_c = model.velocity(x, sigma, cond)
    v_u = model.velocity(x, sigma, uncond.expand(2))
    guided = model.velocity(x, sigma, cond, guidance_scale=4.5, uncond=uncond)
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="negative-prompt"):
        model.velocity(x, sigma, cond, guidance_scale=2.0)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        _model(tmp_path / "empty")


def test_lora_is_trainable_and_loads_into_a_diffusers_pipeline(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = _model(tiny_pipeline_dir)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    params = model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = sum(p.numel() for p in model.transformer.parameters() if not p.requires_grad)
    assert frozen > sum(p.numel() for p in params)
    # Gaussian init: A random, B zero, so the adapter starts as the identity map.
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = model.encode(["a cat", "a dog"])
    v0 = model.velocity(x, sigma, cond)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    v1 = model.velocity(x, sigma, cond)
    assert not torch.allclose(v0, v1)
    model.save_lora(tmp_path / "adapter")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_pipeline_dir))
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    out = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]
    torch.testing.assert_close(out, v1, rtol=1e-4, atol=1e-5)


def test_pixel_space_model_without_vae(tmp_path):
    from fdfo.config import ModelConfig
    from fdfo.models.tiny import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline(sample_size=8, in_channels=1, with_vae=False, with_t5=False).save_pretrained(tmp_path)
    model = load_flow_model(ModelConfig(path=str(tmp_path), resolution=8, max_sequence_length=8),
                            torch.device("cpu"))
    assert model.vae is None and model.latent_shape == (1, 8, 8)
    x = torch.linspace(-1.5, 1.5, 64).view(1, 1, 8, 8)
    torch.testing.assert_close(model.decode(x), (x / 2 + 0.5).clamp(0, 1))  # identity decoder


def test_the_transformer_gets_the_schedulers_fp32_timesteps_with_bf16_weights(tiny_pipeline_dir):
    """bf16 weights, fp32 times: the value the transformer receives is the scheduler's own timestep,
    in sampling (the eager twin of the CUDA-graph sampler) and in a training forward."""
    from fdfo.sampling import churn_schedule, sample_pairs

    model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.bfloat16,
                         max_sequence_length=16)
    assert model.transformer.dtype == torch.bfloat16
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"]),
                                                with_kwargs=True)
    steps = 7
    sigmas = model.sigmas(steps)
    scheduler = model.pipe.scheduler
    scheduler.set_timesteps(steps, device="cpu")
    expected = scheduler.timesteps.float()
    assert not torch.equal(expected.bfloat16().float(), expected)  # bf16 would move them: the test can fail

    g = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    cond = model.encode(["a cat"]).repeat_rows(2)
    g_prior, g_steps = churn_schedule("raw", sigmas=sigmas, rows=2, weight=0.01)
    sample_pairs(lambda x, s: model.velocity(x, s, cond), torch.randn(1, *model.latent_shape, generator=g),
                 sigmas, g_prior, g_steps, g)
    assert len(seen) == steps
    for k, t in enumerate(seen):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, expected[k].expand_as(t), rtol=0, atol=0)

    seen.clear()  # a training forward, at random times
    sigma = torch.rand(2, generator=g)
    model.velocity(torch.randn(2, *model.latent_shape, generator=g), sigma, cond).float().sum()
    assert seen[0].dtype == torch.float32 and torch.equal(seen[0], sigma * 1000)


def test_default_lora_covers_the_joint_attention_only(tmp_path):
    """SD3.5 Medium's dual-attention blocks have a second self-attention `attn2`; the published adapter
    (docs/algorithm.md §5) adapts the joint attention's eight projections and nothing in attn2."""
    from fdfo.models.tiny import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline(num_layers=3, dual_attention_layers=(0, 1), with_t5=False).save_pretrained(tmp_path)
    model = _model(tmp_path)
    projections = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    names = {n for n, m in model.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in names if any(n.endswith(f".attn.{p}") for p in projections)}
    assert any(".attn2." in n for n in names) and len(expected) > 8  # the case exists in this model
    model.add_lora(LoraConfig())
    adapted = {n[: -len(".lora_A")] for n, _ in model.transformer.named_modules() if n.endswith(".lora_A")}
    assert adapted == expected
    # Target modules stay configurable: a bare name reaches attn2 as well.
    other = _model(tmp_path)
    other.add_lora(LoraConfig(target_modules=["to_q"]))
    assert any(".attn2.to_q" in n for n, _ in other.transformer.named_modules() if n.endswith(".lora_A"))
