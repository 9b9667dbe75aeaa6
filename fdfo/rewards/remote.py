"""The ``remote`` reward: the scores of a reward server (``python -m fdfo.rewards.serve``) over HTTP.

``reward.weights: {remote: 1.0}`` with ``reward.paths.remote: http://HOST:PORT`` scores every chunk of
``reward.batch_size`` images on the server, which holds the reward model (on another machine, or in
one process that the ranks of a run share). The protocol, plain HTTP:

    GET  /        -> 200 {"reward": NAME, "batch_size": N}
    POST /score   body: a safetensors file (Content-Type application/octet-stream) holding one tensor
                  "images" [B, C, H, W], float in [0, 1] or uint8 in 0..255, with the metadata entry
                  "prompts", a JSON list of the B prompts
                  -> 200 {"scores": [B numbers]}  (NaN where the reward gives NaN)
                  -> 400 {"error": why} (a malformed request), 500 {"error": why} (the reward failed)

A score is never made up. The client sends float32 images, so a remote reward gives exactly the scores
of the same reward run locally. A server that cannot be reached, times out or answers 502-504 is tried
again ``retries`` times, waiting ``backoff`` seconds and twice as long each time; then, and when the
server is down as the reward is built, ``RewardUnavailable`` names the URL and how to start a server.
A server that answers with an error (400, 500) raises its message at once: trying again gives the same.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from fdfo.errors import ConfigError
from fdfo.rewards.base import RewardUnavailable, checked_scores

RETRIED_STATUS = (502, 503, 504)  # a proxy or server that is (re)starting: worth another try


def encode_request(prompts: list[str], images: Tensor) -> bytes:
    """The body of ``POST /score``: images [B, C, H, W] (float or uint8) with their prompts."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    return save_safetensors({"images": images.detach().cpu().contiguous()}, metadata={"prompts": json.dumps(prompts)})


def decode_request(body: bytes) -> tuple[list[str], Tensor]:
    """(prompts, images as float32 in [0, 1]) of a ``POST /score`` body; ValueError saying what is wrong."""
    try:
        images = load_safetensors(body)["images"]
        prompts = json.loads(_metadata(body)["prompts"])
    except Exception as exc:  # (safetensors' own error types, a missing key, broken JSON: all a bad body)
        raise ValueError(f"the body is not a safetensors file with a tensor 'images' and a metadata entry "
                         f"'prompts' ({type(exc).__name__}: {exc})") from None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise ValueError("metadata 'prompts' must be a JSON list of strings")
    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(f"tensor 'images' must be [B, C, H, W] with B = {len(prompts)} prompts, got shape "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return prompts, images.float() / 255
    if not images.is_floating_point():
        raise ValueError(f"tensor 'images' must be uint8 or floating point, got {images.dtype}")
    return prompts, images.float()


def _metadata(body: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (its first 8 bytes: the header's length)."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8:8 + size])["__metadata__"]


def check_url(url: str | None) -> str:
    """``url`` without a trailing '/', if it is http(s)://HOST[:PORT]; a ConfigError otherwise."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"reward 'remote' needs reward.paths.remote: the URL of a reward server, such as "
                          f"http://127.0.0.1:8765 (got {url!r}); start one with `python -m fdfo.rewards.serve "
                          "--reward NAME`")
    return url.rstrip("/")


class RemoteReward:
    """``reward(prompts, images) -> Tensor [B]`` scored by the server at ``url``; see the module docstring.

    batch_size: images per request. timeout: seconds to wait for one answer. retries, backoff: the
    further tries of a request that got no answer, and the first wait between them (doubling).
    """

    name = "remote"

    def __init__(self, url: str | None, *, batch_size: int = 8, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0):
        if batch_size < 1:
            raise ValueError(f"reward 'remote': batch_size must be >= 1, got {batch_size}")
        self.url, self.batch_size = check_url(url), batch_size
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.info = self._request("/")  # (a server that is down is reported now, not at the first batch)

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: Tensor) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward 'remote': got {len(prompts)} prompts for {images.shape[0]} images")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            body = encode_request(chunk, images[i:i + self.batch_size].float())
            answer = self._request("/score", body)
            scores = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(scores, list):
                raise RuntimeError(f"reward server {self.url} answered without a list 'scores'; is it a "
                                   "reward server (python -m fdfo.rewards.serve)?")
            out.append(checked_scores(f"remote ({self.url})", torch.tensor(scores, dtype=torch.float32), len(chunk)))
        return (torch.cat(out) if out else torch.empty(0)).to(images.device)

    def _request(self, route: str, body: bytes | None = None) -> dict:
        """The JSON answer of ``GET route`` (or ``POST`` of ``body``), tried again as the module docstring says."""
        request = urllib.request.Request(self.url + route, data=body, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/octet-stream"})
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    text = response.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRIED_STATUS:
                    raise RuntimeError(f"reward server {self.url} refused {route} (HTTP {exc.code}): "
                                       f"{_error_of(exc)}") from None
                why = f"HTTP {exc.code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                why = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        else:
            raise RewardUnavailable(f"reward server {self.url} did not answer {route} after {self.retries + 1} "
                                    f"tries ({why}); start it (python -m fdfo.rewards.serve --reward NAME --port "
                                    "PORT) or fix reward.paths.remote")
        try:
            return json.loads(text)
        except ValueError:
            raise RuntimeError(f"{self.url}{route} answered something that is not JSON; is it a reward server "
                               "(python -m fdfo.rewards.serve)?") from None


def _error_of(exc: urllib.error.HTTPError) -> str:
    """The server's ``error`` message of an error answer (its raw text if that is not the server's JSON)."""
    text = exc.read().decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or exc.reason
