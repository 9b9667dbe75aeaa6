"""HPSv2's released format (an open_clip CLIP checkpoint) converted to a transformers CLIPModel directory:
a small random open_clip ViT CLIP is saved the way HPSv2's checkpoints are, converted, loaded through the
hpsv2 reward, and compared with open_clip's own model code; and every bad input is one line.

open_clip itself is the reference. Where its package cannot be imported because its torchvision
dependency cannot (the PyPI build of torchvision needs a CUDA build of torch, and CPU CI has the CPU
build), its model and tokenizer modules are loaded without the package's ``__init__`` (which imports
torchvision's transforms): their one torchvision import, ``FrozenBatchNorm2d`` (for ResNet towers, not
used by a ViT), gets a stand-in only while ``open_clip.model`` is imported. The image transform is then
checked against PIL, which is what torchvision's Resize / CenterCrop do on PIL images.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fdfo.rewards import build_reward
from fdfo.rewards.base import to_uint8

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "A red bicycle, leaning on a wall!", "two birds on a wire at dusk", "a photo of a cat"]
SMALL = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def open_clip():
    """open_clip's ``model``, ``tokenizer`` and ``constants`` modules, and whether the whole package
    (with torchvision and its transforms) is importable."""
    try:
        import open_clip as package

        yield types.SimpleNamespace(model=package.model, tokenizer=package.tokenizer, constants=package.constants,
                                    package=package)
        return
    except Exception:  # noqa: BLE001  (ImportError, or the RuntimeError of a torchvision built for CUDA)
        pass
    import transformers  # noqa: F401  (imported, and its torchvision check cached, before the stand-in exists)
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig  # noqa: F401
    from transformers.modeling_outputs import BaseModelOutput  # noqa: F401

    saved = {k: v for k, v in sys.modules.items() if k == "open_clip" or k.startswith(("open_clip.", "torchvision"))}
    for k in saved:
        del sys.modules[k]
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "the open_clip_torch wheel is not installed (scripts/bootstrap.sh installs it)"
    sys.modules["open_clip"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run

    class FrozenBatchNorm2d:  # the stand-in: a ViT never builds one
        def __init__(self, *args, **kwargs):
            raise AssertionError("a stand-in for torchvision's FrozenBatchNorm2d was used")

    stand_in = {}
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        stand_in[name] = types.ModuleType(name)
        stand_in[name].__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    stand_in["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    sys.modules.update(stand_in)
    try:
        model = importlib.import_module("open_clip.model")
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    ns = types.SimpleNamespace(model=model, tokenizer=importlib.import_module("open_clip.tokenizer"),
                               constants=importlib.import_module("open_clip.constants"), package=None)
    yield ns
    for k in [k for k in sys.modules if k == "open_clip" or k.startswith("open_clip.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def small_open_clip(open_clip, seed=0, cfg=SMALL):
    """A random open_clip CLIP of ``cfg``; every parameter moved off its initial value (LayerNorm weights
    and biases included), so that a swapped or transposed weight cannot go unnoticed."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def converted(open_clip, tmp_path_factory):
    """(open_clip model, HPSv2-layout checkpoint, its config file, converted directory)."""
    from fdfo.rewards.convert_hpsv2 import main

    tmp = tmp_path_factory.mktemp("hpsv2")
    model = small_open_clip(open_clip)
    ckpt = tmp / "HPS_v2_small.pt"
    # HPSv2's layout: {"state_dict": ...} beside the training metadata, keys from a DDP wrapper.
    torch.save({"epoch": 1, "name": "hpsv2-small", "state_dict": {f"module.{k}": v for k, v in
                                                                  model.state_dict().items()}}, ckpt)
    arch = tmp / "small.json"
    arch.write_text(json.dumps(SMALL))
    out = tmp / "hpsv2-hf"
    assert main([str(ckpt), str(out), "--arch", str(arch)]) == 0
    return model, ckpt, arch, out


def random_images(n=4, h=40, w=40, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_conversion_matches_open_clip_embeddings_and_hpsv2_score(open_clip, converted):
    model, _, _, out = converted
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["num_attention_heads"] == 2 and cfg["vision_config"]["patch_size"] == 8
    assert cfg["text_config"]["hidden_act"] == cfg["vision_config"]["hidden_act"] == "gelu"

    hps = build_reward("hpsv2", str(out), CPU, dtype="float32", batch_size=3)
    x = random_images()
    with torch.no_grad():
        # The same preprocessed pixels into both models.
        pixels = hps.image_processor(images=list(to_uint8(x)), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (4, 3, 32, 32)
        ref_img = model.encode_image(pixels, normalize=True)
        ours_img = torch.nn.functional.normalize(hps._features(hps.model.get_image_features(pixel_values=pixels)),
                                                 dim=-1)
        torch.testing.assert_close(ours_img, ref_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(hps.embed_images(x), ref_img, rtol=0, atol=1e-5)

        # Prompts through open_clip's own tokenizer (padded with 0 to 77) and through ours.
        ref_ids = open_clip.tokenizer.tokenize(PROMPTS, context_length=77)
        ours_ids = hps.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77)["input_ids"]
        for ref_row, ours_row in zip(ref_ids.tolist(), ours_ids):
            n = ref_row.index(49407) + 1  # up to and with <|endoftext|>
            assert ours_row[:n] == ref_row[:n]
        ref_txt = model.encode_text(ref_ids, normalize=True)
        torch.testing.assert_close(hps.embed_texts(PROMPTS), ref_txt, rtol=0, atol=1e-5)

        # HPSv2 = 100·cos of the two, as HPSv2's own scorer computes it (image_features @ text_features.T).
        ref_score = 100 * (ref_img * ref_txt).sum(-1)
        torch.testing.assert_close(hps(PROMPTS, x), ref_score, rtol=0, atol=1e-4)  # 1e-6 in cosine
    assert not torch.allclose(ref_score[0], ref_score[1])

    # A long prompt is cut to the context length the same way (open_clip ends it with <|endoftext|>).
    long = " ".join(["word"] * 100)
    ours_long = hps.tokenizer([long], truncation=True, max_length=77)["input_ids"][0]
    assert ours_long == open_clip.tokenizer.tokenize([long], context_length=77)[0].tolist()


def _pil_open_clip_transform(image, size, mean, std):
    """open_clip's evaluation transform (Resize(size, BICUBIC), CenterCrop(size), ToTensor, Normalize) on
    a PIL image: torchvision's Resize and CenterCrop on a PIL image are these PIL calls."""
    from PIL import Image

    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    t = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("h,w", [(40, 40), (64, 64), (24, 24), (40, 48), (70, 40)])
def test_image_processor_is_open_clip_transform(open_clip, converted, h, w):
    """Square images (what the generator makes) and non-square ones whose cropped margin is even."""
    from PIL import Image

    _, _, _, out = converted
    hps = build_reward("hpsv2", str(out), CPU, dtype="float32")
    x = to_uint8(random_images(2, h, w, seed=h * w))
    ours = hps.image_processor(images=list(x), return_tensors="pt")["pixel_values"]
    mean, std = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]
    if open_clip.package is not None:  # torchvision is importable: open_clip's own transform
        transform = open_clip.package.image_transform(32, is_train=False, mean=mean, std=std)
        ref = torch.stack([transform(im) for im in pil])
    else:
        ref = torch.stack([_pil_open_clip_transform(im, 32, mean, std) for im in pil])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def run_main(args) -> tuple[int, str]:
    import contextlib
    import io

    from fdfo.rewards.convert_hpsv2 import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def assert_one_line(rc, err, *needles):
    """Status 1 and one error line, the last one (a progress bar of a save may come before it)."""
    assert rc == 1
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("fdfo.rewards.convert_hpsv2: error: "), err
    assert "error" not in "\n".join(lines[:-1]) and "Traceback" not in err, err
    err = lines[-1]
    for needle in needles:
        assert needle in err, (needle, err)


def no_output_left(parent: Path, name: str):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_bad_checkpoints_are_one_line_errors(converted, tmp_path):
    model, ckpt, arch, _ = converted
    state = {k[len("module."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    out = tmp_path / "out"

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])  # truncated download
    assert_one_line(*run_main([corrupt, out, "--arch", arch]), str(corrupt), "not a readable PyTorch checkpoint",
                    "download it again")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert_one_line(*run_main([text, out, "--arch", arch]), str(text), "not a readable PyTorch checkpoint")
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    assert_one_line(*run_main([other, out, "--arch", arch]), str(other), "not a model checkpoint")
    assert_one_line(*run_main([tmp_path / "nowhere.pt", out, "--arch", arch]), "nowhere.pt' does not exist",
                    "HPS_v2_compressed.pt")

    missing = tmp_path / "missing.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k not in ("visual.proj", "ln_final.bias")}},
               missing)
    assert_one_line(*run_main([missing, out, "--arch", arch]), str(missing), "lacks 2 weight(s)",
                    "ln_final.bias, visual.proj", "--arch it was trained with")
    bare = tmp_path / "bare.pt"  # a bare state dict (no "state_dict" key, no module. prefix) is accepted
    torch.save({**state, "visual.transformer.resblocks.2.ln_1.weight": torch.ones(32)}, bare)
    assert_one_line(*run_main([bare, out, "--arch", arch]), "holds 1 weight(s)",
                    "visual.transformer.resblocks.2.ln_1.weight")
    # The real architecture's name against the small checkpoint: shapes (or keys) do not match.
    assert_one_line(*run_main([bare, out]), "ViT-H-14", "--arch it was trained with")
    assert_one_line(*run_main([ckpt, out, "--arch", "ViT-Q-99"]), "unknown --arch 'ViT-Q-99'")
    bad_arch = tmp_path / "resnet.json"
    bad_arch.write_text(json.dumps({**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "layers": [3, 4, 6, 3]}}))
    assert_one_line(*run_main([ckpt, out, "--arch", bad_arch]), "ResNet image tower")
    assert no_output_left(tmp_path, "out")


def test_output_directory_mistakes_are_found_before_loading(converted, tmp_path, monkeypatch):
    import fdfo.rewards.convert_hpsv2 as conv

    _, ckpt, arch, _ = converted
    monkeypatch.setattr(conv, "load_checkpoint", lambda *a: pytest.fail("the checkpoint was read"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert_one_line(*run_main([ckpt, full, "--arch", arch]), str(full), "exists and is not empty")
    assert (full / "keep.txt").read_text() == "x"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line(*run_main([ckpt, a_file, "--arch", arch]), "is an existing file")
    assert_one_line(*run_main([ckpt, a_file / "sub", "--arch", arch]), "cannot be created")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line(*run_main([ckpt, locked / "out", "--arch", arch]), "cannot be written")


def test_empty_output_directory_is_replaced_atomically(open_clip, converted, tmp_path):
    """An existing empty OUT_DIR is filled; a conversion that fails halfway leaves no directory behind."""
    import fdfo.rewards.convert_hpsv2 as conv

    _, ckpt, arch, first = converted
    out = tmp_path / "empty"
    out.mkdir()
    assert run_main([ckpt, out, "--arch", arch, "--dtype", "float16"])[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    assert (out / "model.safetensors").stat().st_size < (first / "model.safetensors").stat().st_size * 0.6

    class DiskFull(OSError):
        pass

    def fail(self, *args, **kwargs):
        raise DiskFull(28, "No space left on device")

    processor_cls = type(conv.clip_image_processor(32))
    try:
        processor_cls.save_pretrained, saved = fail, processor_cls.save_pretrained
        rc, err = run_main([ckpt, tmp_path / "half", "--arch", arch])
    finally:
        processor_cls.save_pretrained = saved
    assert_one_line(rc, err, "could not be written", "No space left on device")
    assert no_output_left(tmp_path, "half")


def test_command_line_entry_point(converted, tmp_path):
    """``python -m fdfo.rewards.convert_hpsv2``: one line and status 1 for a mistake, no traceback."""
    _, _, arch, _ = converted
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    proc = subprocess.run([sys.executable, "-m", "fdfo.rewards.convert_hpsv2", str(bad), str(tmp_path / "o"),
                           "--arch", str(arch)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line(proc.returncode, proc.stderr, str(bad))
    assert proc.stderr.count("\n") == 1


def test_vit_h_14_layout_matches_open_clip_and_transformers(open_clip):
    """HPSv2's architecture, built on the meta device (no memory): every weight open_clip's ViT-H-14 has
    is expected with its shape, and maps onto every weight of the derived transformers CLIPModel."""
    from transformers import CLIPModel

    from fdfo.rewards.convert_hpsv2 import clip_config, key_map, open_clip_config

    name, cfg = open_clip_config("ViT-H-14")
    config = clip_config(name, cfg)
    t, v = config.text_config, config.vision_config
    # The published transformers port of the ViT-H-14 this was fine-tuned from has these numbers.
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size) == (1280, 32, 16, 5120, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
            t.max_position_embeddings, t.vocab_size) == (1024, 24, 16, 4096, 77, 49408)
    assert config.projection_dim == 1024 and t.hidden_act == v.hidden_act == "gelu"
    assert t.layer_norm_eps == v.layer_norm_eps == 1e-5

    with torch.device("meta"):
        oc = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
        hf = CLIPModel(config)
    expected = key_map(config)
    assert {k: tuple(s.shape) for k, s in oc.state_dict().items()} == {k: s for k, (_, s) in expected.items()}
    hf_keys = {hf_key.format(p) if "{}" in hf_key else hf_key for hf_key, _ in expected.values()
               for p in ("q", "k", "v")}
    assert hf_keys == set(hf.state_dict())
