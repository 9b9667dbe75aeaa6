"""LoRA export (``python -m fdfo.export``): an adapter written as kohya/ComfyUI's single file and as diffusers'
``pytorch_lora_weights.safetensors`` gives the transformer outputs of the adapter it came from."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdfo import export
from fdfo.config import LoraConfig
from fdfo.models import SD3FlowModel


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_pipeline_dir):
    """A run directory whose newest checkpoint holds a random non-zero adapter (rank 4, alpha 6: a scale of
    1.5 that a loader assuming alpha = rank would miss), as the trainer writes it."""
    run = tmp_path_factory.mktemp("run")
    model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=16, resolution=16)
    model.add_lora(LoraConfig(rank=4, alpha=6.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_lora(run / "checkpoints" / "epoch_0001" / "adapter")
    (run / "checkpoints" / "latest").write_text("epoch_0001")
    return run, outputs(model.transformer)


def outputs(transformer) -> torch.Tensor:
    """The transformer's velocity on fixed random inputs."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
            encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([300.0, 700.0]), return_dict=False)[0]


def fresh_pipeline(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(path), dtype=torch.float32)


def test_kohya_file_gives_the_adapters_outputs_under_comfyuis_key_rule(adapter_run, tiny_pipeline_dir, tmp_path):
    run, expected = adapter_run
    assert export.main([str(run), "--format", "kohya", "--out", str(tmp_path / "fdfo_lora")]) == 0
    state = load_file(str(tmp_path / "fdfo_lora.safetensors"))
    assert "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight" in state
    # ComfyUI's rule for SD3: "lora_transformer_" + the diffusers module path with dots as underscores, each
    # module adding alpha / rank * up @ down to its weight. Applied here by hand to a fresh base.
    transformer = fresh_pipeline(tiny_pipeline_dir).transformer
    by_name = {"lora_transformer_" + n.replace(".", "_"): m for n, m in transformer.named_modules() if n}
    names = {k.split(".")[0] for k in state}
    assert names and len(state) == 3 * len(names)
    with torch.no_grad():
        for name in names:
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            by_name[name].weight += state[f"{name}.alpha"].item() / down.shape[0] * up @ down
    assert torch.allclose(outputs(transformer), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs(fresh_pipeline(tiny_pipeline_dir).transformer), expected, atol=1e-3)


def test_diffusers_export_loads_with_load_lora_weights(adapter_run, tiny_pipeline_dir, tmp_path):
    run, expected = adapter_run
    adapter_dir = run / "checkpoints" / "epoch_0001" / "adapter"
    out = tmp_path / "diffusers"
    assert export.main([str(adapter_dir), "--format", "diffusers", "--out", str(out)]) == 0
    pipe = fresh_pipeline(tiny_pipeline_dir)
    pipe.load_lora_weights(str(out))
    assert torch.allclose(outputs(pipe.transformer), expected, atol=1e-5, rtol=1e-4)


def test_peft_export_is_a_copy_of_the_adapter(adapter_run, tmp_path):
    run, _ = adapter_run
    assert export.main([str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    source = run / "checkpoints" / "epoch_0001" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / name).read_bytes() == (source / name).read_bytes()


def test_export_mistakes_are_one_line_errors(adapter_run, tmp_path, capsys):
    run, _ = adapter_run
    assert export.main([str(tmp_path / "no_such_run"), "--format", "kohya", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--format", "peft", "--out", str(tmp_path / "x")]) == 1
    assert "holds no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        export.main([str(run), "--format", "a1111", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'a1111'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown export format 'a1111'"):
        export.export(export.find_adapter(str(run)), "a1111", tmp_path / "x")


# --------------------------------------------------------------------------- FLUX.1 in kohya's layout


def _flux_adapter(modules: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int):
    """A peft adapter in memory: module -> (in, out) features, random non-zero lora_A/lora_B."""
    from peft import LoraConfig as PeftLoraConfig

    from fdfo.adapters import PeftAdapter

    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (fan_in, fan_out) in modules.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
        state[f"{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.1
    return PeftAdapter(path=Path("flux_adapter"), config=PeftLoraConfig(r=rank, lora_alpha=alpha), state=state)


def test_flux_kohya_state_is_what_diffusers_converter_reads_back(tmp_path):
    """A FLUX.1 [dev]-sized double block and single block (hidden 3072, MLP 12288: the sizes diffusers'
    converter of kohya's FLUX.1 files assumes): every module's update alpha/rank * up @ down, as that
    converter splits the fused modules again, equals the adapter's scale * B @ A (on random vectors, in
    float64); the single block's proj_mlp, which the adapter leaves alone, gets a zero update."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    hidden, mlp = 3072, 12288
    rank, alpha = random.choice([(2, 3.0), (4, 2.0)])
    double = {f"transformer_blocks.0.{m}": (hidden, hidden) for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out")}
    single = {f"single_transformer_blocks.0.attn.{m}": (hidden, hidden) for m in ("to_q", "to_k", "to_v")}
    adapter = _flux_adapter({**double, **single, "single_transformer_blocks.0.proj_out": (hidden + mlp, hidden)},
                            rank, alpha, seed=random.randrange(2**31))
    state = export.kohya_state(adapter)
    assert sorted({k.split(".")[0] for k in state}) == [
        "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"]
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    scale = alpha / rank
    for module in adapter.state:
        if not module.endswith(".lora_A.weight"):
            continue
        name = module.removesuffix(".lora_A.weight")
        a, b = (adapter.state[f"{name}.lora_{p}.weight"].double() for p in "AB")
        got_a, got_b = (converted[f"transformer.{name}.lora_{p}.weight"].double() for p in "AB")
        # (the converter scales in float32: float32 rounding of entries of about 0.01-0.1)
        torch.testing.assert_close(got_b @ got_a, scale * b @ a, rtol=1e-5, atol=1e-7)
    mlp_a = converted["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    mlp_b = converted["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    assert mlp_b.shape == (mlp, rank) and not (mlp_b @ mlp_a).any()


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from fdfo.models.tiny import build_tiny_flux_pipeline

    out = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux_pipeline(num_layers=2, num_single_layers=2, max_text_tokens=16, seed=4).save_pretrained(out)
    return out


def flux_outputs(transformer) -> torch.Tensor:
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    tokens, text = 16, 5
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(2, tokens, cfg.in_channels, generator=g),
            encoder_hidden_states=torch.randn(2, text, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.3, 0.7]), guidance=torch.tensor([3.5, 3.5]),
            img_ids=torch.randn(tokens, 3, generator=g), txt_ids=torch.zeros(text, 3), return_dict=False)[0]


def test_flux_kohya_file_loads_with_flux_pipelines_load_lora_weights(flux_dir, tmp_path):
    """A trained-looking FLUX.1 adapter of both streams' attention and the single blocks' output projections,
    exported as kohya's file, loaded by FluxPipeline.load_lora_weights (diffusers' converter of kohya's
    FLUX.1 files): the transformer's outputs are the adapter's. (A single block's fused linear1 has FLUX.1's
    hard-coded sizes in that converter; the test above checks it.)"""
    from diffusers import FluxPipeline

    from fdfo.models.flux import FluxFlowModel

    model = FluxFlowModel(str(flux_dir), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16,
                          resolution=16)
    targets = [f"transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")]
    model.add_lora(LoraConfig(rank=4, alpha=6.0, target_modules=[*targets, "attn.add_q_proj", "attn.add_k_proj",
                                                                   "attn.add_v_proj", "attn.to_add_out", "proj_out"]))
    g = torch.Generator().manual_seed(random.randrange(2**31))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    expected = flux_outputs(model.transformer)
    adapter_dir = tmp_path / "adapter"
    model.save_lora(adapter_dir)
    assert export.main([str(adapter_dir), "--format", "kohya", "--out", str(tmp_path / "flux_lora")]) == 0
    state = load_file(str(tmp_path / "flux_lora.safetensors"))
    assert "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight" in state
    assert "lora_unet_single_blocks_1_linear2.alpha" in state
    pipe = FluxPipeline.from_pretrained(str(flux_dir), dtype=torch.float32)
    base = flux_outputs(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "flux_lora.safetensors"))
    torch.testing.assert_close(flux_outputs(pipe.transformer), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)


def test_a_single_block_fuses_whatever_the_order_of_its_modules():
    """linear1's input width is that of its own pieces, not of the first module read (proj_out's is wider)."""
    hidden, mlp, rank = 32, 128, 2
    adapter = _flux_adapter({"single_transformer_blocks.0.proj_out": (hidden + mlp, hidden),
                             "single_transformer_blocks.0.attn.to_q": (hidden, hidden)}, rank, 4.0, seed=1)
    state = export.kohya_state(adapter)
    down, up = state["lora_unet_single_blocks_0_linear1.lora_down.weight"], state[
        "lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (4 * rank, hidden) and up.shape == (3 * hidden + mlp, 4 * rank)
    a, b = (adapter.state[f"single_transformer_blocks.0.attn.to_q.lora_{p}.weight"] for p in "AB")
    delta = state["lora_unet_single_blocks_0_linear1.alpha"] / (4 * rank) * up @ down
    torch.testing.assert_close(delta[:hidden], 4.0 / rank * b @ a)
    assert not delta[hidden:].any()


def test_a_flux_checkpoint_of_double_blocks_only_is_known_by_its_run_config(flux_dir, tmp_path):
    """Its module names are SD3's too: the run config's base (a FLUX.1 pipeline) decides the layout; a bare
    adapter folder of the same weights gets the SD3 layout."""
    import json
    import shutil

    from fdfo.models.flux import FluxFlowModel

    model = FluxFlowModel(str(flux_dir), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16,
                          resolution=16)
    model.add_lora(LoraConfig(rank=2, alpha=2.0, target_modules=["attn.add_q_proj", "attn.to_add_out"]))
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_0001"
    model.save_lora(checkpoint / "adapter")
    (checkpoint / "trainer.json").write_text(json.dumps({"epoch": 1, "config": {"model": {"path": str(flux_dir)}}}))
    assert export.main([str(checkpoint), "--format", "kohya", "--out", str(tmp_path / "flux.safetensors")]) == 0
    assert sorted({k.split(".")[0] for k in load_file(str(tmp_path / "flux.safetensors"))}) == [
        f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in ("txt_attn_proj", "txt_attn_qkv")]
    # (the adapter/ folder of the checkpoint has its run config too; a copy of it elsewhere has none)
    assert export.main([str(checkpoint / "adapter"), "--format", "kohya", "--out", str(tmp_path / "in_run")]) == 0
    in_run, flux = (load_file(str(tmp_path / name)) for name in ("in_run.safetensors", "flux.safetensors"))
    assert in_run.keys() == flux.keys()
    shutil.copytree(checkpoint / "adapter", tmp_path / "bare_adapter")
    assert export.main([str(tmp_path / "bare_adapter"), "--format", "kohya", "--out", str(tmp_path / "bare")]) == 0
    bare = load_file(str(tmp_path / "bare.safetensors"))
    assert bare and all(k.startswith("lora_transformer_transformer_blocks_") for k in bare)


def test_a_flux_module_outside_kohyas_layout_is_refused_with_its_name():
    adapter = _flux_adapter({"single_transformer_blocks.0.attn.to_q": (32, 32), "x_embedder": (64, 32)}, 2, 2.0, 0)
    with pytest.raises(ValueError, match="adapts 'x_embedder', which kohya's FLUX.1 layout has no module for"):
        export.kohya_state(adapter)
