"""Adapters in peft's format (the published FDFO adapters' format): read by generate, evaluate and as a run's
starting point, and written by our checkpoints; checked against peft's own save and load."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from fdfo import adapters
from fdfo.config import LoraConfig
from fdfo.errors import ConfigError
from fdfo.inference import generate_images
from fdfo.models import SD3FlowModel
from fdfo.settings import build_config
from fdfo.trained_checkpoint import apply_checkpoint, resolve_checkpoint

# The published adapters' targets: the joint attention projections of every block (SD3.5 Medium).
PUBLISHED_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"]


def _model(path) -> SD3FlowModel:
    return SD3FlowModel(str(path), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16,
                        resolution=16)


def _published_adapter(pipeline_dir, out: Path, seed: int, rank: int = 4, alpha: float = 6.0) -> dict:
    """A peft adapter written by PeftModel.save_pretrained on the bare transformer, as the published ones
    are, with random weights; returns the weights by module name."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    transformer = SD3Transformer2DModel.from_pretrained(str(pipeline_dir), subfolder="transformer")
    peft_model = get_peft_model(transformer, PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=PUBLISHED_TARGETS))
    g = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                weights[name.removeprefix("base_model.model.").replace(".default", "")] = p.detach().clone()
    peft_model.save_pretrained(str(out))
    return weights


def _images(model, seed):
    return generate_images(model, ["a handwritten digit one", "a handwritten digit seven"], [seed, seed + 1],
                           steps=3, guidance=1.0, negative_prompt="", batch_size=2)


def test_a_published_format_adapter_gives_the_images_of_the_same_weights_set_by_hand(tmp_path, tiny_pipeline_dir):
    seed = random.randrange(10**6)
    weights = _published_adapter(tiny_pipeline_dir, tmp_path / "published", seed)
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == ["README.md", adapters.CONFIG_FILE,
                                                                           adapters.WEIGHTS_FILE]
    ckpt = resolve_checkpoint(tmp_path / "published")
    assert ckpt.kind == "lora" and ckpt.peft
    loaded = _model(tiny_pipeline_dir)
    apply_checkpoint(loaded, ckpt)

    by_hand = _model(tiny_pipeline_dir)  # our own way: a fresh adapter of the same shape, weights copied in
    by_hand.add_lora(LoraConfig(rank=4, alpha=6.0, target_modules=PUBLISHED_TARGETS))
    params = dict(by_hand.transformer.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name.replace(".weight", ".default.weight")].copy_(value)
    assert torch.equal(_images(loaded, seed), _images(by_hand, seed))
    assert not torch.equal(_images(loaded, seed), _images(_model(tiny_pipeline_dir), seed))  # the adapter acts


def test_our_adapter_export_is_read_by_peft(tmp_path, tiny_pipeline_dir):
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    model = _model(tiny_pipeline_dir)
    model.add_lora(LoraConfig(rank=4, alpha=10.0))
    g = torch.Generator().manual_seed(random.randrange(10**6))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_lora(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()  # diffusers' loaders' file too
    base = SD3Transformer2DModel.from_pretrained(str(tiny_pipeline_dir), subfolder="transformer")
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    x, sigma = torch.randn(2, *model.latent_shape, generator=g), torch.rand(2, generator=g)
    cond = model.encode(["a cat", "a dog"])
    with torch.no_grad():
        ours = model.velocity(x, sigma, cond)
        out = theirs(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                     pooled_projections=cond.pooled, return_dict=False)[0]
    torch.testing.assert_close(out, ours, rtol=1e-5, atol=1e-6)


def test_a_run_starts_from_a_published_adapter(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer
    from tests.test_train import QUIET, lora_weights, tiny_run

    weights = _published_adapter(tiny_pipeline_dir, tmp_path / "published", random.randrange(10**6), rank=8,
                                 alpha=16.0)
    cfg = tiny_run(tmp_path / "run", tiny_pipeline_dir, digit_reward_dir,
                   **dict(QUIET, train={"epochs": 1}, lora={"init_adapter": str(tmp_path / "published")}))
    t = Trainer(cfg)
    assert (t.cfg.lora.rank, t.cfg.lora.alpha, t.cfg.lora.target_modules) == (8, 16.0, sorted(PUBLISHED_TARGETS))
    assert (cfg.lora.rank, cfg.lora.target_modules) == (4, None)  # the given config is left as it was
    start = lora_weights(t)
    assert start.keys() == weights.keys()
    for k in weights:
        assert torch.equal(start[k], weights[k]), k
    t.train_epoch(0)
    after = lora_weights(t)
    assert any(not torch.equal(after[k], start[k]) for k in start)  # it trained on from there


def test_an_adapter_on_the_hub_is_fetched_by_repository_and_subfolder(tmp_path, tiny_pipeline_dir, monkeypatch):
    import huggingface_hub

    _published_adapter(tiny_pipeline_dir, tmp_path / "hub" / "pickscore_nocfg", 1)
    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None):
        calls.append((repo_id, filename, subfolder))
        return str(tmp_path / "hub" / subfolder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ckpt = resolve_checkpoint("nvidia/finite-difference-flow-optimization/pickscore_nocfg")
    assert ckpt.peft and ckpt.path == tmp_path / "hub" / "pickscore_nocfg"
    assert calls == [("nvidia/finite-difference-flow-optimization", f, "pickscore_nocfg")
                     for f in (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE)]


def test_adapter_mistakes_are_one_line_errors(tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    from fdfo import generate, inference
    from fdfo.models import tiny

    other = tmp_path / "other_base"  # a base model whose attention is narrower: its adapter does not fit
    tiny.build_tiny_sd3_pipeline(attention_head_dim=8).save_pretrained(other)
    _published_adapter(other, tmp_path / "wide", 2)
    monkeypatch.setattr(inference, "load_model", lambda *a: pytest.fail("the model was loaded"))
    args = ["--model", str(tiny_pipeline_dir), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert generate.main(["--adapter", str(tmp_path / "wide"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit base model" in err and "inputs in the adapter" in err

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "wide", broken)
    (broken / adapters.CONFIG_FILE).write_text("{not json")
    assert generate.main(["--adapter", str(broken), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and adapters.CONFIG_FILE in err and "not valid JSON" in err

    with pytest.raises(ConfigError, match="lora.init_adapter' needs lora.enabled true"):
        build_config({"lora": {"enabled": False, "init_adapter": str(tmp_path / "wide")}})


def test_removing_the_adapters_gives_back_the_base_exactly(tmp_path, tiny_pipeline_dir):
    """What the protocol command relies on to evaluate checkpoint after checkpoint on one loaded base."""
    seed = random.randrange(10**6)
    _published_adapter(tiny_pipeline_dir, tmp_path / "published", seed)
    ours = _model(tiny_pipeline_dir)
    ours.add_lora(LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in ours.transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    ours.save_lora(tmp_path / "ours")
    model = _model(tiny_pipeline_dir)
    base = _images(model, seed)
    for path in (tmp_path / "published", tmp_path / "ours", tmp_path / "published"):
        ckpt = resolve_checkpoint(path)
        apply_checkpoint(model, ckpt)
        with_adapter = _images(model, seed)
        assert not torch.equal(with_adapter, base)
        model.remove_adapters()
        assert torch.equal(_images(model, seed), base)
        fresh = _model(tiny_pipeline_dir)
        apply_checkpoint(fresh, ckpt)
        assert torch.equal(_images(fresh, seed), with_adapter)  # the same as on a freshly loaded base
