"""User mistakes on the generate and evaluate command lines: each is one line on stderr and a non-zero exit,
found before any model is loaded where that is possible (else before any sampling), never a traceback.

The model loader and the sampler are replaced by functions that fail the test if called, so each test
also shows where the mistake is caught."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdfo.config import LoraConfig
from fdfo.settings import build_config

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["generate", "evaluate"]


def tool_main(tool: str):
    from fdfo import evaluate, generate

    return {"generate": generate.main, "evaluate": evaluate.main}[tool]


def base_args(tool: str, out: Path) -> list[str]:
    """Arguments that make either tool cheap: few prompts, steps and (for evaluate) one metric."""
    extra = ["--seeds", "0"] if tool == "generate" else ["--repeats", "1", "--metrics", "digit_probability"]
    return [*extra, "--out", str(out)]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model or sampling fails the test: the mistake must be found before."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded although the command line holds a mistake")

    monkeypatch.setattr("fdfo.inference.load_flow_model", boom)
    monkeypatch.setattr("fdfo.inference.generate_images", boom)


@pytest.fixture
def no_sampling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("sampling started although the command line holds a mistake")

    monkeypatch.setattr("fdfo.inference.generate_images", boom)


def one_line_error(capsys, tool: str, *, loaded: bool = False) -> str:
    """The single stderr line of a failed command (a traceback or several lines fail the test). Once a
    model was loaded (``loaded``), the loader's progress bars may come before it."""
    err = capsys.readouterr().err.strip()
    if loaded:
        assert "Traceback" not in err, err
        err = err.splitlines()[-1]
    assert err.startswith(f"fdfo.{tool}: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- a checkpoint and other bases


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_pipeline_dir):
    """runs/<name>/checkpoints/epoch_0001/{adapter/, trainer.json}: a LoRA of the tiny base whose run
    config names that base."""
    from fdfo.models import SD3FlowModel

    model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=16)
    model.add_lora(LoraConfig(rank=4, alpha=8.0))
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / "epoch_0001"
    model.save_lora(ckpt / "adapter")
    cfg = build_config({"model": {"path": str(tiny_pipeline_dir), "resolution": 16, "max_sequence_length": 16},
                        "sampling": {"steps": 2}, "reward": {"weights": {"digit_probability": 1.0}}})
    (ckpt / "trainer.json").write_text(json.dumps({"epoch": 1, "global_step": 1, "config": cfg.to_dict()}))
    (run / "checkpoints" / "latest").write_text("epoch_0001")
    return run


OTHER_BASES = {"wider": dict(attention_head_dim=32), "shallower": dict(num_layers=1), "deeper": dict(num_layers=3)}


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory, tiny_pipeline_dir):
    """The tiny pipeline with its transformer swapped for one of another width or depth: a loadable base
    model that the adapter of ``adapter_run`` was not trained on."""
    from diffusers import SD3Transformer2DModel

    config = dict(SD3Transformer2DModel.load_config(str(tiny_pipeline_dir / "transformer")))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    out = {}
    for name, change in OTHER_BASES.items():
        base = tmp_path_factory.mktemp(f"base_{name}")
        shutil.copytree(tiny_pipeline_dir, base, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"))
        cfg = {**config, **change}
        cfg["caption_projection_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        torch.manual_seed(0)
        SD3Transformer2DModel(**cfg).save_pretrained(base / "transformer")
        out[name] = base
    return out


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("other", list(OTHER_BASES))
def test_adapter_of_another_base_model_is_found_before_loading(tool, other, adapter_run, other_bases,
                                                                tiny_pipeline_dir, no_model_loading, tmp_path,
                                                                capsys):
    base = other_bases[other]
    argv = ["--model", str(base), "--adapter", str(adapter_run), "--prompt", "a digit",
            *base_args(tool, tmp_path / "o")]
    assert tool_main(tool)(argv) == 1
    err = one_line_error(capsys, tool)
    adapter = adapter_run / "checkpoints" / "epoch_0001" / "adapter"
    assert f"checkpoint '{adapter}'" in err and f"base model '{base}'" in err
    assert f"--model {tiny_pipeline_dir}" in err  # the fix: the base its run config names


@pytest.mark.parametrize("tool", TOOLS)
def test_adapter_of_another_base_model_is_found_after_loading_before_sampling(tool, adapter_run, other_bases,
                                                                              tiny_pipeline_dir, monkeypatch,
                                                                              no_sampling, tmp_path, capsys):
    """A base whose config is not at hand before loading (a hub model not yet cached, a built-in one not yet
    built) is checked once loaded: evaluate must not sample the base model first."""
    monkeypatch.setattr("fdfo.inference._meta_transformer", lambda *a: None)
    argv = ["--model", str(other_bases["wider"]), "--adapter", str(adapter_run), "--prompt", "a digit",
            *base_args(tool, tmp_path / "o")]
    assert tool_main(tool)(argv) == 1
    err = one_line_error(capsys, tool, loaded=True)
    assert "does not fit base model" in err and "inputs in the adapter" in err
    assert f"--model {tiny_pipeline_dir}" in err


def test_apply_checkpoint_turns_a_load_error_into_one_message(adapter_run, other_bases):
    """Whatever the header checks miss, the loader's size-mismatch error becomes the same one-line message."""
    from fdfo.trained_checkpoint import CheckpointMismatch, apply_checkpoint, resolve_checkpoint
    from fdfo.models import SD3FlowModel

    base = other_bases["wider"]
    model = SD3FlowModel(str(base), device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=16)
    with pytest.raises(CheckpointMismatch) as info:
        apply_checkpoint(model, resolve_checkpoint(adapter_run))
    message = str(info.value)
    assert "\n" not in message and "loading failed" in message and f"base model '{base}'" in message


@pytest.mark.parametrize("tool", TOOLS)
def test_full_checkpoint_of_another_base_model_is_found_before_loading(tool, other_bases, tiny_pipeline_dir,
                                                                       no_model_loading, tmp_path, capsys):
    ckpt = tmp_path / "epoch_0001"
    shutil.copytree(other_bases["wider"] / "transformer", ckpt / "transformer")
    argv = ["--model", str(tiny_pipeline_dir), "--adapter", str(ckpt), "--prompt", "a digit",
            *base_args(tool, tmp_path / "o")]
    assert tool_main(tool)(argv) == 1
    err = one_line_error(capsys, tool)
    assert f"checkpoint '{ckpt / 'transformer'}'" in err and "in the checkpoint and" in err
    assert "--model" in err


def test_checkpoints_of_the_right_base_model_pass_the_checks(adapter_run, tiny_pipeline_dir, tmp_path):
    """No false alarm: the LoRA (rank 4, not the default 32) and a full checkpoint of the tiny base load and
    sample, both found fitting before loading (meta transformer) and after."""
    from fdfo.generate import main
    from fdfo.trained_checkpoint import check_checkpoint, resolve_checkpoint
    from fdfo.models import SD3FlowModel

    full = tmp_path / "epoch_0001"
    shutil.copytree(tiny_pipeline_dir / "transformer", full / "transformer")
    model = SD3FlowModel(str(tiny_pipeline_dir), device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=16)
    for ckpt in (adapter_run, full):
        check_checkpoint(model.transformer, resolve_checkpoint(ckpt), str(tiny_pipeline_dir))
        assert main(["--model", str(tiny_pipeline_dir), "--adapter", str(ckpt), "--prompt", "x", "--steps", "1",
                     "--resolution", "16", "--max-sequence-length", "16", "--out", str(tmp_path / "o")]) == 0


def test_corrupt_adapter_file_is_one_line(adapter_run, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    data = (adapter_run / "checkpoints" / "epoch_0001" / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 3])  # a cut-off copy
    argv = ["--model", str(tiny_pipeline_dir), "--adapter", str(adapter), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert tool_main("generate")(argv) == 1
    assert "is not a readable safetensors file" in one_line_error(capsys, "generate")


# --------------------------------------------------------------------------- --out


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", ["existing_file", "below_a_file"])
def test_unusable_out_is_found_before_loading(tool, case, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = blocker if case == "existing_file" else blocker / "sub"
    argv = ["--model", str(tiny_pipeline_dir), "--prompt", "a digit", *base_args(tool, out)]
    assert tool_main(tool)(argv) == 1
    err = one_line_error(capsys, tool)
    assert f"--out '{out}'" in err and "give a directory that can be created and written to" in err
    assert blocker.read_text() == "not a directory"


@pytest.fixture
def read_only_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
        writable = True
    except PermissionError:
        writable = False
    if writable:
        locked.chmod(0o755)
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): file modes do not stop it writing, so no "
                    "directory is read-only for it")
    yield locked
    locked.chmod(0o755)  # so that pytest can remove it


@pytest.mark.parametrize("tool", TOOLS)
def test_out_in_a_read_only_directory_is_found_before_loading(tool, tiny_pipeline_dir, read_only_dir,
                                                              no_model_loading, capsys):
    for out in (read_only_dir / "out", read_only_dir):
        assert tool_main(tool)(["--model", str(tiny_pipeline_dir), "--prompt", "x", *base_args(tool, out)]) == 1
        err = one_line_error(capsys, tool)
        assert f"--out '{out}' cannot be written (Permission denied)" in err


def test_out_that_exists_and_is_writable_is_left_as_it_was(tiny_pipeline_dir, tmp_path):
    from fdfo.outputs import check_out_dir

    out = tmp_path / "a" / "b"
    assert check_out_dir(out, "--out", create=True) == out and out.is_dir() and list(out.iterdir()) == []  # no probe
    (out / "keep.txt").write_text("x")
    check_out_dir(out, "--out", create=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_evaluate_on_two_ranks_with_an_unusable_out_stops_every_rank(tiny_pipeline_dir, tmp_path):
    """Only rank 0 writes --out and so only it checks it; every rank must stop with its message, none may wait."""
    out = tmp_path / "taken"
    out.write_text("a file")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fdfo.evaluate", "--model", str(tiny_pipeline_dir), "--prompt", "x",
             *base_args("evaluate", out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 1, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("fdfo.evaluate")]
        assert lines == [f"fdfo.evaluate: error: --out '{out}' is an existing file, not a directory; give a "
                         "directory that can be created and written to"], err[-2000:]
        assert "Traceback" not in err


# --------------------------------------------------------------------------- prompt files


PROMPT_FILES = {"empty": b"", "comments_only": b"# nothing here\n\n   # nor here\n", "not_utf8": b"a digit\n\xff\xfe\n"}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_bad_prompt_file_is_found_before_loading(tool, case, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    prompts = tmp_path / f"{case}.txt"
    prompts.write_bytes(PROMPT_FILES[case])
    out = tmp_path / "o"
    argv = ["--model", str(tiny_pipeline_dir), "--prompts", str(prompts), *base_args(tool, out)]
    assert tool_main(tool)(argv) == 1
    err = one_line_error(capsys, tool)
    assert f"prompt file '{prompts}'" in err
    assert ("not UTF-8" in err) if case == "not_utf8" else ("holds no prompts" in err)
    assert not out.exists()  # nothing was created either


@pytest.mark.parametrize("tool", TOOLS)
def test_missing_or_unreadable_prompt_file_is_one_line(tool, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    argv = ["--model", str(tiny_pipeline_dir), "--prompts", str(tmp_path / "nope.txt"), *base_args(tool, tmp_path)]
    assert tool_main(tool)(argv) == 1
    assert f"prompt file '{tmp_path / 'nope.txt'}' does not exist" in one_line_error(capsys, tool)


@pytest.mark.parametrize("tool", TOOLS)
def test_prompt_path_that_is_a_directory_is_one_line(tool, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    argv = ["--model", str(tiny_pipeline_dir), "--prompts", str(tmp_path), *base_args(tool, tmp_path / "o")]
    assert tool_main(tool)(argv) == 1
    assert f"prompt file '{tmp_path}' is a directory" in one_line_error(capsys, tool)


@pytest.mark.parametrize("tool", TOOLS)
def test_unreadable_prompt_file_is_one_line(tool, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    prompts = tmp_path / "secret.txt"
    prompts.write_text("a digit\n")
    prompts.chmod(0o000)
    try:
        prompts.read_bytes()
    except PermissionError:
        pass
    else:
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): file modes do not stop it reading")
    argv = ["--model", str(tiny_pipeline_dir), "--prompts", str(prompts), *base_args(tool, tmp_path / "o")]
    assert tool_main(tool)(argv) == 1
    assert f"prompt file '{prompts}' cannot be read (Permission denied)" in one_line_error(capsys, tool)


# --------------------------------------------------------------------------- other arguments


GENERATE_MISTAKES = {
    "steps_zero": (["--steps", "0"], "--steps must be at least 1"),
    "batch_size_zero": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "resolution_negative": (["--resolution", "-16"], "--resolution must be at least 1"),
    "text_length_zero": (["--max-sequence-length", "0"], "--max-sequence-length must be at least 1"),
    "seed_twice": (["--seeds", "1", "2", "1"], "--seeds lists 1 more than once"),
    "device_unknown": (["--device", "gpu"], "--device 'gpu' is not a device"),
    "device_absent": (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device"),
    "adapter_missing": (["--adapter", "{tmp}/no-such-run"], "checkpoint '{tmp}/no-such-run' does not exist"),
    "adapter_empty_dir": (["--adapter", "{tmp}"], "'{tmp}' holds no checkpoint"),
    "model_missing": (["--model", "{tmp}/no-such-model"], "model.path '{tmp}/no-such-model' does not exist"),
    "builtin_unknown": (["--model", "builtin:nope"], "unknown built-in 'builtin:nope'"),
}


@pytest.mark.parametrize("case", list(GENERATE_MISTAKES))
def test_generate_argument_mistakes_are_found_before_loading(case, tiny_pipeline_dir, no_model_loading, tmp_path,
                                                             capsys):
    extra, expected = GENERATE_MISTAKES[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["--model", str(tiny_pipeline_dir), "--prompt", "a digit", "--seeds", "0", *extra,
            "--out", str(tmp_path / "o")]
    assert tool_main("generate")(argv) == 1
    assert expected.replace("{tmp}", str(tmp_path)) in one_line_error(capsys, "generate")


EVALUATE_MISTAKES = {
    "repeats_zero": (["--repeats", "0"], "--repeats must be >= 1"),
    "diversity_one_repeat": (["--repeats", "1", "--metrics", "clip_diversity"], "give --repeats 2 or more"),
    "report_negative": (["--report-repeats", "-1"], "--report-repeats must be 0 or more"),
    "reward_batch_zero": (["--reward-batch-size", "0"], "--reward-batch-size must be at least 1"),
    "metric_unknown": (["--metrics", "pickscor"], "unknown metric 'pickscor'; available metrics: "),
    "path_malformed": (["--path", "clip_score"], "--path 'clip_score' must look like NAME=DIR"),
    "path_other_metric": (["--path", "clipscore=/w"], "names metric 'clipscore', which is not evaluated here"),
    "no_base_alone": (["--no-base"], "--no-base leaves nothing to evaluate without --adapter"),
    "reward_device_unknown": (["--reward-device", "gpu:1"], "--reward-device 'gpu:1' is not a device"),
    "adapter_missing": (["--adapter", "{tmp}/no-such-run"], "checkpoint '{tmp}/no-such-run' does not exist"),
}


@pytest.mark.parametrize("case", list(EVALUATE_MISTAKES))
def test_evaluate_argument_mistakes_are_found_before_loading(case, tiny_pipeline_dir, no_model_loading, tmp_path,
                                                             capsys):
    extra, expected = EVALUATE_MISTAKES[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["--model", str(tiny_pipeline_dir), "--prompt", "a digit", "--repeats", "2", "--metrics",
            "digit_probability", *extra, "--out", str(tmp_path / "o")]
    assert tool_main("evaluate")(argv) == 1
    assert expected.replace("{tmp}", str(tmp_path)) in one_line_error(capsys, "evaluate")


@pytest.mark.parametrize("tool", TOOLS)
def test_resolution_the_model_cannot_take_is_found_before_sampling(tool, tiny_pipeline_dir, no_sampling, tmp_path,
                                                                   capsys):
    """The tiny model's images are 16 pixels a side at most, in steps of 4 (VAE factor 2 × patch 2)."""
    for resolution in ("18", "20"):
        argv = ["--model", str(tiny_pipeline_dir), "--prompt", "x", "--resolution", resolution, "--steps", "1",
                "--max-sequence-length", "16", *base_args(tool, tmp_path / "o")]
        assert tool_main(tool)(argv) == 1
        err = one_line_error(capsys, tool, loaded=True)
        assert f"resolution {resolution} does not suit base model" in err and "multiple of 4 up to 16" in err


def test_corrupt_run_config_names_its_file(adapter_run, tiny_pipeline_dir, no_model_loading, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    trainer = run / "checkpoints" / "epoch_0001" / "trainer.json"
    trainer.write_text('{"epoch": 1, "config": {')  # cut off mid-write
    assert tool_main("generate")(["--adapter", str(run), "--prompt", "x", "--out", str(tmp_path / "o")]) == 1
    assert f"'{trainer}' is not valid JSON" in one_line_error(capsys, "generate")


def test_evaluate_report_without_images(tmp_path):
    """--report-prompts 0 or --report-repeats 0: results and an HTML page, no grid picture."""
    from fdfo.evaluation import write_report

    for shown_p, shown_r in ((0, 2), (2, 0)):
        out = tmp_path / f"r{shown_p}{shown_r}"
        out.mkdir()
        variant = {"scorers": ["s"], "report_images": torch.zeros(shown_p, shown_r, 1, 4, 4, dtype=torch.uint8),
                   "report_scores": torch.zeros(shown_p, shown_r, 1)}
        results = {"model": "m", "checkpoint": None, "prompts": 2, "repeats": 2, "steps": 1, "guidance": 1.0,
                   "world_size": 1, "seconds": 0.0, "metrics": {"s": {"base": 0.5}}, "notes": {}}
        write_report(out, ["a", "b"], [0, 1], {"base": variant}, results)
        assert (out / "report.html").is_file() and not (out / "report.png").exists()


# --------------------------------------------------------------------------- evaluate --protocol


def protocol_args(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    """The published protocol at its smallest on the tiny base: a prompt per set, one CLIP metric."""
    for name in ("train", "hpd"):
        (tmp_path / f"{name}.txt").write_text("a digit\n")
    return ["--protocol", "published", "--model", str(model), "--prompts-train", str(tmp_path / "train.txt"),
            "--prompts-hpd", str(tmp_path / "hpd.txt"), "--metrics", "clip_score", "--repeats", "2", "--steps", "1",
            *extra, "--out", str(tmp_path / "o")]


PROTOCOL_MISTAKES = {
    "protocol_unknown": (["--protocol", "publshed"], "unknown protocol 'publshed'; available protocols: published, "
                                                     "digits"),
    "prompt_file_missing": (["--prompts-hpd", "{tmp}/nope.txt"],
                            "prompt file '{tmp}/nope.txt' (HPDv2 benchmark prompts (anime, concept-art, paintings, "
                            "photo)) does not exist; write the 3,200 HPDv2 benchmark prompts into it"),
    "metric_unknown": (["--metrics", "pickscor"], "unknown metric 'pickscor'; available metrics: "),
    "metric_of_another_protocol": (["--metrics", "digit_probability"],
                                   "metric 'digit_probability' is not part of protocol 'published'"),
    "diversity_one_repeat": (["--metrics", "clip_diversity", "--repeats", "1"], "give --repeats 2 or more"),
    "path_other_metric": (["--path", "pickscore=/w"], "names metric 'pickscore', which is not evaluated here"),
    "path_missing": (["--path", "clip_score={tmp}/no-clip"], "'{tmp}/no-clip' does not exist"),
    "max_prompts_zero": (["--max-prompts", "0"], "--max-prompts must be at least 1 (got 0)"),
    "steps_zero": (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    "adapter_missing": (["--adapter", "{tmp}/no-such-run"], "checkpoint '{tmp}/no-such-run' does not exist"),
}


@pytest.mark.parametrize("case", list(PROTOCOL_MISTAKES))
def test_evaluate_protocol_mistakes_are_found_before_loading(case, tiny_pipeline_dir, no_model_loading, tmp_path,
                                                             capsys):
    extra, expected = PROTOCOL_MISTAKES[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = protocol_args(tmp_path, tiny_pipeline_dir, *extra)
    if case == "protocol_unknown":
        argv = argv[2:] + extra
    assert tool_main("evaluate")(argv) == 1
    assert expected.replace("{tmp}", str(tmp_path)) in one_line_error(capsys, "evaluate")


def test_evaluate_protocol_default_prompt_file_missing_says_how_to_make_it(tiny_pipeline_dir, no_model_loading,
                                                                           tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # (prompts/pickscore_train.txt, the default, is not there)
    argv = ["--protocol", "published", "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "o")]
    assert tool_main("evaluate")(argv) == 1
    err = one_line_error(capsys, "evaluate")
    assert "prompt file 'prompts/pickscore_train.txt' (PickScore training prompts" in err
    assert "Pick-a-Pic v1 training captions" in err and err.endswith("or give --prompts-train FILE")


@pytest.mark.parametrize("other", ["wider", "deeper"])
def test_evaluate_protocol_adapter_of_another_base_is_found_before_loading(other, adapter_run, other_bases,
                                                                           tiny_pipeline_dir, no_model_loading,
                                                                           tmp_path, capsys):
    argv = protocol_args(tmp_path, other_bases[other], "--adapter", str(adapter_run))
    assert tool_main("evaluate")(argv) == 1
    err = one_line_error(capsys, "evaluate")
    assert "does not fit base model" in err and f"--model {tiny_pipeline_dir}" in err
    # the second of two checkpoints too, against the base the first one names
    copy = tmp_path / "other_run"
    shutil.copytree(adapter_run, copy)
    wider = tmp_path / "wider_ckpt" / "transformer"
    shutil.copytree(other_bases[other] / "transformer", wider)
    argv = protocol_args(tmp_path, tiny_pipeline_dir, "--adapter", str(copy), "--adapter", str(wider.parent))
    assert tool_main("evaluate")(argv) == 1
    assert f"checkpoint '{wider}' does not fit base model '{tiny_pipeline_dir}'" in one_line_error(capsys, "evaluate")


def test_evaluate_protocol_adapter_of_another_base_is_found_after_loading_before_sampling(
        adapter_run, other_bases, tiny_pipeline_dir, monkeypatch, no_sampling, tmp_path, capsys):
    monkeypatch.setattr("fdfo.inference._meta_transformer", lambda *a: None)
    argv = protocol_args(tmp_path, other_bases["wider"], "--adapter", str(adapter_run))
    assert tool_main("evaluate")(argv) == 1
    err = one_line_error(capsys, "evaluate", loaded=True)
    assert "does not fit base model" in err and "inputs in the adapter" in err


def test_evaluate_protocol_checkpoints_that_sample_differently_are_refused(adapter_run, tiny_pipeline_dir,
                                                                          no_model_loading, tmp_path, capsys):
    """Two checkpoints whose run configs sample with other steps: one base column cannot serve both."""
    other = tmp_path / "other_run"
    shutil.copytree(adapter_run, other)
    trainer = other / "checkpoints" / "epoch_0001" / "trainer.json"
    state = json.loads(trainer.read_text())
    state["config"]["sampling"]["steps"] = 7
    trainer.write_text(json.dumps(state))
    argv = protocol_args(tmp_path, tiny_pipeline_dir, "--adapter", str(adapter_run), "--adapter", str(other))
    argv.remove("--steps")
    argv.remove("1")
    assert tool_main("evaluate")(argv) == 1
    err = one_line_error(capsys, "evaluate")
    assert "sample with different steps (2 and 7); give --steps to sample all with one value" in err
    with pytest.raises(AssertionError, match="a model was loaded"):  # --steps: one value for both, no mistake left
        tool_main("evaluate")([*argv, "--steps", "2"])

    # Without --model, checkpoints whose run configs name different base models have no common base column.
    state["config"]["sampling"]["steps"] = 2
    state["config"]["model"]["path"] = str(tmp_path / "another-base")
    trainer.write_text(json.dumps(state))
    argv = [a for a in argv if a not in ("--model", str(tiny_pipeline_dir))]
    assert tool_main("evaluate")(argv) == 1
    err = one_line_error(capsys, "evaluate")
    assert "were trained on different base models" in err and "give --model to evaluate both against one" in err
