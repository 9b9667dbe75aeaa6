"""FLUX.1 end to end on a tiny random FluxPipeline loaded with from_pretrained: FDFO and Flow-GRPO epochs
through the trainer, the sampler's eager twin and the Triton kernels, ZeRO-3 on two ranks, the exported
adapter in a stock FluxPipeline, the generate and evaluate commands, and bad input.

The reward is PickScore's code path on a tiny random CLIP (fdfo.rewards.tiny): the FLUX VAE decodes to RGB
images, which the CLIP image processor takes as they are. tests/test_flux.py checks the model itself
against FluxPipeline (σ grid, packing, velocity, guidance, LoRA targets, VAE).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fdfo.config import LoraConfig, ModelConfig
from fdfo.errors import ConfigError
from fdfo.settings import build_config, check_family
from fdfo.models import SD3FlowModel
from tests.conftest import _DIST_ENV
from tests.test_distributed import adapter, launch, records

ROOT = Path(__file__).resolve().parents[1]
TEXT = 16  # T5 tokens (max_sequence_length) of the tiny pipeline
RES = 16  # pixels: the tiny VAE's factor 2 gives an 8×8 latent, 4×4 tokens of 2×2 patches
LAYERS = 2  # double-stream blocks, and as many single-stream blocks
PROMPTS = ROOT / "prompts" / "examples.txt"
DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1 [dev]-like pipeline (guidance-distilled) saved with save_pretrained."""
    from fdfo.models.tiny import build_tiny_flux_pipeline

    out = tmp_path_factory.mktemp("tiny_flux")
    build_tiny_flux_pipeline(num_layers=LAYERS, num_single_layers=LAYERS, max_text_tokens=TEXT,
                             seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with its tokenizer and image processor: PickScore's and CLIP score's code path."""
    from fdfo.rewards.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def flux_run(out_dir, flux_dir, clip_dir, **sections):
    """A tiny FDFO run on the tiny FLUX pipeline, rewarded by PickScore's code path."""
    overrides = {
        "name": "tiny-flux",
        "model": {"path": str(flux_dir), "resolution": RES, "max_sequence_length": TEXT},
        "lora": {"rank": 4, "alpha": 8.0},
        "sampling": {"steps": 4, "micro_batch_pairs": 2},
        "train": {"epochs": 1, "micro_batch_rows": 4, "learning_rate": 1e-3},
        "data": {"prompts": str(PROMPTS)},
        "reward": {"weights": {"pickscore": 1.0}},
        "eval": {"every": 0, "metrics": []},
        "log": {"out_dir": str(out_dir), "plot_every": 0, "progress": False},
        "checkpoint": {"every": 0},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    names = set(overrides["reward"]["weights"]) | set(overrides["eval"]["metrics"])
    overrides["reward"].setdefault("paths", {n: str(clip_dir) for n in names})
    # FDFO's epoch, as the test job's defaults: a run that picks Flow-GRPO leaves them unread.
    return build_config(overrides, under={"fdfo": {"pairs_per_epoch": 4, "optimizer_steps_per_epoch": 2}})


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.lora_state_dict().items()}


def adapted_layers(keys) -> set[str]:
    """The transformer layers an adapter's weight names (diffusers' or peft's) adapt."""
    out = set()
    for key in keys:
        name = key.removeprefix("transformer.").removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
            if name.endswith(part):
                out.add(name[: -len(part)])
    return out


def expected_layers() -> set[str]:
    return ({f"transformer_blocks.{i}.attn.{p}" for i in range(LAYERS) for p in DOUBLE}
            | {f"single_transformer_blocks.{i}.{p}" for i in range(LAYERS) for p in SINGLE})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flux_dir, clip_dir):
    """One FDFO epoch in this process, with an evaluation before and after, the sample grid and a checkpoint."""
    from fdfo.trainer import Trainer

    run = tmp_path_factory.mktemp("flux_run") / "run"
    cfg = flux_run(run, flux_dir, clip_dir, eval={"every": 1, "num_images": 4, "metrics": ["clip_score"]},
                   log={"plot_every": 1, "grid_pairs": 2}, checkpoint={"every": 1})
    saved = {k: os.environ.get(k) for k in _DIST_ENV}  # (the trainer makes this process rank 0 of 1)
    try:
        t = Trainer(cfg)
        start = lora_weights(t)
        history = t.run()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return t, start, history, run


def test_fdfo_epoch_trains_double_and_single_blocks(trained):
    t, start, history, run = trained
    final = lora_weights(t)
    assert any(not torch.equal(start[k], final[k]) for k in start), "training did not change the adapter"
    (epoch,) = [r for r in history if r["kind"] == "epoch"]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert len(steps) == 2 and not epoch["skipped"] and epoch["images_sampled"] == 8
    for r in (epoch, *steps):
        for key in ("loss", "policy_loss", "grad_norm"):
            assert r[key] is not None and torch.isfinite(torch.tensor(r[key])), (key, r)
    assert epoch["reward_std"] > 0  # the pairs' images differ, so the reward differences carry a signal
    # A trajectory state is the unpacked latent [16, 8, 8] fp32: 8 rows × 4 steps of xs and vs as sampled,
    # and again as this rank's training elements fetched them.
    assert epoch["trajectory_mib"] == pytest.approx(2 * 2 * 8 * 4 * 16 * 8 * 8 * 4 / 2**20)
    evals = [r for r in history if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1] and all(0 <= r["eval/clip_score"] <= 100 for r in evals)
    assert (run / "samples" / "epoch_0001.png").is_file() and (run / "reward_curve.png").is_file()

    # The adapter: every attention projection of both block kinds, with the single blocks' proj_out and
    # not the model's final proj_out, in the trainer and in the exported file.
    assert adapted_layers(final) == expected_layers()
    from safetensors.torch import load_file

    exported = load_file(str(run / "checkpoints" / "epoch_0001" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert adapted_layers(exported) == expected_layers() and "transformer.proj_out.lora_A.weight" not in exported
    assert (run / "checkpoints" / "latest").read_text() == "epoch_0001"


def test_exported_adapter_loads_into_a_stock_flux_pipeline(trained, flux_dir):
    """FluxPipeline.load_lora_weights(checkpoints/epoch_0001/adapter) changes the pipeline's output to what
    the trained model samples (the same Euler loop, σ grid and distilled guidance)."""
    from diffusers import FluxPipeline

    from fdfo.sampling import sample_deterministic

    t, _, _, run = trained
    model, steps, prompts = t.model, 3, ["a red cube on a table", "a lighthouse at dusk"]
    stock = FluxPipeline.from_pretrained(str(flux_dir))
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    side = model.latent_shape[1]

    def stock_latents():
        packed = stock(prompts, latents=FluxPipeline._pack_latents(noise, 2, 16, side, side), height=RES, width=RES,
                       num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=TEXT,
                       output_type="latent").images
        return FluxPipeline._unpack_latents(packed, RES, RES, stock.vae_scale_factor)

    base = stock_latents()
    stock.load_lora_weights(str(run / "checkpoints" / "epoch_0001" / "adapter"))
    loaded = {n[: -len(".lora_A")] for n, _ in stock.transformer.named_modules() if n.endswith(".lora_A")}
    assert loaded == expected_layers()
    adapted = stock_latents()
    cond = model.encode(prompts)
    with torch.no_grad():
        ours = sample_deterministic(lambda x, s: model.velocity(x, s, cond), noise, model.sigmas(steps))
    torch.testing.assert_close(adapted, ours, rtol=1e-4, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-4  # the adapter changed the stock pipeline's output


def test_flow_grpo_epoch_on_flux(tmp_path, flux_dir, clip_dir):
    from fdfo.trainer import Trainer

    cfg = flux_run(tmp_path / "g", flux_dir, clip_dir, train={"algorithm": "flow_grpo", "micro_batch_rows": 3},
                   flow_grpo={"group_size": 2, "groups_per_epoch": 2, "kl_beta": 0.01})
    t = Trainer(cfg)
    before = lora_weights(t)
    t.run()
    after = lora_weights(t)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert adapted_layers(after) == expected_layers()
    lines = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["policy_loss"]])).all() for r in steps)
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-4)  # first update: the sampling policy itself
    assert steps[0]["kl"] >= 0
    (epoch,) = [r for r in lines if r["kind"] == "epoch"]
    assert epoch["images_sampled"] == 4 and not epoch["skipped"]


def _flux_model(flux_dir):
    from fdfo.models import FluxFlowModel

    model = FluxFlowModel(str(flux_dir), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=TEXT,
                          resolution=RES)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # a live adapter: the sampler must read the adapted weights
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def test_sampler_eager_twin_and_triton_kernels_are_sample_pairs_with_flux(flux_dir, monkeypatch):
    """GraphSampler.for_model on the FLUX model (its eager twin on CPU), without and with real CFG: with the
    PyTorch kernels exactly sample_pairs given the same noise, with the Triton kernels (interpreter) within
    float rounding."""
    from fdfo import kernels
    from fdfo.graphs import GraphSampler
    from fdfo.sampling import churn_schedule
    from tests.test_graphs import _reference

    model = _flux_model(flux_dir)
    P, T = 2, 3
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(P, *model.latent_shape, generator=g)
    cond = model.encode(["a red cube on a table", "a lighthouse at dusk"]).repeat_rows(2)
    uncond = model.encode([""])
    sigmas = model.sigmas(T)
    g_prior, g_steps = churn_schedule("raw", 0.2, sigmas, 2 * P)
    g_steps[0] *= torch.linspace(0.5, 1.5, 2 * P, dtype=torch.float64)  # per-row γ, to catch row mix-ups

    def net(x, sigma, c):
        return model.velocity(x, sigma, c)

    backends = ["torch"] + (["triton"] if kernels.triton_interpreted() else [])
    for backend in backends:
        for guidance in (1.0, 2.5):
            sampler = GraphSampler.for_model(model, guidance_scale=guidance, uncond=uncond, backend=backend,
                                             log=lambda msg: None)
            got = sampler.sample(latents, cond, sigmas, g_prior, g_steps, seed=7)
            assert sampler.mode == "eager" and sampler.module is model.transformer
            ref = _reference(monkeypatch, net, latents, cond, uncond, guidance, sigmas, g_prior, g_steps, 7, backend)
            for name in ("xs", "vs", "x0"):
                a, b = getattr(got, name), getattr(ref, name)
                assert a.shape == b.shape and a.shape[-3:] == model.latent_shape, name
                if backend == "torch":
                    assert torch.equal(a, b), f"{name} (CFG {guidance}): max |Δ| = {(a - b).abs().max()}"
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert not torch.equal(got.x0[0::2], got.x0[1::2])  # the churn drove each pair's rows apart
    if "triton" not in backends:
        pytest.skip("the Triton half needs triton imported with TRITON_INTERPRET=1 (tests/conftest.py)")


def test_triton_kernels_train_like_the_torch_reference_on_flux(tmp_path, flux_dir, clip_dir):
    """train.kernels: triton (the interpreter on CPU: pair differences and the FD loss) takes the same step."""
    from fdfo import kernels
    from fdfo.trainer import Trainer

    if not kernels.triton_interpreted():
        pytest.skip("the Triton kernels cannot run on CPU tensors here (no triton, or no TRITON_INTERPRET=1)")
    finals = {}
    for backend in ("torch", "triton"):
        t = Trainer(flux_run(tmp_path / backend, flux_dir, clip_dir, train={"kernels": backend}))
        t.run()
        finals[backend] = lora_weights(t)
    assert any(v.abs().max() > 0 for k, v in finals["torch"].items() if "lora_B" in k)
    for k in finals["torch"]:
        torch.testing.assert_close(finals["triton"][k], finals["torch"][k], rtol=1e-4, atol=1e-6)


def test_zero3_two_ranks_take_the_one_rank_step_on_flux(tmp_path, flux_dir, clip_dir):
    """ZeRO-3 (with the persistent inference copy for sampling) on 2 CPU ranks and on 1: the same global
    batch gives the same loss, gradient norm and adapter; both write their checkpoints.

    AdamW's first step is lr·g/(|g| + ε): for a weight whose gradient is within a few ε of zero it turns
    the rounding difference between the two ranks' summed gradient and one rank's into a visible step
    (seen: 0.4% of one step on one weight of 128). With ε = 1e-3 the step is lr·g/ε for the gradients
    here, so the adapters compare the gradients themselves, at the tolerance of the SD3 ZeRO tests."""
    runs = {}
    for ranks in (1, 2):
        run = tmp_path / f"ranks{ranks}"
        cfg = flux_run(run, flux_dir, clip_dir, train={"micro_batch_rows": 4, "learning_rate": 0.1, "adam_eps": 1e-3},
                       fdfo={"optimizer_steps_per_epoch": 1},
                       deepspeed={"config": str(ROOT / "configs/ds/zero3.json")}, checkpoint={"every": 1})
        out = launch(ranks, cfg, tmp_path)
        assert out.count("checkpoint written") == 1, out[-3000:]
        runs[ranks] = run
    one, two = runs[1], runs[2]
    step_two, step_one = records(two, "step")[0], records(one, "step")[0]
    for key in ("loss", "policy_loss", "clipfrac", "ratio", "grad_norm"):
        assert step_two[key] == pytest.approx(step_one[key], rel=1e-5, abs=1e-7), key
    assert records(two, "epoch")[0]["reward_mean"] == pytest.approx(records(one, "epoch")[0]["reward_mean"], rel=1e-6)
    w2, w1 = adapter(two, 1), adapter(one, 1)
    assert w2.keys() == w1.keys() and adapted_layers(w1) == expected_layers()
    # B starts at zero: the step happened, and moved it well beyond the tolerance below
    assert max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k) > 1e-4
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    ckpt = two / "checkpoints" / "epoch_0001"
    assert sorted(p.name for p in (ckpt / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (two / "checkpoints" / "latest").read_text() == "epoch_0001"


def test_generate_and_evaluate_with_a_flux_checkpoint(trained, flux_dir, clip_dir, tmp_path):
    from PIL import Image

    from fdfo import evaluate, generate

    _, _, _, run = trained
    prompts = ["a red cube on a table", "a lighthouse at dusk"]
    gen = tmp_path / "gen"
    assert generate.main(["--adapter", str(run), "--model", str(flux_dir), "--prompt", *prompts, "--seeds", "0", "3",
                          "--out", str(gen)]) == 0
    info = json.loads((gen / "generation.json").read_text())
    assert info["model"] == str(flux_dir) and info["adapter"].endswith("epoch_0001/adapter")
    assert info["steps"] == 4 and info["resolution"] == [RES, RES] and len(info["images"]) == 4
    image = Image.open(gen / "images" / "p0001_s3.png")
    assert image.mode == "RGB" and image.size == (RES, RES)
    # The base model alone (its settings given on the command line) draws another image from the same seed.
    base = tmp_path / "base"
    assert generate.main(["--model", str(flux_dir), "--prompt", prompts[1], "--seeds", "3", "--steps", "4",
                          "--resolution", str(RES), "--max-sequence-length", str(TEXT), "--out", str(base)]) == 0
    assert Image.open(base / "images" / "p0000_s3.png").tobytes() != image.tobytes()

    out = tmp_path / "eval"
    assert evaluate.main(["--adapter", str(run), "--model", str(flux_dir), "--prompt", *prompts, "--repeats", "2",
                          "--metrics", "pickscore", "clip_score", "clip_diversity", "--path", f"pickscore={clip_dir}",
                          f"clip_score={clip_dir}", f"clip_diversity={clip_dir}", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == str(flux_dir) and res["prompts"] == 2 and res["repeats"] == 2 and res["steps"] == 4
    assert set(res["metrics"]) == {"pickscore", "clip_score", "clip_diversity"}
    for entry in res["metrics"].values():
        assert all(torch.isfinite(torch.tensor(entry[v])) for v in ("base", "checkpoint", "delta"))
    assert res["metrics"]["pickscore"]["delta"] != 0  # the checkpoint was applied
    assert (out / "report.html").is_file()


def test_generate_samples_with_the_runs_flux_guidance(trained, flux_dir, tmp_path, monkeypatch):
    """A run trained with flux.guidance 2.0 must be sampled by generate/evaluate at 2.0 as well."""
    from fdfo import generate, inference

    _, _, _, run = trained
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_0001"
    shutil.copytree(run / "checkpoints" / "epoch_0001" / "adapter", ckpt / "adapter")
    state = json.loads((run / "checkpoints" / "epoch_0001" / "trainer.json").read_text())
    state["config"]["flux"]["guidance"] = 2.0
    (ckpt / "trainer.json").write_text(json.dumps(state))
    seen = []
    load = inference.load_flow_model
    monkeypatch.setattr(inference, "load_flow_model", lambda *a, **kw: seen.append(load(*a, **kw)) or seen[-1])
    assert generate.main(["--adapter", str(ckpt), "--prompt", "a cat", "--out", str(tmp_path / "gen")]) == 0
    assert seen[0].flux_guidance == 2.0


# --------------------------------------------------------------------------- bad input


def _index(directory: Path, pipeline: str, transformer: str | None, **components) -> Path:
    """A model directory holding only a hand-written model_index.json (no weights: loading any would fail)."""
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}
    if transformer is not None:
        index["transformer"] = ["diffusers", transformer]
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


def _load(path: Path, **model):
    from fdfo.models import load_flow_model

    return load_flow_model(ModelConfig(path=str(path), resolution=RES, max_sequence_length=TEXT, **model),
                           torch.device("cpu"))


def test_an_unsupported_model_directory_lists_the_supported_families(tmp_path, capsys):
    from fdfo import generate, train

    unet = _index(tmp_path / "sd15", "StableDiffusionPipeline", None, unet=["diffusers", "UNet2DConditionModel"])
    other = _index(tmp_path / "other", "SanaPipeline", "SanaTransformer2DModel")
    supported = r"supported: sd3 \(SD3Transformer2DModel\), flux \(FluxTransformer2DModel\)"
    with pytest.raises(ConfigError, match=f"StableDiffusionPipeline whose transformer is missing.*{supported}"):
        _load(unet)
    with pytest.raises(ConfigError, match=f"transformer is SanaTransformer2DModel: not a supported model family; "
                                          f"{supported}"):
        _load(other)  # (no weights there: the family was checked before any load)
    assert train.main(["--model.path", str(other), "--log.out_dir", str(tmp_path / "r"), "--log.progress", "false",
                       "--reward.weights", "{clip_score: 1.0}"]) == 1
    assert "not a supported model family" in capsys.readouterr().err
    assert generate.main(["--model", str(other), "--prompt", "a cat", "--out", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert "not a supported model family" in err and "flux (FluxTransformer2DModel)" in err


def test_flux_guidance_on_an_sd3_model_names_the_key(tmp_path, capsys):
    from fdfo import train

    sd3 = _index(tmp_path / "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel")
    with pytest.raises(ConfigError, match="config key 'flux.guidance' is a flux setting, but model.path .* is "
                                          "a sd3 model: remove it"):
        check_family(build_config({"model": {"path": str(sd3)}, "flux": {"guidance": 2.0}}), SD3FlowModel)
    assert train.main(["--model.path", str(sd3), "--flux.guidance", "2.0", "--log.out_dir",
                       str(tmp_path / "r"), "--log.progress", "false", "--reward.weights", "{clip_score: 1.0}"]) == 1
    assert "'flux.guidance' is a flux setting" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'flash' is not available for sd3"):
        _load(sd3, attention_backend="flash")  # FLUX's backends are FLUX's


@pytest.mark.parametrize("backend, package, module", [("flash", "flash-attn", "flash_attn"),
                                                      ("sage", "sageattention", "sageattention"),
                                                      ("xformers", "xformers", "xformers")])
def test_a_flux_attention_backend_without_its_package_names_it(tmp_path, backend, package, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed here")
    flux = _index(tmp_path / "flux", "FluxPipeline", "FluxTransformer2DModel")
    with pytest.raises(ConfigError, match=f"model.attention_backend '{backend}' is not usable here: .*{package}"):
        _load(flux, attention_backend=backend)  # (no weights there: checked before any load)
    with pytest.raises(ConfigError, match="valid values: .*_native_flash"):
        _load(flux, attention_backend="fastest")
