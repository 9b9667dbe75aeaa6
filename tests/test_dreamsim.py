"""DreamSim diversity: loading only from a local cache, never downloading, and fdfo's side of the metric.

The ``dreamsim`` package is not installed here and cannot be: it imports torchvision (directly and
through open_clip), and the only torchvision wheels on the package index are CUDA builds, which do not
import with the CPU build of torch. So DreamSim's own numbers are not checked here. What is checked:
the cache check (a missing, absent or incomplete cache is one clear error, found before the package is
imported, so that it can never download), the error without the package, and, against a stand-in
module with the ``dreamsim`` package's interface (``dreamsim(pretrained, device, cache_dir, ...)``
returning a model with ``embed`` and ``model(a, b) = 1 − cos`` and a preprocess function), that the
diversity is the mean of ``model(a, b)`` over a prompt's pairs of images, whatever the batch size, and
that torch.hub's directory is put back.
"""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fdfo.rewards import DIVERSITY_METRICS, RewardUnavailable, build_diversity, mean_pairwise_distance
from fdfo.rewards.dreamsim import ADAPTER_WEIGHTS, CACHE_FILES, DreamSimDiversity, missing_cache_files


def make_cache(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """A directory with every file name of DreamSim's ensemble cache (empty files: only names are checked)."""
    for name in (*CACHE_FILES, ADAPTER_WEIGHTS[0]):
        if name not in skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"")
    return root


@pytest.fixture
def no_package(monkeypatch):
    """``import dreamsim`` fails, as where the package is not installed."""
    monkeypatch.setitem(sys.modules, "dreamsim", None)


def test_registry_and_names():
    assert set(DIVERSITY_METRICS) == {"dreamsim_diversity", "clip_diversity"}
    assert DreamSimDiversity.name == "dreamsim_diversity"
    from fdfo.rewards.clip_score import ClipImageDiversity

    assert ClipImageDiversity.name == "clip_diversity" and "DreamSim" not in ClipImageDiversity.note
    with pytest.raises(ValueError, match="unknown diversity metric 'diversity'; available: dreamsim_diversity, "
                                         "clip_diversity"):
        build_diversity("diversity", None, "cpu")


def test_missing_or_incomplete_cache_is_one_clear_error(tmp_path, monkeypatch):
    # The package is never reached: a stand-in that fails if imported.
    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(
        dreamsim=lambda *a, **k: pytest.fail("dreamsim() was called with an incomplete cache")))
    with pytest.raises(RewardUnavailable, match=r"DreamSim diversity is not available: no weights given \(it never "
                                                r"downloads\); on a machine with network run `pip install "
                                                r"dreamsim==0\.2\.1`"):
        build_diversity("dreamsim_diversity", None, "cpu")
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent/ds' does not exist; give the directory DreamSim "
                                                r"cached its weights in: .*--path dreamsim_diversity=DIR"):
        DreamSimDiversity("/nonexistent/ds")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        DreamSimDiversity(str(tmp_path / "file"))

    cache = make_cache(tmp_path / "cache", skip=("checkpoints/dino_vitbase16_pretrain.pth", ADAPTER_WEIGHTS[0]))
    assert missing_cache_files(cache) == ["checkpoints/dino_vitbase16_pretrain.pth", " or ".join(ADAPTER_WEIGHTS)]
    with pytest.raises(FileNotFoundError) as err:
        DreamSimDiversity(str(cache))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"dreamsim_diversity: '{cache}' is not a complete DreamSim cache (it "
                                              "lacks checkpoints/dino_vitbase16_pretrain.pth, "
                                              "ensemble_lora/adapter_model.safetensors or ")
    assert missing_cache_files(make_cache(tmp_path / "full")) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DreamSimDiversity(str(tmp_path / "full"), batch_size=0)


def test_without_the_package_it_is_reported_not_available(tmp_path, no_package):
    with pytest.raises(RewardUnavailable, match=r"DreamSim diversity is not available: the dreamsim package cannot "
                                                r"be imported \(.*\); install dreamsim==0\.2\.1 with a torchvision "
                                                r"built for this torch"):
        build_diversity("dreamsim_diversity", str(make_cache(tmp_path)), "cpu")


class StandInModel(torch.nn.Module):
    """The dreamsim package's model interface: ``embed`` (centred, unit rows, as with normalize_embeds=True)
    and ``forward(a, b) = 1 − cos(embed(a), embed(b))``; here the embedding is a random linear map."""

    def __init__(self, dim=24, seed=0):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 32 * 32, dim)
        g = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.proj.weight, generator=g)
        torch.nn.init.normal_(self.proj.bias, generator=g)
        self.calls = 0

    def embed(self, img):
        self.calls += 1
        e = self.proj(torch.nn.functional.adaptive_avg_pool2d(img, 32).flatten(1))
        e = e - e.mean(dim=1, keepdim=True)
        return e / e.norm(dim=1, keepdim=True)

    def forward(self, a, b):
        return 1 - torch.nn.functional.cosine_similarity(self.embed(a), self.embed(b), dim=-1)


@pytest.fixture
def stand_in(monkeypatch):
    """A module named dreamsim with the package's dreamsim() function; records its calls."""
    from PIL import Image

    calls = []

    def preprocess(pil_img):  # as the package's: RGB, 224×224 bicubic, [0, 1] tensor [1, 3, 224, 224]
        pil_img = pil_img.convert("RGB").resize((224, 224), Image.BICUBIC)
        return torch.from_numpy(np.asarray(pil_img, dtype=np.float32)).permute(2, 0, 1)[None] / 255

    def dreamsim(pretrained=True, device="cuda", cache_dir="./models", normalize_embeds=True,
                 dreamsim_type="ensemble", use_patch_model=False):
        calls.append(dict(pretrained=pretrained, device=device, cache_dir=cache_dir, normalize_embeds=normalize_embeds,
                          dreamsim_type=dreamsim_type))
        torch.hub.set_dir(cache_dir)  # as the package does (for DINO's torch.hub load)
        if (Path(cache_dir) / "damaged").exists():
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
        return StandInModel().to(device), preprocess

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
    return calls, preprocess


def test_diversity_is_the_mean_pairwise_model_distance(tmp_path, stand_in):
    calls, preprocess = stand_in
    cache = make_cache(tmp_path / "cache")
    hub_dir = torch.hub.get_dir()
    metric = build_diversity("dreamsim_diversity", str(cache), "cpu", batch_size=3)
    assert calls == [dict(pretrained=True, device="cpu", cache_dir=str(cache), normalize_embeds=True,
                          dreamsim_type="ensemble")]
    assert torch.hub.get_dir() == hub_dir  # put back after the package pointed it at the cache
    assert not metric.model.training and not any(p.requires_grad for p in metric.model.parameters())

    from PIL import Image

    from fdfo.rewards.base import to_uint8

    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))  # one prompt's 4 images
    emb = metric.embed_images(images)
    assert metric.model.calls == 2  # 4 images in batches of 3
    assert emb.shape == (4, 24) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    # The reference: the package's own use, model(preprocess(a), preprocess(b)), over the 6 pairs.
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in to_uint8(images)]
    with torch.no_grad():
        pairs = [float(metric.model(preprocess(a), preprocess(b))) for a, b in itertools.combinations(pil, 2)]
    expected = sum(pairs) / len(pairs)
    assert abs(float(mean_pairwise_distance(emb)) - expected) < 1e-5
    assert abs(float(metric.diversity(images)) - expected) < 1e-5

    one_batch = build_diversity("dreamsim_diversity", str(cache), "cpu")
    torch.testing.assert_close(one_batch.embed_images(images), emb, rtol=0, atol=1e-6)
    assert float(metric.diversity(images[:1]).isnan())  # one image: no pair
    grey = images[:, :1]  # one channel is embedded as grey RGB
    torch.testing.assert_close(metric.embed_images(grey), metric.embed_images(grey.expand(-1, 3, -1, -1)))


def test_damaged_cache_is_one_line(tmp_path, stand_in):
    cache = make_cache(tmp_path / "cache")
    (cache / "damaged").write_text("")
    hub_dir = torch.hub.get_dir()
    with pytest.raises(FileNotFoundError) as err:
        DreamSimDiversity(str(cache))
    msg = str(err.value)
    assert "\n" not in msg and "DreamSim could not be loaded from" in msg and "failed reading zip archive" in msg
    assert "the cache may be damaged" in msg
    assert torch.hub.get_dir() == hub_dir


def test_clip_diversity_through_the_same_interface(tmp_path):
    """The CLIP-based figure (not DreamSim) behind the same builder: unit embeddings, pairwise mean."""
    from fdfo.rewards.tiny import build_tiny_clip

    clip_dir = build_tiny_clip(tmp_path / "clip", seed=0)
    metric = build_diversity("clip_diversity", str(clip_dir), "cpu", batch_size=3)
    assert metric.name == "clip_diversity" and metric.batch_size == 3
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    emb = metric.embed_images(images)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    pairs = [1 - float(a @ b) for a, b in itertools.combinations(emb, 2)]
    assert abs(float(metric.diversity(images)) - sum(pairs) / 6) < 1e-6
    assert float(metric.diversity(images[[0, 0]])) == pytest.approx(0, abs=1e-6)  # identical images
