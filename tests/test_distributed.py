"""Two ranks under ZeRO-3 through the real `deepspeed` launcher on CPU (DS_ACCELERATOR=cpu).

The epoch's samples are seeded by global micro-batch, so a 2-rank run and a 1-rank run
on the same global batch must take the same optimizer step; a 2-rank checkpoint must
resume on 2 ranks exactly, and a checkpoint resumed on another number of ranks (through
DeepSpeed's universal format) must continue like the run that wrote it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fdfo.settings import with_overrides
from tests.conftest import free_port
from tests.test_train import tiny_run

ROOT = Path(__file__).resolve().parents[1]


# The trainer with the elements' rows all-gathered (every rank holds the epoch), instead of exchanged:
# the reference the exchange must equal bit for bit.
GATHERING_TRAINER = ("import sys; from fdfo import distributed as d; "
                     "d.fetch_rows = lambda x, rows, **where: d.gather_rows(x)[rows.to(x.device)]; "
                     "from fdfo.train import main; sys.exit(main())")


def launch(ranks: int, cfg, tmp_path: Path, *extra: str, gather: bool = False,
           extra_env: dict | None = None) -> str:
    """``fdfo/train.py`` on ``ranks`` local ranks, started the way DeepSpeed's launcher starts them (the
    same environment, LOCAL_SIZE included, so DeepSpeed takes its shared-memory path) but without the
    launcher process itself; tests/test_train.py runs the real launcher. ``gather``: the reference
    trainer that all-gathers the epoch's rows."""
    path = tmp_path / f"{Path(cfg.log.out_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.read_dict()))
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **(extra_env or {}))
        entry = ["-c", GATHERING_TRAINER] if gather else ["fdfo/train.py"]
        procs.append(subprocess.Popen([sys.executable, "-u", *entry, "--config", str(path), *extra],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return wait_all(procs)


def wait_all(procs: list) -> str:
    """Wait for every process (killing the rest if one wait fails); each must exit 0. Their joined output."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=900)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-6000:]
    return "".join(outputs)


def adapter(run: Path, epoch: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"epoch_{epoch:04d}" / "adapter" / "pytorch_lora_weights.safetensors"))


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def odd_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "three.txt"
    path.write_text("a handwritten digit one\na handwritten digit seven\na handwritten digit three\n")
    return path


def _cfg(out, tiny_pipeline_dir, digit_reward_dir, prompts, epochs):
    return tiny_run(out, tiny_pipeline_dir, digit_reward_dir,
                    train={"epochs": epochs, "micro_batch_rows": 4}, fdfo={"optimizer_steps_per_epoch": 1},
                    data={"prompts": str(prompts)}, deepspeed={"config": str(ROOT / "configs/ds/zero3.json")},
                    eval={"every": 0, "metrics": []}, log={"plot_every": 0, "progress": False})


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_pipeline_dir, digit_reward_dir, odd_prompts):
    """The reference: one epoch of ZeRO-3 on 1 rank (every multi-rank run below must take its step)."""
    tmp = tmp_path_factory.mktemp("one_rank")
    one = tmp / "one"
    launch(1, _cfg(one, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=1), tmp)
    return one


def test_zero3_two_ranks_equal_one_rank_and_resume_exactly(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                           odd_prompts, one_rank):
    two = tmp_path / "two"
    launch(2, _cfg(two, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=2), tmp_path)
    one = one_rank

    # Same global batch, same shuffle: the same loss and the same updated LoRA weights.
    step_two, step_one = records(two, "step")[0], records(one, "step")[0]
    for key in ("loss", "policy_loss", "clipfrac", "ratio"):
        assert step_two[key] == pytest.approx(step_one[key], rel=1e-5, abs=1e-7), key
    assert records(two, "epoch")[0]["reward_mean"] == pytest.approx(records(one, "epoch")[0]["reward_mean"], rel=1e-6)
    w2, w1 = adapter(two, 1), adapter(one, 1)
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)

    # Resume the 2-rank run from epoch 1 on 2 ranks: epoch 2 repeats exactly.
    resumed = tmp_path / "resumed"
    launch(2, _cfg(resumed, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=2), tmp_path,
           "--resume", str(two / "checkpoints" / "epoch_0001"))
    wa, wb = adapter(two, 2), adapter(resumed, 2)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)
    assert records(resumed, "epoch")[-1]["reward_mean"] == records(two, "epoch")[-1]["reward_mean"]

    # Another number of ranks: the sharded state is converted to DeepSpeed's universal format and the
    # next epoch equals the 2-rank run's (2 -> 1 from the 2-rank checkpoint, 1 -> 2 from the 1-rank one).
    w_before = adapter(two, 1)
    assert any(not torch.equal(wa[k], w_before[k]) for k in wa)  # epoch 2 did move the weights
    for ranks, source in ((1, two), (2, one)):
        ckpt = tmp_path / f"from_{source.name}"
        shutil.copytree(source / "checkpoints" / "epoch_0001", ckpt)
        run = tmp_path / f"on_{ranks}_from_{source.name}"
        out = launch(ranks, _cfg(run, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=2), tmp_path,
                     "--resume", str(ckpt))
        assert "converting it to DeepSpeed's universal format" in out
        assert (ckpt / "state_universal").is_dir() and not (ckpt / "latest_universal").exists()
        w = adapter(run, 2)
        for k in wa:
            torch.testing.assert_close(w[k], wa[k], rtol=1e-4, atol=1e-6)
        assert records(run, "epoch")[-1]["reward_mean"] == pytest.approx(records(two, "epoch")[-1]["reward_mean"],
                                                                          rel=1e-6)
        assert [r["epoch"] for r in records(run, "epoch")] == [2]  # (epoch 1 ran in the source run)


def test_zero2_offload_and_full_finetuning_under_zero3(tmp_path, tiny_pipeline_dir, digit_reward_dir, odd_prompts,
                                                       one_rank):
    """ZeRO-2 and ZeRO-3 with CPU offload on 2 ranks take the same LoRA step as ZeRO-3 on 1 rank;
    full fine-tuning runs under ZeRO-3 on 2 ranks and exports a diffusers transformer that differs
    from the base."""
    from diffusers import SD3Transformer2DModel

    one = one_rank
    z2 = tmp_path / "z2"
    cfg = _cfg(z2, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=2)
    cfg = with_overrides(cfg, {"deepspeed": {"config": str(ROOT / "configs/ds/zero2.json")}})
    launch(2, cfg, tmp_path)
    w2, w1 = adapter(z2, 1), adapter(one, 1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    # ZeRO-2 shards resume on 1 rank through the universal format too.
    resumed = tmp_path / "z2_on_1"
    cfg = with_overrides(cfg, {"log": {"out_dir": str(resumed)}})
    out = launch(1, cfg, tmp_path, "--resume", str(z2 / "checkpoints" / "epoch_0001"))
    assert "converting it to DeepSpeed's universal format" in out
    w_resumed, w_z2 = adapter(resumed, 2), adapter(z2, 2)
    assert any(not torch.equal(w_z2[k], w2[k]) for k in w2)
    for k in w_z2:
        torch.testing.assert_close(w_resumed[k], w_z2[k], rtol=1e-4, atol=1e-6)

    # ZeRO-3 with parameters and optimizer offloaded to the CPU (DeepSpeed's CPU AdamW): the same step.
    off = tmp_path / "offload"
    cfg = _cfg(off, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=1)
    cfg = with_overrides(cfg, {"deepspeed": {"config": str(ROOT / "configs/ds/zero3_offload.json")}})
    launch(2, cfg, tmp_path)
    w_off = adapter(off, 1)
    assert any(w_off[k].abs().max() > 0 for k in w_off if "lora_B" in k)  # B starts at zero: the step happened
    for k in w1:
        torch.testing.assert_close(w_off[k], w1[k], rtol=1e-4, atol=1e-6)

    full = tmp_path / "full"
    cfg = _cfg(full, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=1)
    cfg = with_overrides(cfg, {"lora": {"enabled": False}, "train": {"learning_rate": 1e-4}})
    launch(2, cfg, tmp_path)
    trained = SD3Transformer2DModel.from_pretrained(str(full / "checkpoints" / "epoch_0001" / "transformer"))
    base = SD3Transformer2DModel.from_pretrained(str(tiny_pipeline_dir), subfolder="transformer")
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed, "full fine-tuning under ZeRO-3 did not change the exported weights"
    assert all(torch.isfinite(p).all() for p in trained.parameters())


@pytest.mark.parametrize("algorithm, ranks", [("fdfo", 2), ("fdfo", 4), ("flow_grpo", 2)])
def test_exchanged_rows_train_exactly_like_gathered_ones(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                         algorithm, ranks):
    """Each rank fetches only the rows its slice of the global shuffle references: after an epoch the
    adapter is bit-identical to the one trained with every rank holding the whole epoch. On 2 ranks,
    FDFO also runs with its trajectories in host memory (exchanged in chunks of one row): the same again."""
    own = {"flow_grpo": {"group_size": 2, "groups_per_epoch": 2, "kl_beta": 0.0}} if algorithm == "flow_grpo" else {}
    sections = dict(train={"algorithm": algorithm, "epochs": 1, "micro_batch_rows": 4 if algorithm == "fdfo" else 3},
                    **own,
                    eval={"every": 0, "metrics": []}, log={"plot_every": 0, "progress": False})
    runs = {}
    for gather in (False, True):
        run = tmp_path / f"{'gather' if gather else 'exchange'}"
        launch(ranks, tiny_run(run, tiny_pipeline_dir, digit_reward_dir, **sections), tmp_path, gather=gather)
        runs[gather] = adapter(run, 1)
    assert runs[False].keys() == runs[True].keys()
    for k in runs[True]:
        assert torch.equal(runs[False][k], runs[True][k]), k
    assert records(tmp_path / "exchange", "step")[0]["loss"] == records(tmp_path / "gather", "step")[0]["loss"]
    if algorithm == "fdfo" and ranks == 2:
        sections["train"]["trajectory_device"] = "host"
        launch(ranks, tiny_run(tmp_path / "host", tiny_pipeline_dir, digit_reward_dir, **sections), tmp_path,
               extra_env={"FDFO_TRAJECTORY_CHUNK_BYTES": "1"})
        host = adapter(tmp_path / "host", 1)
        for k in runs[False]:
            assert torch.equal(host[k], runs[False][k]), k
        assert records(tmp_path / "host", "epoch")[0]["trajectory_device_mib"] < \
            records(tmp_path / "exchange", "epoch")[0]["trajectory_device_mib"]
    if algorithm == "fdfo":  # rank 0 held its own xs, vs and its elements' fetched ones: 1/ranks of the epoch each
        cfg = tiny_run(tmp_path / "x", tiny_pipeline_dir, digit_reward_dir, **sections)
        epoch_rows_steps = 2 * cfg.fdfo.pairs_per_epoch * cfg.sampling.steps
        latent_bytes = 4 * 8 * 8 * 4  # [4, 8, 8] fp32
        expected = 2 * 2 * epoch_rows_steps // ranks * latent_bytes / 2**20
        assert records(tmp_path / "exchange", "epoch")[0]["trajectory_mib"] == pytest.approx(expected)


def launch_nodes(nodes: int, cfg, tmp_path: Path, *extra: str) -> str:
    """``deepspeed fdfo/train.py`` as ``nodes`` nodes of one rank each, every node started by hand (no ssh:
    ``--no_ssh --node_rank``) on this machine with the master on 127.0.0.1, as a cluster's scheduler would."""
    path = tmp_path / f"{Path(cfg.log.out_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.read_dict()))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(nodes)))
    port = free_port()
    launcher = Path(sys.executable).with_name("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([str(launcher), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                               "--master_addr", "127.0.0.1", "--master_port", port, "fdfo/train.py",
                               "--config", str(path), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(nodes)]
    return wait_all(procs)


def test_two_nodes_train_save_and_resume_like_one_node(tmp_path, tiny_pipeline_dir, digit_reward_dir, odd_prompts,
                                                       one_rank):
    """Two "nodes" of one rank each (global ranks 0 and 1, local rank 0 on both): the same step as one node,
    one writer per checkpoint file, and a resume on the two nodes that repeats the epoch exactly."""
    nodes = tmp_path / "nodes"
    cfg = _cfg(nodes, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=2)
    out = launch_nodes(2, cfg, tmp_path)
    assert out.count("checkpoint written") == 2  # one line per checkpoint: global rank 0 reports and writes
    w_nodes, w_one = adapter(nodes, 1), adapter(one_rank, 1)
    for k in w_one:
        torch.testing.assert_close(w_nodes[k], w_one[k], rtol=1e-4, atol=1e-6)
    ckpt = nodes / "checkpoints" / "epoch_0001"
    assert sorted(p.name for p in (ckpt / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = tmp_path / "nodes_resumed"
    cfg = with_overrides(cfg, {"log": {"out_dir": str(resumed)}})
    launch_nodes(2, cfg, tmp_path, "--resume", str(ckpt))
    for k in w_one:
        assert torch.equal(adapter(resumed, 2)[k], adapter(nodes, 2)[k]), k


def test_the_evaluation_grid_of_two_ranks_is_the_grid_of_one(tmp_path, tiny_pipeline_dir, digit_reward_dir,
                                                             odd_prompts):
    """The base model's evaluation grid holds the same cells whichever rank drew each image: on 2 ranks it
    is the 1-rank picture (same size, the same pixels but for rounding of the differently batched maths)."""
    import numpy as np
    from PIL import Image

    pictures = []
    for ranks in (1, 2):
        run = tmp_path / f"on_{ranks}"
        cfg = with_overrides(_cfg(run, tiny_pipeline_dir, digit_reward_dir, odd_prompts, epochs=1), {
            "eval": {"every": 1, "num_images": 10, "metrics": []},
            "log": {"plot_every": 1, "grid_pairs": 3}, "checkpoint": {"every": 0}})
        launch(ranks, cfg, tmp_path)
        pictures.append(np.asarray(Image.open(run / "samples" / "eval_epoch_0000.png"), dtype=np.int16))
    one, two = pictures
    assert one.shape == two.shape
    assert np.abs(one - two).max() <= 2 and np.abs(one - two).mean() < 0.05
