"""``python -m fdfo.rewards.serve``: one reward behind HTTP, for the ``remote`` reward of any run.

    python -m fdfo.rewards.serve --reward pickscore --device cuda:1 --port 8765
    python -m fdfo.rewards.serve --reward examples.my_reward:Contrast --port 8765

The reward is any name ``fdfo.rewards.build_reward`` knows (a built-in one, or ``module.path:Name``),
loaded once; requests from any number of clients are scored one at a time, in chunks of
``--batch-size``. The protocol is in ``fdfo.rewards.remote``. ``--port 0`` takes a free port; the
line printed at start names the URL. Standard library only (``http.server``), no authentication:
keep it on a trusted network.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from fdfo.rewards import build_reward
from fdfo.rewards.remote import decode_request


class RewardServer(ThreadingHTTPServer):
    """An HTTP server of ``reward`` (``reward(prompts, images) -> Tensor [B]``) on ``address`` (host, port)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward, name: str, batch_size: int):
        super().__init__(address, _Handler)
        self.reward, self.name, self.batch_size = reward, name, batch_size
        self.lock = threading.Lock()  # (one scoring at a time: a reward model is not shared between threads)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, prompts: list[str], images: torch.Tensor) -> list[float]:
        with self.lock, torch.no_grad():
            return self.reward(prompts, images).float().cpu().tolist()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "":
            self._answer(404, {"error": f"no route {self.path}; the routes are GET / and POST /score"})
            return
        self._answer(200, {"reward": self.server.name, "batch_size": self.server.batch_size})

    def do_POST(self) -> None:
        if self.path != "/score":
            self._answer(404, {"error": f"no route {self.path}; the routes are GET / and POST /score"})
            return
        try:
            prompts, images = decode_request(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        except ValueError as exc:
            self._answer(400, {"error": str(exc)})
            return
        try:
            scores = self.server.score(prompts, images)
        except Exception as exc:  # (the reward's error goes back to the client, whose run stops with it)
            message = f"reward '{self.server.name}' failed: {type(exc).__name__}: {exc}"
            sys.stderr.write(message + "\n")
            self._answer(500, {"error": message})
            return
        self._answer(200, {"scores": scores})

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()  # (NaN scores as NaN, which Python's json reads back)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        """Quiet: a request is not worth a line (an error is printed by ``do_POST``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fdfo.rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="a reward name (pickscore, ...) or module.path:Name")
    parser.add_argument("--path", default=None, help="its weights (a directory or hub id; default: its own)")
    parser.add_argument("--cache-dir", default=None, help="where built-in tasks keep their models")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (0: a free one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="images per reward-model forward")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        reward = build_reward(args.reward, args.path, torch.device(args.device), args.cache_dir,
                              batch_size=args.batch_size)
        server = RewardServer((args.host, args.port), reward, args.reward, args.batch_size)
    except (ValueError, OSError) as exc:  # (ConfigError is a ValueError; a taken port an OSError)
        print(f"fdfo.rewards.serve: {exc}", file=sys.stderr)
        return 2
    print(f"serving reward '{args.reward}' on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
