"""LoRA export (``python -m fdfo.export``): an adapter written as kohya/ComfyUI's single file and as diffusers'
``pytorch_lora_weights.safetensors`` gives the transformer outputs of the adapter it came from."""

from __future__ import annotations

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
