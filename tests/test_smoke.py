"""The user's path once, on the built-in digits job: train an epoch with the real command, load the
exported adapter into a stock diffusers pipeline, generate with it.

Marked ``smoke``: `make smoke` (the second half of .ci/run) runs the smoke tests in an environment
resolved anew from setup.py's ranges, so that a new release that breaks a user's first run is seen
the day it appears. They are part of the full suite too.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.smoke


def test_the_digits_job_trains_exports_and_generates(tmp_path, digit_reward_dir):
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from fdfo import generate, tasks, train
    from fdfo.models import SD3FlowModel
    from fdfo.tasks.digits import BASE_DIR_NAME
    from tests.conftest import install_untrained_digits

    # The cached built-in base, untrained (no minutes of pretraining): the job itself is the shipped one.
    install_untrained_digits(tasks.cache_root(), digit_reward_dir, tmp_path / "unused-adapter")
    run = tmp_path / "run"
    assert train.main(["--train.epochs", "1", "--log.out_dir", str(run), "--log.progress", "false"]) == 0
    (epoch,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert epoch["epoch"] == 1 and epoch["images_sampled"] > 0 and torch.isfinite(torch.tensor(epoch["policy_loss"]))
    adapter = run / "checkpoints" / "epoch_0001" / "adapter"

    # A stock pipeline with the exported adapter computes the velocity fdfo's model does with it (the
    # digits base works on pixels with two small CLIP encoders: it has no VAE and no T5).
    base = tasks.cache_root() / BASE_DIR_NAME
    pipe = StableDiffusion3Pipeline.from_pretrained(str(base), vae=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(adapter))
    model = SD3FlowModel(str(base), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=4)
    model.load_adapter(adapter)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x, sigma = torch.randn(3, *model.latent_shape, generator=g), torch.rand(3, generator=g)
    cond = model.encode(["a handwritten digit one", "a handwritten digit five", "a handwritten digit nine"])
    with torch.no_grad():
        expected = model.velocity(x, sigma, cond)
        got = pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                               pooled_projections=cond.pooled, return_dict=False)[0]
        model.remove_adapters()
        untrained = model.velocity(x, sigma, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, untrained), "the epoch did not change the adapter"

    out = tmp_path / "gen"
    assert generate.main(["--adapter", str(run), "--prompts", "builtin:digits", "--seeds", "0",
                          "--out", str(out)]) == 0
    info = json.loads((out / "generation.json").read_text())
    assert len(info["images"]) == 10
    image = Image.open(out / "images" / "p0003_s0.png")
    assert image.size == (16, 16) and image.getextrema()[0] < image.getextrema()[1]
