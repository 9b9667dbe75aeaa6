"""`python -m fdfo.evaluate --protocol`: the digits protocol end to end at tiny size (stopped, resumed, images
deleted and cut short, rerun), on two ranks against one process, and the published protocol's table on a
tiny SD3 pipeline with tiny CLIP models (the published weights are never loaded here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.settings import build_config

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ["the digit two, handwritten", "a handwritten seven", "a digit nine written by hand"]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory, digit_reward_dir):
    """A cache root with the built-in digits base (untrained: no minutes of pretraining) and its reward
    models where the task looks for them, a LoRA checkpoint of that base, a tiny CLIP and a prompt file."""
    from fdfo.rewards.tiny import build_tiny_clip
    from tests.conftest import install_untrained_digits

    root = tmp_path_factory.mktemp("digits_root")
    install_untrained_digits(root, digit_reward_dir,
                             root / "runs" / "digits" / "checkpoints" / "epoch_0005" / "adapter")
    build_tiny_clip(root / "clip", seed=0)
    (root / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    return root


def digits_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--protocol", "digits", "--model", "builtin:digits",
            "--adapter", str(root / "runs" / "digits" / "checkpoints" / "epoch_0005"),
            "--prompts-heldout", str(root / "heldout.txt"), "--path", f"clip_diversity={root / 'clip'}",
            "--max-prompts", "3", "--repeats", "2", "--batch-size", "4", "--out", str(out), *extra]


def images(out: Path) -> dict[str, int]:
    """Every image under --out -> its modification time."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))}


def values(out: Path) -> dict:
    """protocol.json without what depends on the run rather than the images (time, ranks)."""
    res = json.loads((out / "protocol.json").read_text())
    return {k: v for k, v in res.items() if k not in ("seconds", "world_size")}


def flat(obj, prefix: str = "") -> dict:
    """A nested JSON value as {"a/b/0/c": leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}/").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flat(value, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj}


@pytest.fixture
def count_sampling(monkeypatch):
    """Counts the images sampled (generate_images' prompts) through fdfo.inference."""
    from fdfo import inference

    made = []
    real = inference.generate_images

    def counting(model, prompts, seeds, **kw):
        made.extend(zip(prompts, seeds))
        return real(model, prompts, seeds, **kw)

    monkeypatch.setattr(inference, "generate_images", counting)
    return made


def test_digits_protocol_resumes_from_the_images_on_disk(digits_root, count_sampling, monkeypatch, tmp_path, capsys):
    from fdfo.evaluate import main

    monkeypatch.setenv("FDFO_CACHE", str(digits_root))
    out = tmp_path / "eval"
    total = 2 * 2 * 3 * 2  # models × sets × prompts × repeats

    # A run stopped after 5 images (as a killed one would be): no table yet, the 5 images whole.
    assert main(digits_args(digits_root, out, "--max-new-images", "5")) == 0
    assert "rerun the same command to continue" in capsys.readouterr().out
    first = images(out)
    assert len(first) == 5 and len(count_sampling) == 5 and not (out / "protocol.md").exists()

    # The same command again: only the other images are made; the first 5 are not touched.
    count_sampling.clear()
    assert main(digits_args(digits_root, out)) == 0
    assert len(count_sampling) == total - 5
    done = images(out)
    assert len(done) == total and all(done[k] == t for k, t in first.items())
    result = values(out)
    table = (out / "protocol.md").read_text()
    assert (out / "grid.png").is_file()

    # The table: a row per model, a column per metric, the values of protocol.json.
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("| model |"))
    assert head == "| model | digit probability | judge accuracy | CLIP diversity (not DreamSim) |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and not line.startswith("| model")}
    assert list(rows) == ["base", "digits-epoch_0005"]  # no published row for the digits protocol
    for name, cells in rows.items():
        for cell, metric in zip(cells, ("digit_probability", "digit_judge_accuracy", "clip_diversity")):
            assert cell == f"{result['metrics'][metric]['values'][name]:.3f}"
    assert result["prompt_sets"]["heldout"]["file"] == str(digits_root / "heldout.txt")
    assert [row["prompt"] for row in result["per_prompt"]["heldout"]] == HELDOUT
    assert result["per_prompt"]["train"][0]["prompt"] == "a handwritten digit zero"
    assert result["steps"] == 10 and result["guidance"] == 1.0  # the digits job's sampler settings
    for metric in ("digit_probability", "digit_judge_accuracy"):
        for name in ("base", "digits-epoch_0005"):
            assert 0 <= result["metrics"][metric]["values"][name] <= 1
    assert result["metrics"]["clip_diversity"]["values"]["base"] > 0

    # Two images deleted, one cut short (a copy that stopped), a killed writer's temporary file left:
    # exactly those three are made again, the untouched sets' scores come from the cache, same results.
    store_dir = out / "images" / "heldout" / "digits-epoch_0005"
    (store_dir / "p00000_r1.png").unlink()
    (store_dir / "p00002_r0.png").unlink()
    cut = out / "images" / "train" / "base" / "p00001_r0.png"
    cut.write_bytes(cut.read_bytes()[:40])
    stale = store_dir / ".p00001_r1.png.x1y2z3.tmp"
    stale.write_bytes(b"\x89PNG\r\n\x1a\n")
    untouched = out / "scores" / "heldout" / "base" / "digit_judge_accuracy.json"
    touched = out / "scores" / "heldout" / "digits-epoch_0005" / "digit_judge_accuracy.json"
    before = {f: f.stat().st_mtime_ns for f in (untouched, touched)}
    count_sampling.clear()
    assert main(digits_args(digits_root, out)) == 0
    assert sorted(count_sampling) == sorted([(HELDOUT[0], 1), (HELDOUT[2], 0), ("a handwritten digit one", 0)])
    assert not stale.exists()
    assert untouched.stat().st_mtime_ns == before[untouched] and touched.stat().st_mtime_ns != before[touched]
    again, before = flat(values(out)), flat(result)
    assert list(again) == list(before)
    assert not {k: (before[k], v) for k, v in again.items() if v != before[k]}, "values that changed (before, now)"
    assert (out / "protocol.md").read_text() == table

    # Nothing left to make or score: no model of any kind is loaded, and the results are the same.
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded although every image and score is on disk")

    monkeypatch.setattr("fdfo.inference.load_flow_model", boom)
    monkeypatch.setattr("fdfo.metrics.build_reward", boom)
    monkeypatch.setattr("fdfo.metrics.build_diversity", boom)
    assert main(digits_args(digits_root, out)) == 0
    assert values(out) == result

    # Other settings into the same --out: refused, one line, before anything loads.
    capsys.readouterr()
    assert main(digits_args(digits_root, out, "--steps", "3")) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fdfo.evaluate: error: --out '{out}' holds images made with other settings (steps 10 there, 3 "
                   f"here); give another --out, or delete '{out}' to start again")
    assert main([*digits_args(digits_root, out)[:-2], "--max-prompts", "2", "--out", str(out)]) == 1
    assert "holds images of other 'train' prompts (3 from 'builtin:digits' there, 2" in capsys.readouterr().err


def test_digits_protocol_killed_and_rerun(digits_root, count_sampling, monkeypatch, tmp_path):
    """A run killed (SIGKILL) while it writes images: the rerun of the same command makes only the others."""
    import signal
    import time

    from fdfo.evaluate import main

    monkeypatch.setenv("FDFO_CACHE", str(digits_root))
    out = tmp_path / "eval"
    argv = [*digits_args(digits_root, out, "--batch-size", "2")]
    argv[argv.index("--repeats") + 1] = "4"
    total = 2 * (3 + 3) * 4  # models × (train + heldout prompts) × repeats
    proc = subprocess.Popen([sys.executable, "-m", "fdfo.evaluate", *argv], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(list(out.glob("images/*/*/*.png"))) < 6 and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "protocol.md").exists()
    before = images(out)
    assert 6 <= len(before) < total
    assert main(argv) == 0
    assert len(count_sampling) == total - len(before)
    after = images(out)
    assert len(after) == total and all(after[k] == t for k, t in before.items())
    assert not list(out.rglob("*.tmp"))


def test_digits_protocol_on_two_ranks_matches_one_process(digits_root, monkeypatch, tmp_path):
    from fdfo.evaluate import main
    from fdfo.image_store import ImageStore

    monkeypatch.setenv("FDFO_CACHE", str(digits_root))
    one = tmp_path / "one"
    assert main(digits_args(digits_root, one)) == 0
    two = tmp_path / "two"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-m", "fdfo.evaluate", *digits_args(digits_root, two)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert json.loads((two / "protocol.json").read_text())["world_size"] == 2
    # The same images, to the bit; the same values: exactly for the float64 digit models, to float32 rounding
    # for CLIP (its float32 batches hold other images on two ranks); the same table.
    one_res, two_res = flat(values(one)), flat(values(two))
    assert list(one_res) == list(two_res)
    for key, value in one_res.items():
        if "clip_diversity" in key and isinstance(value, float):
            assert two_res[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert two_res[key] == value, key
    assert (two / "protocol.md").read_text() == (one / "protocol.md").read_text()
    a, b = ImageStore(one / "images"), ImageStore(two / "images")
    assert list(images(one)) == list(images(two))
    for name in images(one):
        set_name, model, file = Path(name).parts[1:]
        i, r = int(file[1:6]), int(file[8:-4])
        assert torch.equal(a.read(set_name, model, i, r), b.read(set_name, model, i, r)), name


@pytest.fixture(scope="module")
def sd3_runs(tmp_path_factory, tiny_pipeline_dir):
    """Two runs (a, b) with a LoRA checkpoint each of the tiny SD3 pipeline (other weights), whose run
    config sets 2 steps and 16 pixels."""
    from fdfo.models import SD3FlowModel

    root = tmp_path_factory.mktemp("sd3_runs")
    for seed, name in ((2, "a"), (3, "b")):
        model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32,
                             max_sequence_length=16)
        model.add_lora(LoraConfig(rank=4, alpha=8.0))
        with torch.no_grad():
            for pname, p in model.transformer.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
        ckpt = root / name / "checkpoints" / "epoch_0100"
        model.save_lora(ckpt / "adapter")
        cfg = build_config({"model": {"path": str(tiny_pipeline_dir), "resolution": 16, "max_sequence_length": 16},
                            "sampling": {"steps": 2}})
        (ckpt / "trainer.json").write_text(json.dumps({"epoch": 100, "config": cfg.to_dict()}))
        (root / name / "checkpoints" / "latest").write_text("epoch_0100")
    return root / "a", root / "b"


def test_published_protocol_table_at_tiny_size(sd3_runs, tiny_pipeline_dir, tmp_path):
    """The published protocol's table: its columns, the published row to beat, n/a with a footnote for the
    metrics without weights (HPSv2, DreamSim), the CLIP diversity marked as not DreamSim."""
    from fdfo.evaluate import main
    from fdfo.rewards.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    (tmp_path / "train.txt").write_text("a red fox in snow\na bowl of ramen\na lighthouse at dusk\n")
    (tmp_path / "hpd.txt").write_text("a castle on a hill, concept art\nan anime girl with a sword\n")
    out = tmp_path / "eval"
    argv = ["--protocol", "published", "--adapter", str(sd3_runs[0]), "--adapter",
            str(sd3_runs[1] / "checkpoints" / "epoch_0100"), "--prompts-train", str(tmp_path / "train.txt"),
            "--prompts-hpd", str(tmp_path / "hpd.txt"), "--metrics", "pickscore", "hpsv2", "clip_score_h14",
            "clip_score", "dreamsim_diversity", "clip_diversity",
            "--path", *(f"{m}={clip}" for m in ("pickscore", "clip_score_h14", "clip_score", "clip_diversity")),
            "--max-prompts", "2", "--repeats", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    res = json.loads((out / "protocol.json").read_text())
    assert res["steps"] == 2 and res["guidance"] == 1.0 and res["model"] == str(tiny_pipeline_dir)  # the run's
    assert res["prompt_sets"]["train"] == {
        "title": "PickScore training prompts (Pick-a-Pic v1 captions)", "file": str(tmp_path / "train.txt"),
        "prompts": 2, "in_file": 3, "protocol_size": 4096, "metrics": ["pickscore"]}
    assert res["metrics"]["hpsv2"]["values"] == {} and res["metrics"]["hpsv2"]["note"].startswith("not available")
    table = (out / "protocol.md").read_text()
    lines = table.splitlines()
    assert ("| model | PickScore | HPSv2 | CLIP-H/14 | CLIP-L/14 | DreamSim diversity | "
            "CLIP diversity (not DreamSim) |") in lines
    assert ("| **published FDFO, epoch 100 (combined reward, no CFG)** (to beat) | 22.47 | 28.29 | 35.77 | 28.19 | "
            "0.455 | - |") in lines
    base = next(line for line in lines if line.startswith("| base |")).split("|")[2:-1]
    assert base[1].strip() == "n/a [1]" and base[4].strip() == "n/a [2]"
    assert base[0].strip() == f"{res['metrics']['pickscore']['values']['base']:.2f}"
    assert any(line.startswith("- [1] HPSv2: not available") for line in lines)
    assert any(line.startswith("- [2] DreamSim diversity: not available") for line in lines)
    assert "- `-` in the published row: no published value (CLIP diversity (not DreamSim))." in lines
    assert (f"- PickScore on PickScore training prompts (Pick-a-Pic v1 captions): the first 2 of the 3 prompts in "
            f"`{tmp_path / 'train.txt'}` (the protocol's size: 4,096), × 2 images.") in lines
    assert [m["name"] for m in res["models"]] == ["base", "a-epoch_0100", "b-epoch_0100"]
    assert any(line.startswith("| a-epoch_0100 | ") for line in lines)  # a row per checkpoint
    for metric in ("pickscore", "clip_diversity"):  # (the tiny CLIP's scores are all max(cos, 0) = 0)
        values_ = res["metrics"][metric]["values"]
        assert len({values_["base"], values_["a-epoch_0100"], values_["b-epoch_0100"]}) == 3, metric

    # The second checkpoint is sampled by a freshly loaded base, not on top of the first: the same images
    # and values as when it is evaluated alone.
    alone = tmp_path / "alone"
    argv = [a for a in argv if a != str(sd3_runs[0])]
    argv.remove("--adapter")
    assert main([*argv, "--out", str(alone)]) == 0
    res_alone = json.loads((alone / "protocol.json").read_text())
    for metric, entry in res["metrics"].items():
        assert res_alone["metrics"][metric]["values"] == {k: v for k, v in entry["values"].items()
                                                          if k != "a-epoch_0100"}, metric
    assert list(images(alone)) == [k for k in images(out) if "/a-epoch_0100/" not in k]


def test_hub_adapters_are_named_by_repository_and_subfolder_and_default_options_match_unset_ones():
    from fdfo.inference import sampling_defaults
    from fdfo.protocol_run import slug

    assert slug("nvidia/finite-difference-flow-optimization/pickscore_nocfg") == \
        "finite-difference-flow-optimization-pickscore_nocfg"
    assert slug(Path("runs/x/checkpoints/epoch_0100/adapter")) == "x-epoch_0100"
    run = {"model": {"path": "m", "max_sequence_length": 16, "resolution": 32}, "flux": {"guidance": 3.5},
           "sampling": {"steps": 4, "guidance_scale": 1.0}}
    assert sampling_defaults(None, run)["model_options"] == {}  # FLUX's default: the same as a bare adapter's
    run["flux"]["guidance"] = 2.0
    assert sampling_defaults(None, run)["model_options"] == {"flux": {"guidance": 2.0}}
    # A run saved by an earlier version (model.flux_guidance, null = the default) reads the same way.
    old = {"model": {"path": "m", "max_sequence_length": 16, "resolution": 32, "flux_guidance": None},
           "sampling": {"steps": 4, "guidance_scale": 1.0}}
    assert sampling_defaults(None, old)["model_options"] == {}
    old["model"]["flux_guidance"] = 2.0
    assert sampling_defaults(None, old)["model_options"] == {"flux": {"guidance": 2.0}}
