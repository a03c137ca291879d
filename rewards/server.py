"""A reward server for scorers whose dependencies clash with training, and the ``remote`` scorer.

Run the scorer in its own environment (``mmrl reward serve imagereward --port 8765``) and score
from training with ``load("remote", url="http://127.0.0.1:8765")``.

Wire format (JSON over HTTP, stdlib only):

- ``GET /health`` -> ``{"name", "scale", "uses_prompts", "max_batch", "max_request_bytes"}``.
- ``POST /score`` with ``{"prompts": [B str], "images": [B image]}`` where an image is
  ``{"format": "png", "data": base64 PNG}`` (PIL inputs; lossless for 8-bit images) or
  ``{"format": "f32", "shape": [C, H, W], "data": base64 little-endian float32}`` (tensor inputs,
  sent exactly). -> ``{"scores": [B float]}``.
- Errors: ``{"error": message}`` with 400 (bad request), 401 (token), 413 (too large: body over
  ``max_request_bytes`` or more than ``max_batch`` images), 500 (the scorer failed).

With a token, requests carry ``Authorization: Bearer TOKEN``. The server binds to loopback unless
told otherwise, and refuses a non-loopback address without a token.
"""
from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmrl.rewards.base import Scorer

MAX_REQUEST_BYTES = 64 * 2**20


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_images(images) -> List[Dict[str, Any]]:
    """PIL images -> PNG entries; a float tensor ``[B, C, H, W]`` -> exact float32 entries."""
    if isinstance(images, torch.Tensor):
        arr = images.detach().to("cpu", torch.float32).numpy().astype("<f4")
        return [{"format": "f32", "shape": list(a.shape),
                 "data": base64.b64encode(a.tobytes()).decode()} for a in arr]
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append({"format": "png", "data": base64.b64encode(buf.getvalue()).decode()})
    return out


def decode_images(entries: List[Dict[str, Any]]):
    """Inverse of :func:`encode_images`: a PIL list or a ``[B, C, H, W]`` float tensor."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("'images' must be a non-empty list")
    formats = {e.get("format") if isinstance(e, dict) else None for e in entries}
    if formats == {"png"}:
        try:
            return [Image.open(io.BytesIO(base64.b64decode(e["data"]))) for e in entries]
        except UnidentifiedImageError as err:
            raise ValueError(f"a 'png' image could not be decoded ({err})") from None
    if formats == {"f32"}:
        shapes = {tuple(e["shape"]) for e in entries}
        if len(shapes) != 1:
            raise ValueError(f"f32 images have different shapes {sorted(shapes)}; send one shape")
        shape = shapes.pop()
        arrs = [np.frombuffer(base64.b64decode(e["data"]), dtype="<f4") for e in entries]
        if any(a.size != int(np.prod(shape)) for a in arrs):
            raise ValueError(f"an f32 image's data does not match its shape {list(shape)}")
        return torch.from_numpy(np.stack([a.reshape(shape) for a in arrs]).copy())
    raise ValueError(f"image formats {sorted(map(str, formats))}; expected all 'png' or all 'f32'")


class RewardServer:
    """Serve one scorer over HTTP (see module docstring for the protocol).

    Args:
        scorer: any scorer (``scorer(images, prompts) -> Tensor[B]``).
        host: address to bind; loopback by default. Any other address needs a ``token``.
        port: TCP port; 0 picks a free one (read it back from ``.port``).
        token: shared secret required as ``Authorization: Bearer TOKEN``.
        max_request_bytes: larger bodies get 413 without being read.
        max_batch: more images per request get 413.
        log: print one line per request (off in tests).
    """

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_batch: int = 256, log: bool = False):
        if not is_loopback(host) and not token:
            raise ValueError(f"refusing to serve on non-loopback host {host!r} without a token; "
                             f"pass --token (or MMRL_REWARD_TOKEN) or bind to 127.0.0.1")
        self.scorer, self.token, self.log = scorer, token, log
        self.max_request_bytes, self.max_batch = int(max_request_bytes), int(max_batch)
        self._lock = threading.Lock()  # one model call at a time: models are not thread-safe
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._served = False  # shutdown() blocks forever on a server that never served

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def health(self) -> Dict[str, Any]:
        s = self.scorer
        return {"name": getattr(s, "name", type(s).__name__), "scale": getattr(s, "scale", ""),
                "uses_prompts": getattr(s, "uses_prompts", True), "max_batch": self.max_batch,
                "max_request_bytes": self.max_request_bytes}

    def score(self, body: Dict[str, Any]) -> List[float]:
        prompts, images = body.get("prompts"), decode_images(body.get("images"))
        with self._lock:
            return [float(v) for v in self.scorer(images, prompts).detach().cpu()]

    def start(self) -> "RewardServer":
        """Serve in a daemon thread; returns self (use ``stop()`` to end)."""
        self._served = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.1})
        self._thread.start()
        return self

    def serve_forever(self):
        """Serve in this thread until ``stop()`` from another thread or KeyboardInterrupt."""
        self._served = True
        self.httpd.serve_forever()

    def stop(self):
        """Stop serving and close the socket (safe to call on a server never started)."""
        if self._served:
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _make_handler(server: RewardServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may take to send a request before it is dropped

        def _reply(self, code: int, payload: Dict[str, Any]):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); it will retry or drop the samples

        def _authorized(self) -> bool:
            if not server.token:
                return True
            got = self.headers.get("Authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {server.token}".encode())

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self._reply(404, {"error": f"no route GET {self.path}; try /health"})
            if not self._authorized():
                return self._reply(401, {"error": "missing or wrong token"})
            self._reply(200, server.health())

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._reply(404, {"error": f"no route POST {self.path}; try /score"})
            if not self._authorized():
                return self._reply(401, {"error": "missing or wrong token"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                return self._reply(400, {"error": "bad Content-Length header"})
            if length > server.max_request_bytes:
                self.close_connection = True
                return self._reply(413, {"error": f"request of {length} bytes exceeds "
                                                  f"{server.max_request_bytes}; send smaller "
                                                  f"batches (remote batch_size=...)"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError(f"body is a JSON {type(body).__name__}; expected an object "
                                     f"{{'prompts': [...], 'images': [...]}}")
                n = len(body.get("images") or [])
                if n > server.max_batch:
                    return self._reply(413, {"error": f"{n} images exceed max_batch "
                                                      f"{server.max_batch}; send smaller batches"})
                scores = server.score(body)
            except (ValueError, TypeError, KeyError) as err:
                return self._reply(400, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # the scorer itself failed: report it, keep serving
                return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            self._reply(200, {"scores": scores})

        def log_message(self, fmt, *args):
            if server.log:
                super().log_message(fmt, *args)

    return Handler


class RemoteScorer(Scorer):
    """A scorer served by ``mmrl reward serve`` (see module docstring); no gradients.

    Output scale: the served scorer's (reported by its ``/health``, in ``.scale``).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        token: shared secret (default: the ``MMRL_REWARD_TOKEN`` environment variable, if set).
        timeout: seconds per HTTP request.
        retries: extra attempts after a connection error, timeout or 5xx (not after 4xx),
            with exponential backoff starting at ``backoff`` seconds.
        batch_size: images per request.
    """

    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 32):
        if int(retries) < 0 or float(timeout) <= 0:
            raise ValueError(f"remote retries={retries!r}, timeout={timeout!r}; expected "
                             f"retries >= 0 and timeout > 0")
        super().__init__(batch_size, grad=False)
        self.url = url.rstrip("/")
        self.token = token or os.environ.get("MMRL_REWARD_TOKEN") or None
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        info = self._request("GET", "/health")
        self.name = info.get("name", "remote")
        self.scale = info.get("scale", "")
        self.uses_prompts = bool(info.get("uses_prompts", True))
        self.batch_size = min(self.batch_size, int(info.get("max_batch", self.batch_size)))
        self.max_request_bytes = int(info.get("max_request_bytes", MAX_REQUEST_BYTES))

    def _request(self, method: str, route: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception = RuntimeError("no attempt made")
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + route, data=data, headers=headers,
                                         method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:
                msg = _error_text(err)
                if err.code < 500:  # the request is wrong: retrying cannot help
                    raise ValueError(f"reward server {self.url} answered {err.code}: {msg}") \
                        from None
                last = RuntimeError(f"reward server {self.url} answered {err.code}: {msg}")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = err
        raise ConnectionError(f"reward server {self.url}{route} failed after {self.retries + 1} "
                              f"attempt(s): {last}; is `mmrl reward serve` running there?")

    def _score(self, images, prompts):
        entries, scores = encode_images(images), []
        for lo, hi in _pack(entries, prompts, self.max_request_bytes):
            out = self._request("POST", "/score", {"prompts": prompts[lo:hi],
                                                   "images": entries[lo:hi]})
            scores += out["scores"]
        return torch.tensor(scores, dtype=torch.float32)


def _pack(entries, prompts, limit: int):
    """``[(lo, hi)]`` runs of entries whose JSON body stays under ``limit`` bytes."""
    budget = int(limit * 0.95) - 64  # room for the JSON wrapping
    runs, lo, size = [], 0, 0
    for i, (e, p) in enumerate(zip(entries, prompts)):
        n = len(e["data"]) + len(p.encode()) * 2 + 64
        if n > budget:
            raise ValueError(f"image {i} needs {n} bytes, over the server's request limit of "
                             f"{limit}; send smaller images or raise --max-request-mb")
        if i > lo and size + n > budget:
            runs.append((lo, i))
            lo, size = i, 0
        size += n
    runs.append((lo, len(entries)))
    return runs


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", "")
    except Exception:  # a non-JSON error body: report the status only
        return err.reason or ""
