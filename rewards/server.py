"""A reward server for scorers whose dependencies clash with training (or that are too large to
load in every training process), and the ``remote`` clients.

Run the scorer in its own environment (``mmrl reward serve imagereward --port 8765``) and score
from training with ``load("remote", url="http://127.0.0.1:8765")`` (``load("remote_video", ...)``
for a video scorer; :class:`RemoteJudge` for a pairwise judge).

Wire format (JSON over HTTP, stdlib only; media entries as in :mod:`mmrl.rewards.wire`):

- ``GET /health`` -> ``{"name", "scale", "uses_prompts", "media": "image" | "video", "routes",
  "max_batch", "max_request_bytes", "max_image_pixels", "max_request_pixels",
  "max_video_frames", "batching", "batch_window_ms", "stats": {"requests", "batches", "model_calls",
  "isolated_reruns"}}``.
- ``POST /score`` (``Content-Type: application/json``), image scorers: ``{"prompts": [B str],
  "images": [B image]}`` where an image is ``{"format": "png", "data": base64 PNG}`` (PIL inputs;
  lossless for 8-bit images) or ``{"format": "f32", "shape": [C, H, W], "data": base64
  little-endian float32}`` (tensor inputs, sent exactly). Video scorers (``media = "video"``):
  ``{"media": "video", "prompts": [B str], "videos": [B video], "fps": [B number | null]}``
  (``fps`` optional) where a video is ``{"format": "png", "frames": [F base64 PNG]}`` or
  ``{"format": "f32", "shape": [F, C, H, W], "data": base64 float32}``, all of one shape.
  -> ``{"scores": [B float]}``; a non-finite score is ``null`` and its index is listed in
  ``"nonfinite"`` (the client turns it back into NaN, as a local scorer). A scorer returning
  named columns answers ``{"columns": {name: [B float | null]}}``.
- ``POST /compare`` (served when the object has ``compare(images_a, images_b, prompts) ->
  Tensor[n]``, a pairwise judge): ``{"prompts": [n str], "images_a": [n image], "images_b":
  [n image]}`` (``videos_a`` / ``videos_b`` for a video judge) -> ``{"scores": [n float]}``,
  P(A preferred).
- Errors: ``{"error": message}`` with 400 (malformed request or image), 401 (token), 403 (a Host
  header that is not this server's, or a request from a web page: ``Origin`` header), 404, 411
  (no Content-Length), 413 (body over ``max_request_bytes``, more than ``max_batch`` images,
  videos or pairs, an image or frame over ``max_image_pixels``, a request over
  ``max_request_pixels``, a video over ``max_video_frames``, all checked before anything is
  decoded), 415 (not JSON), 500 (the scorer failed), 503 (too many connections, or no free
  request slot in time: retry later).

Batching (``batching=True``, the default): requests are decoded in their own threads, then the
ones pending together are scored in ONE scorer call (which splits it by the scorer's
``batch_size`` as usual) of at most ``max_batch`` items and ``max_request_pixels`` pixels, and
each request gets its own rows back (:mod:`mmrl.rewards.batching`). With ``batch_window_ms=0``
(the default, continuous batching) nothing waits: a lone request is scored at once, and the
requests that arrive while the model is busy go together into the next call; a window > 0
also holds a batch open that long after its oldest request. When a merged call fails, each
request is re-scored alone, so a bad request fails only itself. ``batching=False`` scores each
request alone in its own thread, one model call at a time.

Security model: the server binds to loopback unless told otherwise and refuses a non-loopback
address without a token (``Authorization: Bearer TOKEN``). Requests from browsers are refused
(Host allow-list against DNS rebinding, ``Origin`` refused, JSON content type required so a
cross-site form cannot post). Only PNG is decoded (``Image.open(formats=["PNG"])``); pixel counts
are read from the PNG header and capped before decoding. Memory is bounded: at most
``max_connections`` open connections (one thread each) and ``max_active`` requests whose bodies
are read, decoded, waiting for their batch or scored at once.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mmrl.rewards.base import Scorer, check_images, check_prompts
from mmrl.rewards.batching import Batcher, Job
from mmrl.rewards.video import VideoScorer, check_videos
from mmrl.rewards.wire import (MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, MAX_VIDEO_FRAMES,  # noqa: F401
                               PixelBudget, RequestError, decode_images, decode_videos,
                               encode_images, encode_videos, entry_bytes, open_images,
                               open_videos)

TOKEN_ENV = "MMRL_REWARD_TOKEN"
MAX_REQUEST_BYTES = 64 * 2**20
MAX_BATCH = 256  # images, videos or pairs per request; also per merged model call
MAX_CONNECTIONS = 32  # open connections, one thread each; more get 503 at once
# requests reading, decoding, waiting for their batch or scoring at once: also the most requests
# one batch can merge (8 training ranks); memory about 8 x (64 MiB body + 200 MB decoded)
MAX_ACTIVE = 8
BATCH_WINDOW_MS = 0.0  # continuous batching: no wait; what queues during a model call goes together


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_token_file(port: int) -> str:
    """Where ``mmrl reward serve`` writes the token it generates for ``port`` on this machine.

    ``$XDG_CACHE_HOME/mmrl/reward-HOSTNAME-PORT.token`` (``~/.cache`` by default); the host name
    keeps servers on different nodes apart when the home folder is shared.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mmrl", f"reward-{socket.gethostname()}-{int(port)}.token")


def write_token_file(path: str, token: str) -> None:
    """Write ``token`` to ``path`` readable by its owner only (0600; a symlink is refused)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed).

    Raises:
        ValueError: the file is empty.
    """
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty; write the shared secret into it (or "
                         f"delete it and let `mmrl reward serve --token-file` create one)")
    return token


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once; more get 503 and close."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": f"{self.max_connections} connections are open (the "
                                        f"server's max_connections); retry later"}).encode()
            try:  # answered from the accepting thread: no thread is started for it
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class RewardServer:
    """Serve one scorer or pairwise judge over HTTP (see module docstring for the protocol, the
    batching and the security model).

    Args:
        scorer: an image scorer (``scorer(images, prompts) -> Tensor[B]``), a video scorer
            (``media = "video"``: ``scorer(videos [B, F, 3, H, W], prompts, metadata)``) and/or
            a pairwise judge (``compare(images_a, images_b, prompts) -> Tensor[n]``, served on
            ``/compare``).
        host: address to bind; loopback by default. Any other address needs a ``token``.
        port: TCP port; 0 picks a free one (read it back from ``.port``).
        token: shared secret required as ``Authorization: Bearer TOKEN`` (None: no token, only
            allowed on loopback; ``mmrl reward serve`` generates one unless told ``--no-token``).
        max_request_bytes: larger bodies (by Content-Length) get 413 without being read.
        max_batch: more images, videos or pairs per request get 413; also the most items one
            merged model call takes.
        max_image_pixels: larger images or frames (by their header) get 413 before decoding.
        max_request_pixels: a request whose images (frames, pair sides) hold more pixels gets 413
            before decoding; also the most pixels one merged model call takes.
        max_video_frames: videos with more frames get 413 before decoding.
        max_connections: open connections (one thread each); more get 503 at once.
        max_active: requests whose bodies are read, decoded, waiting for their batch or scored
            at once (so also the most requests one batch merges); others wait up to
            ``queue_timeout`` seconds for a slot, then get 503. Bounds memory to about
            ``max_active * (max_request_bytes + decoded max_request_pixels)``.
        batching: merge the requests pending together into one model call (False: each request
            is scored alone in its own thread).
        batch_window_ms: how long a batch stays open after its oldest request arrived (0: no
            wait, continuous batching; > 0 trades a lone request's latency for larger batches).
        allowed_hosts: extra names accepted in the ``Host`` header. Always accepted: IP
            literals, ``localhost``, the bound host name and, on a non-loopback bind, this
            machine's host name. Any other name gets 403 (DNS rebinding).
        queue_timeout: seconds a request waits for a free slot before 503.
        log: print one line per request (off in tests).

    Raises:
        ValueError: a non-loopback host without a token, a limit below 1, a negative batch
            window, or an object with neither ``__call__`` nor ``compare``.
    """

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_batch: int = MAX_BATCH, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_request_pixels: int = MAX_REQUEST_PIXELS,
                 max_video_frames: int = MAX_VIDEO_FRAMES,
                 max_connections: int = MAX_CONNECTIONS, max_active: int = MAX_ACTIVE,
                 batching: bool = True, batch_window_ms: float = BATCH_WINDOW_MS,
                 allowed_hosts: Iterable[str] = (), queue_timeout: float = 60.0,
                 log: bool = False):
        if not is_loopback(host) and not token:
            raise ValueError(f"refusing to serve on non-loopback host {host!r} without a token; "
                             f"give one (--token-file PATH or ${TOKEN_ENV}) or bind to "
                             f"127.0.0.1")
        limits = dict(max_request_bytes=max_request_bytes, max_batch=max_batch,
                      max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
                      max_video_frames=max_video_frames, max_connections=max_connections,
                      max_active=max_active)
        bad = {k: v for k, v in limits.items() if int(v) < 1}
        if bad:
            raise ValueError(f"server limits {bad}; expected integers >= 1")
        if not float(batch_window_ms) >= 0:
            raise ValueError(f"batch_window_ms={batch_window_ms!r}; expected >= 0 (0 = no "
                             f"wait: continuous batching)")
        self.routes = tuple(r for r, ok in (("/score", callable(scorer)),
                                            ("/compare", callable(getattr(scorer, "compare",
                                                                          None)))) if ok)
        if not self.routes:
            raise ValueError(f"{type(scorer).__name__} is neither a scorer (callable) nor a "
                             f"pairwise judge (compare(images_a, images_b, prompts)); serve one")
        self.scorer, self.token, self.log = scorer, token, log
        self.media = getattr(scorer, "media", "image")
        self.max_request_bytes, self.max_batch = int(max_request_bytes), int(max_batch)
        self.max_image_pixels = int(max_image_pixels)
        self.max_request_pixels = int(max_request_pixels)
        self.max_video_frames = int(max_video_frames)
        self.max_active, self.queue_timeout = int(max_active), float(queue_timeout)
        self.batch_window_ms = float(batch_window_ms)
        self.allowed_hosts = {"localhost", host.lower(), *(h.lower() for h in allowed_hosts)}
        if not is_loopback(host):
            self.allowed_hosts.add(socket.gethostname().lower())
        self._active = threading.BoundedSemaphore(self.max_active)
        self._lock = threading.Lock()  # one model call at a time: models are not thread-safe
        self._direct = {"requests": 0, "batches": 0, "model_calls": 0, "isolated_reruns": 0}
        self.batcher = (Batcher(self.batch_window_ms / 1000.0, self.max_batch,
                                self.max_request_pixels, self._lock)
                        if batching else None)
        try:
            self.httpd = _BoundedHTTPServer((host, port), _make_handler(self),
                                            int(max_connections))
        except BaseException:
            if self.batcher is not None:
                self.batcher.stop()
            raise
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._served = False  # shutdown() blocks forever on a server that never served

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> Dict[str, int]:
        """Requests scored, batches, model calls and isolated re-runs so far."""
        return dict(self.batcher.stats if self.batcher is not None else self._direct)

    def health(self) -> Dict[str, Any]:
        s = self.scorer
        return {"name": getattr(s, "name", type(s).__name__), "scale": getattr(s, "scale", ""),
                "uses_prompts": getattr(s, "uses_prompts", True), "media": self.media,
                "routes": list(self.routes), "max_batch": self.max_batch,
                "max_request_bytes": self.max_request_bytes,
                "max_image_pixels": self.max_image_pixels,
                "max_request_pixels": self.max_request_pixels,
                "max_video_frames": self.max_video_frames,
                "batching": self.batcher is not None, "batch_window_ms": self.batch_window_ms,
                "stats": self.stats}

    def host_allowed(self, header: Optional[str]) -> bool:
        """Whether a ``Host`` header names this server (absent: an HTTP/1.0 client, allowed)."""
        if header is None:
            return True
        name = header.strip().lower()
        if name.startswith("["):  # [::1]:8765
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        name = name.rstrip(".")
        if name in self.allowed_hosts:
            return True
        try:  # an IP literal cannot be rebound to another address by a DNS answer
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def _items(self, body: Any, keys: Sequence[str], what: str) -> int:
        """The item count of a body whose media lists are ``keys``; 413 over ``max_batch``."""
        if not isinstance(body, dict):
            raise RequestError(400, f"body is a JSON {type(body).__name__}; expected an object "
                                    f"{{'prompts': [...], {', '.join(repr(k) for k in keys)}: "
                                    f"[...]}}")
        lists = [body.get(k) for k in keys]
        n = len(lists[0]) if isinstance(lists[0], list) else 0
        if n > self.max_batch:
            raise RequestError(413, f"{n} {what} exceed max_batch {self.max_batch}; send "
                                    f"smaller batches")
        if len(keys) == 2 and isinstance(lists[1], list) and len(lists[1]) != n:
            raise RequestError(400, f"{n} {keys[0]} but {len(lists[1])} {keys[1]}; send one of "
                                    f"each per pair")
        return n

    def _prompts(self, prompts: Any, n: int) -> List[str]:
        if prompts is None and not getattr(self.scorer, "uses_prompts", True):
            return [""] * n  # prompt-free scorers may be called without
        return check_prompts(prompts, n)

    def _open(self, body: dict, key: str, budget: PixelBudget):
        if self.media == "video":
            return open_videos(body.get(key), budget, self.max_video_frames, key)
        return open_images(body.get(key), budget, key)

    def score_job(self, body: Any) -> Job:
        """A ``/score`` body decoded into a :class:`Job` (all limits checked first).

        Raises:
            RequestError: a malformed or over-limit request (4xx).
            ValueError, TypeError: bad prompts or fps (answered 400).
        """
        video = self.media == "video"
        key = "videos" if video else "images"
        if isinstance(body, dict) and body.get("media", self.media) != self.media:
            raise RequestError(400, f"the request is media {body.get('media')!r} but this server "
                                    f"scores {self.media}s ({self.health()['name']}); use "
                                    f"load({('remote_video' if video else 'remote')!r}, url=...)")
        n = self._items(body, (key,), key)
        budget = PixelBudget(self.max_image_pixels, self.max_request_pixels)
        load = self._open(body, key, budget)  # headers and shapes checked, nothing decoded
        prompts = self._prompts(body.get("prompts"), n)
        x = load()
        if not video:
            return Job(self.scorer, {"images": x, "prompts": prompts}, n, budget.total,
                       ("score", _shape_key(x)))
        fps = body.get("fps")
        if fps is None:
            fps = [None] * n
        if (not isinstance(fps, list) or len(fps) != n
                or any(f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                                          or not f > 0) for f in fps)):
            raise RequestError(400, f"'fps' is {fps!r}; expected {n} positive numbers or nulls "
                                    f"(null: the scorer's fps option)")
        meta = [{} if f is None else {"fps": float(f)} for f in fps]
        return Job(self.scorer, {"videos": x, "prompts": prompts, "metadata": meta}, n,
                   budget.total, ("score", tuple(x.shape[1:])))

    def compare_job(self, body: Any) -> Job:
        """A ``/compare`` body decoded into a :class:`Job` (all limits checked first).

        Raises:
            RequestError: a malformed or over-limit request (4xx).
            ValueError, TypeError: bad prompts (answered 400).
        """
        side = "videos" if self.media == "video" else "images"
        keys = (f"{side}_a", f"{side}_b")
        n = self._items(body, keys, "pairs")
        budget = PixelBudget(self.max_image_pixels, self.max_request_pixels)
        loaders = [self._open(body, k, budget) for k in keys]  # every header before decoding
        prompts = self._prompts(body.get("prompts"), n)
        a, b = (load() for load in loaders)
        return Job(self.scorer.compare, {"images_a": a, "images_b": b, "prompts": prompts},
                   len(a), budget.total, ("compare", _shape_key(a), _shape_key(b)))

    def run(self, job: Job) -> Dict[str, Any]:
        """Score ``job`` (merged with others when batching is on); the JSON answer."""
        if self.batcher is not None:
            return answer(self.batcher.submit(job))
        with self._lock:
            for k in ("requests", "batches", "model_calls"):
                self._direct[k] += 1
            return answer(job.run())

    def score(self, body: Any) -> Dict[str, Any]:
        """The ``/score`` answer for a parsed body: ``{"scores": [...]}`` (+ ``"nonfinite"``).

        Raises:
            RequestError: a malformed or over-limit request (4xx).
            ValueError, TypeError: the scorer rejected its input (answered 400).
        """
        return self.run(self.score_job(body))

    def compare(self, body: Any) -> Dict[str, Any]:
        """The ``/compare`` answer for a parsed body: ``{"scores": [P(A preferred)]}``."""
        return self.run(self.compare_job(body))

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
        try:
            self.httpd.serve_forever(poll_interval=0.1)
        finally:
            # returned (stop() from another thread) or interrupted (Ctrl-C, even before the
            # loop began): nothing is serving, and shutdown() would wait for a loop that never
            # signals again
            self._served = False

    def stop(self):
        """Stop serving and close the socket (safe to call on a server never started)."""
        if self._served:
            self.httpd.shutdown()
        self.httpd.server_close()
        if self.batcher is not None:
            self.batcher.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _shape_key(x) -> tuple:
    """What a merged batch must share: a tensor's item shape, or the set of PIL image sizes and
    modes (a scorer may stack same-size images, so different sizes never meet in one call)."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    return ("pil", tuple(sorted({(im.size, im.mode) for im in x})))


def answer(out) -> Dict[str, Any]:
    """A scorer's output as the JSON answer: ``{"scores": [...]}`` or ``{"columns": {name:
    [...]}}``; JSON has no NaN/Infinity, so a non-finite score travels as null, its index listed
    in ``"nonfinite"`` (a list, or ``{name: list}`` for columns)."""
    def encode(t: torch.Tensor):
        values = t.tolist()
        return ([v if math.isfinite(v) else None for v in values],
                [i for i, v in enumerate(values) if not math.isfinite(v)])

    if isinstance(out, dict):
        cols = {k: encode(v) for k, v in out.items()}
        res: Dict[str, Any] = {"columns": {k: c[0] for k, c in cols.items()}}
        bad = {k: c[1] for k, c in cols.items() if c[1]}
    else:
        scores, bad = encode(out)
        res = {"scores": scores}
    if bad:
        res["nonfinite"] = bad
    return res


def _make_handler(server: RewardServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may take to send a request before it is dropped

        def _reply(self, code: int, payload: Dict[str, Any]):
            data = json.dumps(payload, allow_nan=False).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code >= 400:  # the body may be unread: never parse it as a next request
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True  # the client gave up (its timeout); it retries

        def _check(self, routes: Tuple[str, ...]):
            """Raise RequestError unless the request may reach one of ``routes``."""
            if not server.host_allowed(self.headers.get("Host")):
                raise RequestError(403, f"Host {self.headers.get('Host')!r} is not this server "
                                        f"(allowed: IP addresses, "
                                        f"{', '.join(sorted(server.allowed_hosts))}); connect "
                                        f"by IP or add the name with --allow-host")
            if self.headers.get("Origin") is not None:
                raise RequestError(403, f"requests from web pages are refused (Origin "
                                        f"{self.headers.get('Origin')!r}); call the server from "
                                        f"a program")
            if self.path not in routes:
                raise RequestError(404, f"no route {self.command} {self.path}; try "
                                        f"{' or '.join(routes)}")
            if server.token:
                got = self.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {server.token}".encode()):
                    raise RequestError(401, "missing or wrong token (send 'Authorization: "
                                            "Bearer TOKEN')")

        def do_GET(self):  # noqa: N802 (http.server's naming)
            try:
                self._check(("/health",))
            except RequestError as err:
                return self._reply(err.status, {"error": str(err)})
            self._reply(200, server.health())

        def _content_length(self) -> int:
            kind = self.headers.get_content_type()  # text/plain when the header is missing
            if kind != "application/json":
                raise RequestError(415, f"Content-Type {self.headers.get('Content-Type')!r}; "
                                        f"expected application/json")
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise RequestError(411, "no Content-Length header; send the body with its length "
                                        "(chunked bodies are not read)")
            try:
                length = int(raw)
            except ValueError:
                length = -1
            if length < 0:
                raise RequestError(400, f"bad Content-Length header {raw!r}")
            if length > server.max_request_bytes:
                raise RequestError(413, f"request of {length} bytes exceeds "
                                        f"{server.max_request_bytes}; send smaller batches "
                                        f"(remote batch_size=...)")
            return length

        def _body(self, length: int) -> Any:
            try:
                data = self.rfile.read(length)
            except OSError as err:  # the handler's 60 s socket timeout included
                raise RequestError(408, f"the body did not arrive ({err})") from None
            if len(data) < length:
                raise RequestError(400, f"body ended after {len(data)} of {length} bytes")
            try:
                return json.loads(data)
            except RecursionError:
                raise RequestError(400, "the JSON is nested too deeply; send {'prompts': [...], "
                                        "'images': [...]}") from None
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                raise RequestError(400, f"the body is not JSON ({err})") from None

        def do_POST(self):  # noqa: N802
            try:
                self._check(server.routes)
                length = self._content_length()
                # a slot is taken before the body is read: bodies and decoded pixels of at most
                # max_active requests are in memory at once
                if not server._active.acquire(timeout=server.queue_timeout):
                    raise RequestError(503, f"{server.max_active} requests are being scored and "
                                            f"none finished in {server.queue_timeout:g} s; "
                                            f"retry later")
                try:
                    body = self._body(length)
                    out = (server.score if self.path == "/score" else server.compare)(body)
                finally:
                    server._active.release()
            except RequestError as err:
                return self._reply(err.status, {"error": str(err)})
            except (ValueError, TypeError, KeyError) as err:  # the scorer rejected its input
                return self._reply(400, {"error": f"{type(err).__name__}: {err}"})
            except Exception as err:  # the scorer itself failed: report it, keep serving
                return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            self._reply(200, out)

        def log_message(self, fmt, *args):
            if server.log:
                super().log_message(fmt, *args)

    return Handler


class Connection:
    """HTTP to one reward server: the token, retries and its ``/health`` (``.info``).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        token: shared secret. When None: read from ``token_file``, else the
            ``MMRL_REWARD_TOKEN`` environment variable, else (loopback URLs) the file
            ``mmrl reward serve`` wrote for that port on this machine
            (:func:`default_token_file`), else no token.
        timeout: seconds per HTTP request.
        retries: extra attempts after a connection error, timeout or 5xx (never after 4xx:
            the request itself is wrong), with exponential backoff starting at ``backoff`` s.
        token_file: a file holding the token (e.g. the server's ``--token-file``).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, token_file: Optional[str] = None):
        if int(retries) < 0 or float(timeout) <= 0:
            raise ValueError(f"remote retries={retries!r}, timeout={timeout!r}; expected "
                             f"retries >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.token = token or self._default_token(token_file)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.info = self.request("GET", "/health")
        get = self.info.get
        self.max_batch = int(get("max_batch", MAX_BATCH))
        self.max_request_bytes = int(get("max_request_bytes", MAX_REQUEST_BYTES))
        self.max_image_pixels = int(get("max_image_pixels", MAX_IMAGE_PIXELS))
        self.max_request_pixels = int(get("max_request_pixels", MAX_REQUEST_PIXELS))
        self.max_video_frames = int(get("max_video_frames", MAX_VIDEO_FRAMES))

    def expect(self, media: str, route: str, instead: str):
        """Raise ValueError unless the server serves ``media`` on ``route``."""
        got, routes = self.info.get("media", "image"), self.info.get("routes", ["/score"])
        if got != media or route not in routes:
            what = "a pairwise judge (/compare)" if "/score" not in routes else f"{got}s"
            raise ValueError(f"reward server {self.url} serves {self.info.get('name')!r}, which "
                             f"scores {what}; {instead}")

    def _default_token(self, token_file: Optional[str]) -> Optional[str]:
        if token_file:
            return read_token_file(token_file)
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV]
        parts = urllib.parse.urlsplit(self.url)
        if parts.hostname and is_loopback(parts.hostname) and parts.port:
            path = default_token_file(parts.port)
            if os.path.isfile(path):
                return read_token_file(path)
        return None

    def request(self, method: str, route: str, body: Optional[dict] = None) -> dict:
        """The parsed JSON answer; ValueError on 4xx, ConnectionError after the retries."""
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

    def post_all(self, route: str, fields: Dict[str, list], sizes: List[int],
                 pixels: List[int], extra: Optional[dict] = None):
        """POST ``fields`` (lists of one entry per item) in runs that fit the server's byte and
        pixel limits; the scores (or columns) of all runs, NaN where the server sent null."""
        parts = []
        for lo, hi in _pack(sizes, pixels, self.max_request_bytes, self.max_request_pixels):
            body = {k: v[lo:hi] for k, v in fields.items()}
            parts.append(_parse(self.request("POST", route, {**(extra or {}), **body})))
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return torch.cat(parts)


def _parse(out: dict):
    def tensor(values):
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
    if "columns" in out:
        return {k: tensor(v) for k, v in out["columns"].items()}
    return tensor(out["scores"])


def _prompt_bytes(prompts: Sequence[str]) -> List[int]:
    return [len(json.dumps(p)) + 4 for p in prompts]


def _check_pixels(pixels: Sequence[int], limit: int, what: str):
    for i, n in enumerate(pixels):
        if n > limit:
            raise ValueError(f"{what} {i} has {n} pixels, over the server's max_image_pixels "
                             f"{limit}; resize it or raise --max-image-pixels")


def _image_pixels(images) -> List[int]:
    if isinstance(images, torch.Tensor):
        return [int(images.shape[-2]) * int(images.shape[-1])] * int(images.shape[0])
    return [im.size[0] * im.size[1] for im in images]


class RemoteScorer(Scorer):
    """An image scorer served by ``mmrl reward serve`` (see module docstring); no gradients.

    Output scale: the served scorer's (reported by its ``/health``, in ``.scale``). A score the
    server sent as ``null`` (non-finite) comes back as NaN, as the local scorer would return it.

    Args:
        url, token, timeout, retries, backoff, token_file: the connection (:class:`Connection`).
        batch_size: images per request; requests are also split to stay within the server's
            ``max_request_bytes`` and ``max_request_pixels``.

    Raises:
        ValueError: the server scores videos (use ``remote_video``) or is a judge
            (:class:`RemoteJudge`).
    """

    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 32, token_file: Optional[str] = None):
        super().__init__(batch_size, grad=False)
        self.conn = Connection(url, token, timeout, retries, backoff, token_file)
        self.conn.expect("image", "/score", "use load('remote_video', url=...) for a video "
                         "scorer, mmrl.rewards.server.RemoteJudge(url) for a judge")
        self._describe(self, self.conn)
        self.batch_size = min(self.batch_size, self.conn.max_batch)

    @staticmethod
    def _describe(client, conn: Connection):
        """Copy the served scorer's name, scale, prompt use and limits onto ``client``."""
        info = conn.info
        client.url, client.token = conn.url, conn.token
        client.timeout, client.retries, client.backoff = conn.timeout, conn.retries, conn.backoff
        client.name = info.get("name", "remote")
        client.scale = info.get("scale", "")
        client.uses_prompts = bool(info.get("uses_prompts", True))
        client.max_request_bytes = conn.max_request_bytes
        client.max_image_pixels = conn.max_image_pixels
        client.max_request_pixels = conn.max_request_pixels

    def _score(self, images, prompts):
        entries, pixels = encode_images(images), _image_pixels(images)
        _check_pixels(pixels, self.max_image_pixels, "image")
        sizes = [entry_bytes(e) + p for e, p in zip(entries, _prompt_bytes(prompts))]
        return self.conn.post_all("/score", {"prompts": list(prompts), "images": entries}, sizes,
                                  pixels)


class RemoteVideoScorer(VideoScorer):
    """A video scorer served by ``mmrl reward serve`` (``media = "video"``); no gradients.

    Videos travel as exact float32 (``frames_format="f32"``) or as 8-bit PNG frames
    (``"png"``: rounded to 1/255, several times smaller); the frame rate of each video
    (``metadata[i]["fps"]``, else ``fps``) travels with it.

    Args:
        url, token, timeout, retries, backoff, token_file: the connection (:class:`Connection`).
        batch_size: videos per request (also split to fit the server's byte and pixel limits).
        fps: the frame rate when the metadata has none (None: the server scorer's own option).
        frames_format: ``f32`` or ``png``.

    Raises:
        ValueError: the server scores images (use ``remote``) or is a judge; a bad
            ``frames_format``.
    """

    name = "remote_video"

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 8, token_file: Optional[str] = None,
                 fps: Optional[float] = None, frames_format: str = "f32"):
        if frames_format not in ("f32", "png"):
            raise ValueError(f"frames_format={frames_format!r}; expected 'f32' (exact) or "
                             f"'png' (8-bit)")
        super().__init__(batch_size, grad=False, fps=fps)
        self.conn = Connection(url, token, timeout, retries, backoff, token_file)
        self.conn.expect("video", "/score", "use load('remote', url=...) for an image scorer, "
                         "mmrl.rewards.server.RemoteJudge(url) for a judge")
        RemoteScorer._describe(self, self.conn)
        self.batch_size = min(self.batch_size, self.conn.max_batch)
        self.frames_format = frames_format

    def _score_videos(self, videos, prompts, fps):
        b, F, _, H, W = videos.shape
        if F > self.conn.max_video_frames:
            raise ValueError(f"videos of {F} frames exceed the server's max_video_frames "
                             f"{self.conn.max_video_frames}; sample fewer frames or raise "
                             f"--max-video-frames")
        _check_pixels([H * W], self.max_image_pixels, "frame")
        entries = encode_videos(videos, self.frames_format)
        sizes = [entry_bytes(e) + p + 8 for e, p in zip(entries, _prompt_bytes(prompts))]
        return self.conn.post_all("/score", {"prompts": list(prompts), "videos": entries,
                                             "fps": list(fps)}, sizes, [F * H * W] * b,
                                  extra={"media": "video"})


class RemoteJudge:
    """A pairwise judge served by ``mmrl reward serve`` (``POST /compare``):
    ``compare(images_a, images_b, prompts) -> Tensor[n]`` = P(A preferred) in [0, 1].

    For a video judge (``media = "video"``) the two sides are videos ``[n, F, 3, H, W]``.

    Args:
        url, token, timeout, retries, backoff, token_file: the connection (:class:`Connection`).
        batch_size: pairs per request (also split to fit the server's byte and pixel limits).
        frames_format: video judges: ``f32`` (exact) or ``png`` (8-bit).

    Raises:
        ValueError: the server serves no ``/compare``.
    """

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 16, token_file: Optional[str] = None,
                 frames_format: str = "f32"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
        self.conn = Connection(url, token, timeout, retries, backoff, token_file)
        self.media = self.conn.info.get("media", "image")
        self.conn.expect(self.media, "/compare", "serve a judge with compare(images_a, "
                         "images_b, prompts), or score with load('remote', url=...)")
        RemoteScorer._describe(self, self.conn)
        self.batch_size = min(batch_size, self.conn.max_batch)
        self.frames_format = frames_format

    def _side(self, x) -> Tuple[List[dict], List[int]]:
        if self.media == "video":
            v = check_videos(x, self.name)  # [n, F, 3, H, W]
            n, F, _, H, W = v.shape
            _check_pixels([H * W], self.max_image_pixels, "frame")
            return encode_videos(v, self.frames_format), [F * H * W] * n
        check_images(x, self.name)
        pixels = _image_pixels(x)
        _check_pixels(pixels, self.max_image_pixels, "image")
        return encode_images(x), pixels

    def compare(self, images_a, images_b, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        """P(A preferred) for each pair ``(images_a[i], images_b[i])`` under ``prompts[i]``.

        Raises:
            ValueError, TypeError: sides of different lengths, bad inputs or prompts; a 4xx.
            ConnectionError: the server is unreachable or failed after the retries.
        """
        n = len(images_a)
        if len(images_b) != n:
            raise ValueError(f"{n} images_a but {len(images_b)} images_b; pass one of each "
                             f"per pair")
        if prompts is None and not self.uses_prompts:
            prompts = [""] * n
        prompts = check_prompts(prompts, n)
        side = "videos" if self.media == "video" else "images"
        out = []
        for i in range(0, n, self.batch_size):
            a, pa = self._side(images_a[i:i + self.batch_size])
            b, pb = self._side(images_b[i:i + self.batch_size])
            ps = prompts[i:i + self.batch_size]
            sizes = [entry_bytes(x) + entry_bytes(y) + p
                     for x, y, p in zip(a, b, _prompt_bytes(ps))]
            out.append(self.conn.post_all("/compare", {"prompts": ps, f"{side}_a": a,
                                                       f"{side}_b": b},
                                          sizes, [x + y for x, y in zip(pa, pb)]))
        return torch.cat(out)


def _pack(sizes: Sequence[int], pixels: Sequence[int], limit: int, pixel_limit: int):
    """``[(lo, hi)]`` runs of items (``sizes`` bytes of JSON, ``pixels`` pixels each) whose
    request body stays under ``limit`` bytes and whose items hold at most ``pixel_limit``
    pixels."""
    budget = int(limit * 0.95) - 64  # room for the JSON wrapping
    runs, lo, size, px = [], 0, 0, 0
    for i, (n, n_px) in enumerate(zip(sizes, pixels)):
        if n > budget:
            raise ValueError(f"item {i} needs {n} bytes, over the server's request limit of "
                             f"{limit}; send smaller images or raise --max-request-mb")
        if i > lo and (size + n > budget or px + n_px > pixel_limit):
            runs.append((lo, i))
            lo, size, px = i, 0, 0
        size, px = size + n, px + n_px
    runs.append((lo, len(sizes)))
    return runs


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", "")
    except Exception:  # a non-JSON error body: report the status only
        return err.reason or ""
