"""Models from the Hugging Face hub, without waiting on a hub that cannot be reached.

``from_pretrained`` with a hub id asks the hub for the newest files even when they are cached; on a
node without network it retries for close to a minute before it gives up (or falls back to the
cache). ``resolve(repo_id, ...)`` answers at once instead:

* the hub switched off (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``) or unreachable (one TCP
  connection to the hub's host, ``HF_ENDPOINT``, refused or not answered within ``PROBE_S``, tried
  once per process): the cached snapshot's directory when the cache holds the model, else one line
  saying that it is not cached and how to get it;
* the hub reachable: the hub id, for ``from_pretrained`` to download or refresh as usual.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse

PROBE_S = 3.0  # seconds the one probe of the hub's host may take
_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """Whether the hub is switched off by the environment (huggingface_hub's and transformers' switches)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def host() -> tuple[str, int]:
    """The hub's host and port (``HF_ENDPOINT``, default https://huggingface.co)."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.lru_cache(maxsize=None)
def reachable(address: tuple[str, int] | None = None) -> bool:
    """Whether a TCP connection to the hub's host opens within ``PROBE_S`` (once per process and host)."""
    try:
        with socket.create_connection(address or host(), timeout=PROBE_S):
            return True
    except OSError:
        return False


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The local directory of ``repo_id``'s cached snapshot, or None when the cache has none."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # noqa: BLE001  (huggingface_hub's "not cached" errors differ between versions)
        return None


def resolve(repo_id: str, what: str, fix: str, *, revision: str | None = None, cache_dir: str | None = None) -> str:
    """``repo_id`` for ``from_pretrained``, or its cached snapshot's directory when the hub is off or cannot be
    reached; a FileNotFoundError at once (``what``: the model's role, ``fix``: how to get it) when neither."""
    if not offline() and reachable(host()):
        return repo_id
    local = cached_snapshot(repo_id, revision, cache_dir)
    if local is not None:
        return local
    why = ("the hub is switched off (HF_HUB_OFFLINE)" if offline()
           else "the hub cannot be reached ({}:{} did not answer within {:g} s)".format(*host(), PROBE_S))
    raise FileNotFoundError(f"{what}: '{repo_id}' is not in the local model cache and {why}; {fix}")
