"""The reward server (``python -m fdfo.rewards.serve``) and the ``remote`` reward that calls it: the same
scores as the reward run locally, through the overlapped scorer too; clear errors for a server that is
down or answers an error; and several clients against one server that is stopped and started again on
the same port. Every server listens on a free port of 127.0.0.1 and is stopped by its fixture."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fdfo.errors import ConfigError
from fdfo.rewards import RewardUnavailable, WeightedReward, build_reward, build_weighted_reward
from fdfo.rewards import remote
from fdfo.rewards.remote import RemoteReward, encode_request
from fdfo.rewards.serve import RewardServer
from fdfo.scoring import Scorer
from tests.test_reward_plugins import random_images, random_prompts

ROOT = Path(__file__).resolve().parents[1]


class Squares:
    """A deterministic reward of each image and prompt that counts its calls and may sleep in each."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, 0

    def __call__(self, prompts, images):
        self.calls += 1
        time.sleep(self.delay)
        return images.flatten(1).pow(2).mean(1) + torch.tensor([len(p) for p in prompts]) / 7


@pytest.fixture
def serve():
    """start(reward, port=0, ...) -> a RewardServer serving on 127.0.0.1 from a thread; all stopped at the end."""
    running = []

    def start(reward, port: int = 0, name: str = "scored", batch_size: int = 8) -> RewardServer:
        server = RewardServer(("127.0.0.1", port), reward, name, batch_size)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        stop(server, thread)


def stop(server: RewardServer, thread: threading.Thread | None = None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(5)


class Clock:
    """Stands in for the client's ``time`` module: records each wait (and waits, if ``real``)."""

    def __init__(self, real: bool):
        self.real, self.waits = real, []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.real:
            time.sleep(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the same scores


def test_the_remote_reward_gives_the_local_scores(serve, digit_reward_dir):
    """digit_probability behind the server gives exactly what it gives locally (float images, a NaN image),
    through reward.paths.remote and the weighted reward; a uint8 request is scored as the images /255."""
    batch_size = random.randint(2, 5)
    local = build_reward("digit_probability", str(digit_reward_dir), "cpu", batch_size=batch_size)
    server = serve(build_reward("digit_probability", str(digit_reward_dir), "cpu", batch_size=batch_size),
                   name="digit_probability", batch_size=batch_size)
    n = random.randint(5, 12)
    prompts, images = random_prompts(n), random_images(n)
    images[1, 0, 2, 2] = float("nan")
    weighted = build_weighted_reward({"remote": 1.0}, {"remote": server.url}, torch.device("cpu"),
                                     options={"remote": {"batch_size": batch_size}})
    with pytest.warns(UserWarning, match=r"non-finite reward 'remote' for 1 of"):
        got, parts = weighted(prompts, images)
    want = local(prompts, images)
    assert torch.isnan(want[1]) and want[~torch.isnan(want)].std() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(parts["remote"], want, rtol=0, atol=0, equal_nan=True)
    assert weighted.terms["remote"][1].info == {"reward": "digit_probability", "batch_size": batch_size}

    grey = (torch.rand(n, 1, 16, 16) * 255).round().to(torch.uint8)
    request = urllib.request.Request(server.url + "/score", data=encode_request(prompts, grey), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        scores = torch.tensor(json.loads(response.read())["scores"], dtype=torch.float32)
    assert torch.equal(scores, local(prompts, grey.float() / 255))


def test_the_command_serves_a_reward_of_your_own():
    """`python -m fdfo.rewards.serve --reward module:Name --port 0` prints its URL and scores as the reward
    does locally."""
    spec = "tests.test_reward_plugins:Brightness"
    proc = subprocess.Popen([sys.executable, "-m", "fdfo.rewards.serve", "--reward", spec, "--port", "0",
                             "--device", "cpu", "--batch-size", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving reward '{spec}' on http://127.0.0.1:"), line + proc.stderr.read()
        client = RemoteReward(line.split(" on ")[1].strip(), batch_size=4)
        n = random.randint(3, 10)
        prompts, images = random_prompts(n), random_images(n)
        assert torch.equal(client(prompts, images), build_reward(spec, None, "cpu", batch_size=3)(prompts, images))
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("chunk", [2, 3])
def test_a_slow_remote_reward_through_the_scorer_gives_the_same_scores_with_and_without_overlap(serve, chunk):
    """A server that sleeps in every call, scored through fdfo.scoring.Scorer while micro-batches are
    submitted: overlap on and off give the rewards of the whole batch scored locally, bit for bit."""
    server = serve(Squares(delay=0.05))
    batches = [torch.randn(int(torch.randint(1, 5, ())), 3, 8, 8) for _ in range(4)]
    prompts = [random_prompts(b.shape[0]) for b in batches]
    decode = lambda x0: torch.sigmoid(x0)  # noqa: E731
    flat = [p for ps in prompts for p in ps]
    want = Squares()(flat, decode(torch.cat(batches)))
    for overlap in (False, True):
        reward = WeightedReward({"remote": (1.0, RemoteReward(server.url, batch_size=chunk))})
        with Scorer(decode, reward, chunk=chunk, overlap=overlap) as scorer:
            for p, x0 in zip(prompts, batches):
                scorer.submit(p, x0)
            got = scorer.result()
        assert torch.equal(got.rewards, want) and torch.equal(got.parts["remote"], want)
    assert server.reward.calls == 2 * -(-len(flat) // chunk)


# --------------------------------------------------------------------------- errors


def test_a_server_that_is_down_is_a_clear_error_after_the_retries(monkeypatch):
    clock = Clock(real=False)
    monkeypatch.setattr(remote, "time", clock)
    url = f"http://127.0.0.1:{free_port()}"
    retries = random.randint(1, 4)
    with pytest.raises(RewardUnavailable, match=rf"^reward server {url} did not answer / after {retries + 1} tries "
                                                r"\(.*\); start it \(python -m fdfo\.rewards\.serve"):
        RemoteReward(url, retries=retries, backoff=0.5)
    assert clock.waits == [0.5 * 2 ** k for k in range(retries)]
    with pytest.raises(RewardUnavailable, match=r"did not answer"):  # and through the registry, as a run builds it
        build_reward("remote", url, "cpu", batch_size=2)
    for bad in (None, "127.0.0.1:8765", "ftp://host:1"):
        with pytest.raises(ConfigError, match=r"reward 'remote' needs reward\.paths\.remote: the URL of a reward"):
            RemoteReward(bad)


def test_an_error_answer_is_raised_at_once_not_retried(serve):
    def broken(prompts, images):
        broken.calls += 1
        raise RuntimeError("the reward model ran out of memory")

    broken.calls = 0
    server = serve(broken)
    client = RemoteReward(server.url, retries=3, backoff=0.01)
    with pytest.raises(RuntimeError, match=rf"^reward server {server.url} refused /score \(HTTP 500\): reward "
                                           r"'scored' failed: RuntimeError: the reward model ran out of memory$"):
        client(["a"], torch.rand(1, 3, 4, 4))
    assert broken.calls == 1

    wrong = serve(lambda prompts, images: torch.zeros(len(prompts) + 1))
    with pytest.raises(ValueError, match=rf"^reward 'remote \({wrong.url}\)' returned scores of shape \(3,\) for 2"):
        RemoteReward(wrong.url)(["a", "b"], torch.rand(2, 3, 4, 4))

    two_prompts = save_safetensors({"images": torch.rand(3, 3, 4, 4)}, metadata={"prompts": '["a", "b"]'})
    for body, status, match in ((b"not safetensors", 400, "not a safetensors file"),
                                (encode_request(["a"], torch.rand(1, 3, 4, 4))[:-8], 400, "not a safetensors"),
                                (two_prompts, 400, "must be [B, C, H, W] with B = 2 prompts, got shape (3, 3, 4, 4)")):
        request = urllib.request.Request(server.url + "/score", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == status and match in json.loads(info.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/nowhere", timeout=10)
    assert info.value.code == 404
    assert broken.calls == 1


# --------------------------------------------------------------------------- load


def test_clients_in_parallel_ride_out_a_restart_and_fail_clearly_when_it_stays_down(serve, monkeypatch):
    """Four clients (standing in for a run's ranks) score against one server, which is stopped and started
    again on the same port mid-run: every call gets the local scores, some after a retry. Stopped for good,
    each client's next call raises RewardUnavailable within its retry window."""
    clock = Clock(real=True)
    monkeypatch.setattr(remote, "time", clock)
    server = serve(Squares())
    port = server.server_address[1]
    done, errors, results = [0], [], {}
    lock = threading.Lock()

    def client(k: int) -> None:
        reward = RemoteReward(server.url, batch_size=3, retries=6, backoff=0.05)  # a window of 3.15 s
        try:
            for i in range(12):
                n = random.randint(1, 6)
                prompts, images = random_prompts(n), random_images(n, size=8)
                results[(k, i)] = (reward(prompts, images), Squares()(prompts, images))
                with lock:
                    done[0] += 1
                time.sleep(0.02)
        except Exception as exc:  # (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while done[0] < 8 and not errors:
        time.sleep(0.01)
    stop(server)
    time.sleep(0.3)  # down while the clients go on
    again = serve(Squares(), port=port)
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert len(results) == 48 and all(torch.equal(got, want) for got, want in results.values())
    assert clock.waits, "no call met the outage"
    assert again.reward.calls > 0

    late_clients = [RemoteReward(again.url, retries=2, backoff=0.05) for _ in range(3)]
    stop(again)
    started = time.perf_counter()
    outcomes = []

    def late_client(reward: RemoteReward) -> None:
        try:
            reward(["a"], torch.rand(1, 3, 4, 4))
        except Exception as exc:  # (checked by the main thread)
            outcomes.append(exc)

    late = [threading.Thread(target=late_client, args=(c,)) for c in late_clients]
    for t in late:
        t.start()
    for t in late:
        t.join(20)
    assert len(outcomes) == 3 and all(isinstance(e, RewardUnavailable) for e in outcomes)
    assert all(f"reward server {again.url} did not answer /score after 3 tries" in str(e) for e in outcomes)
    assert time.perf_counter() - started < 5
