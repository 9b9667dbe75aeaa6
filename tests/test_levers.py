"""The trainer's throughput levers give the same training: no host synchronisation inside the micro-batch
loop, decoding and rewarding overlapped with sampling, micro-batch sizes chosen for the device."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from fdfo import tuning
from fdfo.scoring import Scorer
from tests.test_train import QUIET, tiny_run

# Tensor methods that read a device value back to the host (on CUDA each waits for the device).
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads(counter: list[int]):
    """Counts calls of the host-reading Tensor methods made in this thread while inside."""
    me = threading.get_ident()
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(fn):
        def counted(self, *args, **kwargs):
            if threading.get_ident() == me:
                counter[0] += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _reads_per_step(tmp_path, pipeline, reward, rows: int, name: str, place: str, seed: int) -> tuple[float, dict]:
    from fdfo.trainer import Trainer

    t = Trainer(tiny_run(tmp_path / name, pipeline, reward, train={"micro_batch_rows": rows, "trajectory_device": place},
                         **QUIET))
    batch = t.algorithm.sample(0)
    # Rewards drawn afresh per test (the same for both runs): what is counted is the optimizer's loop alone.
    R = torch.randn(len(batch.prompts), generator=torch.Generator().manual_seed(seed))
    micro_loss = t.algorithm.elements(batch, R, float(R.std()), t.my_elements(0))
    counter = [0]
    with count_host_reads(counter):
        record = t.optimize(0, micro_loss)
    return counter[0] / t.layout.optimizer_steps, record


@pytest.mark.parametrize("place", ["device", "host"])
def test_no_host_read_inside_the_micro_batch_loop(tmp_path, tiny_pipeline_dir, digit_reward_dir, place):
    """An optimizer step of 4 micro-batches reads from the device exactly as often as a step of 1: every read
    is once per step, none per micro-batch (on CUDA each such read would stall the loop)."""
    # 4 pairs x 2 rows x 4 steps = 32 elements, 2 optimizer steps: 16 per step, as 1 or 4 micro-batches.
    seed = int(torch.seed() % 2**31)
    one, rec_one = _reads_per_step(tmp_path, tiny_pipeline_dir, digit_reward_dir, 16, "one", place, seed)
    four, rec_four = _reads_per_step(tmp_path, tiny_pipeline_dir, digit_reward_dir, 4, "four", place, seed)
    assert one == four, f"host reads per optimizer step: {one} with 1 micro-batch, {four} with 4"
    # The same elements, the same loss, however the step is split: float32 sums in another order. The loss is a
    # mean of terms of either sign that largely cancel, so the tolerance is on its absolute value (the terms are
    # of order 1e-3 here; a wrong split, e.g. one micro-batch counted twice, moves it by that much).
    assert rec_four["loss"] == pytest.approx(rec_one["loss"], rel=1e-3, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.set_sync_debug_mode needs CUDA")
def test_no_cuda_sync_inside_the_micro_batch_loop(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    import warnings

    from fdfo.trainer import Trainer

    counts = {}
    for rows in (16, 4):
        t = Trainer(tiny_run(tmp_path / f"r{rows}", tiny_pipeline_dir, digit_reward_dir,
                             train={"micro_batch_rows": rows}, **QUIET))
        batch = t.algorithm.sample(0)
        R = torch.randn(len(batch.prompts), device=t.device)
        micro_loss = t.algorithm.elements(batch, R, float(R.std()), t.my_elements(0))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                t.optimize(0, micro_loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[rows] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[4] == counts[16], f"synchronising calls per epoch: {counts} (micro-batch rows -> count)"


def test_nonfinite_micro_batch_stops_before_the_update(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """A non-finite loss in a step's middle micro-batch: that step's update never happens (the weights are
    the ones before the epoch) and the error names the step."""
    from fdfo.trainer import Trainer

    t = Trainer(tiny_run(tmp_path / "nan", tiny_pipeline_dir, digit_reward_dir, train={"micro_batch_rows": 4},
                         **QUIET))
    batch = t.algorithm.sample(0)
    R = torch.randn(len(batch.prompts))
    inner = t.algorithm.elements(batch, R, float(R.std()), t.my_elements(0))
    calls = [0]

    def micro_loss(p):
        loss, metrics = inner(p)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == 2 else loss), metrics

    before = {k: v.clone() for k, v in t.model.lora_state_dict().items()}
    with pytest.raises(FloatingPointError, match="step 1"):
        t.optimize(0, micro_loss)
    after = t.model.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step changed the weights"
    assert calls[0] == 4  # the step's micro-batches ran (no read in between); the update did not


# --------------------------------------------------------------------------- overlapped scoring


class _SlowReward:
    """A deterministic reward that depends on each image and prompt, and sleeps a little per call."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []

    def __call__(self, prompts, images):
        self.calls.append(len(prompts))
        time.sleep(self.delay)
        base = images.flatten(1).double().pow(2).mean(1) + torch.tensor([len(p) for p in prompts]) / 100
        return base.float(), {"brightness": images.flatten(1).mean(1)}


def _decode(x0):
    return torch.tanh(x0) / 2 + 0.5


@pytest.mark.parametrize("chunk", [1, 3, 4, 8])
def test_scorer_overlap_equals_scoring_the_whole_batch(chunk):
    """Micro-batches of 6 rows scored as they come (worker thread or at once) give bit-identical images and
    rewards to the whole batch scored after sampling, and the reward sees the same chunks."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    batches = [torch.randn(6, 1, 4, 4, generator=gen) for _ in range(5)] + [torch.randn(2, 1, 4, 4, generator=gen)]
    prompts = [[f"p{i}-{j}" + "x" * int(torch.randint(5, (), generator=gen)) for j in range(b.shape[0])]
               for i, b in enumerate(batches)]
    whole = _SlowReward()
    images = _decode(torch.cat(batches))
    flat = [p for ps in prompts for p in ps]
    want = [whole(flat[i:i + chunk], images[i:i + chunk]) for i in range(0, len(flat), chunk)]
    want_R = torch.cat([r for r, _ in want])
    for overlap in (False, True):
        reward = _SlowReward()
        with Scorer(_decode, reward, chunk=chunk, overlap=overlap) as scorer:
            for p, x0 in zip(prompts, batches):
                scorer.submit(p, x0)
            got = scorer.result()
        assert torch.equal(got.images, images)
        assert torch.equal(got.rewards, want_R)
        assert torch.equal(got.parts["brightness"], torch.cat([m["brightness"] for _, m in want]))
        assert reward.calls == whole.calls


def test_scorer_overlaps_a_slow_reward_with_the_callers_work():
    """With overlap, a reward that sleeps runs while the caller works: the epoch takes about the larger of the
    two, not their sum (measured, with a wide margin for a busy machine)."""
    delay, n = 0.15, 6

    def epoch(overlap: bool) -> float:
        t0 = time.perf_counter()
        with Scorer(_decode, _SlowReward(delay), chunk=2, overlap=overlap) as scorer:
            for i in range(n):
                time.sleep(delay)  # the caller "samples" the next micro-batch
                scorer.submit(["a", "b"], torch.randn(2, 1, 4, 4))
            scorer.result()
        return time.perf_counter() - t0

    serial, overlapped = epoch(False), epoch(True)
    assert serial >= 2 * n * delay
    assert overlapped < serial * 0.75, f"overlap {overlapped:.2f} s vs serial {serial:.2f} s"


def test_scorer_error_in_the_worker_reaches_the_caller():
    def broken(prompts, images):
        raise RuntimeError("reward server down")

    with Scorer(_decode, broken, chunk=2, overlap=True) as scorer:
        scorer.submit(["a", "b"], torch.randn(2, 1, 4, 4))
        with pytest.raises(RuntimeError, match="reward server down"):
            scorer.result()


def test_training_with_and_without_overlap_is_identical(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    """One epoch of the real trainer with reward.overlap on and off: the same rewards and the same weights."""
    from fdfo.trainer import Trainer

    out = {}
    for overlap in (True, False):
        t = Trainer(tiny_run(tmp_path / str(overlap), tiny_pipeline_dir, digit_reward_dir,
                             reward={"overlap": overlap, "batch_size": 3}, train={"epochs": 1}, **QUIET))
        rec = t.train_epoch(0)
        out[overlap] = (rec["reward_mean"], {k: v.clone() for k, v in t.model.lora_state_dict().items()})
    assert out[True][0] == out[False][0]
    assert all(torch.equal(out[True][1][k], out[False][1][k]) for k in out[True][1])


# --------------------------------------------------------------------------- micro-batch choice


def test_largest_divisor_and_auto_defaults():
    n = int(torch.randint(7, 500, ()))
    for limit in (1, 3, 6, 1000):
        d = tuning.largest_divisor(n, limit)
        assert n % d == 0 and d <= limit
        assert all(n % k for k in range(d + 1, min(n, limit) + 1))
    assert tuning.given_or_default("auto", 20, 6) == 5 and tuning.given_or_default("auto", 24, 6) == 6
    assert tuning.given_or_default(7, 20, 6) == 7  # an integer is used as given (the layout checks it)


def test_memory_line_fits_the_largest_divisor():
    per_row, fixed = float(torch.randint(100, 1000, ())), float(torch.randint(0, 5000, ()))
    line = tuning.MemoryLine.through((1, 2), (int(fixed + per_row), int(fixed + 2 * per_row)))
    assert line.per_row == pytest.approx(per_row) and line.fixed == pytest.approx(fixed)
    units, reserved = 216, 1234.0
    free = (fixed + reserved + 20.5 * per_row) / tuning.FREE_FRACTION  # room for 20 rows, not 21
    rows = line.most_rows(units, free, reserved, 64)
    assert rows == 18  # the largest divisor of 216 not above 20
    assert line.most_rows(units, free, reserved, 12) == 12
    assert line.most_rows(units, 1.0, reserved, 64) == 1  # nothing fits: 1 (the run then reports its OOM)


def test_auto_sizes_on_cpu_are_the_published_ones(tmp_path, tiny_pipeline_dir, digit_reward_dir):
    from fdfo.trainer import Trainer

    t = Trainer(tiny_run(tmp_path / "auto", tiny_pipeline_dir, digit_reward_dir,
                         train={"micro_batch_rows": "auto"}, sampling={"micro_batch_pairs": "auto"}, **QUIET))
    # 16 elements per optimizer step: the largest divisor up to 6 is 4; 4 pairs per rank: 2 pairs (not 3).
    assert t.layout.micro_batch_rows == 4 and t.engine.ds_config["train_micro_batch_size_per_gpu"] == 4
    assert t.policy.sample_pairs == 2 and t.policy.forward_rows == 4
    assert not t.tuned.offload_text_encoders


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_text_encoders_park_in_pinned_memory_once(tiny_pipeline_dir):
    from fdfo.config import ModelConfig
    from fdfo.models import load_flow_model

    model = load_flow_model(ModelConfig(path=str(tiny_pipeline_dir), resolution=16, max_sequence_length=16),
                            torch.device("cuda"))
    want = model.encode(["a digit seven"])
    model.move_text_encoders("cpu")
    first = [p.data_ptr() for p in model.text_encoders()[0].parameters()]
    assert all(p.is_pinned() for m in model.text_encoders() for p in m.parameters())
    model.move_text_encoders("cuda")
    model.move_text_encoders("cpu")
    assert [p.data_ptr() for p in model.text_encoders()[0].parameters()] == first  # no second copy
    model.move_text_encoders("cuda")
    got = model.encode(["a digit seven"])
    assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
