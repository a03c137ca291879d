"""A reward server for scorers whose dependencies clash with training, and the ``remote`` scorer.

Run the scorer in its own environment (``mmrl reward serve imagereward --port 8765``) and score
from training with ``load("remote", url="http://127.0.0.1:8765")``.

Wire format (JSON over HTTP, stdlib only):

- ``GET /health`` -> ``{"name", "scale", "uses_prompts", "max_batch", "max_request_bytes",
  "max_image_pixels", "max_request_pixels"}``.
- ``POST /score`` (``Content-Type: application/json``) with ``{"prompts": [B str], "images":
  [B image]}`` where an image is ``{"format": "png", "data": base64 PNG}`` (PIL inputs; lossless for
  8-bit images) or ``{"format": "f32", "shape": [C, H, W], "data": base64 little-endian float32}``
  (tensor inputs, sent exactly). -> ``{"scores": [B float]}``; a non-finite score is ``null`` and
  its index is listed in ``"nonfinite"`` (the client turns it back into NaN, as a local scorer).
- Errors: ``{"error": message}`` with 400 (malformed request or image), 401 (token), 403 (a Host
  header that is not this server's, or a request from a web page: ``Origin`` header), 404, 411
  (no Content-Length), 413 (body over ``max_request_bytes``, more than ``max_batch`` images, an
  image over ``max_image_pixels`` or a request over ``max_request_pixels``, all checked before
  anything is decoded), 415 (not JSON), 500 (the scorer failed), 503 (too many connections, or no
  free request slot in time: retry later).

Security model: the server binds to loopback unless told otherwise and refuses a non-loopback
address without a token (``Authorization: Bearer TOKEN``). Requests from browsers are refused
(Host allow-list against DNS rebinding, ``Origin`` refused, JSON content type required so a
cross-site form cannot post). Only PNG is decoded (``Image.open(formats=["PNG"])``); pixel counts
are read from the PNG header and capped before decoding. Memory is bounded: at most
``max_connections`` open connections (one thread each) and ``max_active`` requests whose bodies
are read, decoded and scored at once.
"""
from __future__ import annotations

import base64
import hmac
import io
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
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmrl.rewards.base import Scorer

TOKEN_ENV = "MMRL_REWARD_TOKEN"
MAX_REQUEST_BYTES = 64 * 2**20
MAX_BATCH = 256
# 16.8 Mpx (4096^2) per image and 64 Mpx per request (64 images of 1024^2): decoded RGB that is
# 50 MB per image and 200 MB per request, where a 9000^2 PNG of 97 KiB would otherwise cost 243 MB.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 64 * 2**20
MAX_CONNECTIONS = 32  # open connections, one thread each; more get 503 at once
MAX_ACTIVE = 2  # requests reading, decoding or scoring at once: one decodes while one scores


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code (4xx/503), the text the reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


def decode_images(entries: List[Dict[str, Any]], max_image_pixels: int = MAX_IMAGE_PIXELS,
                  max_request_pixels: int = MAX_REQUEST_PIXELS):
    """Inverse of :func:`encode_images`: a PIL list or a ``[B, C, H, W]`` float tensor.

    Pixel counts are checked from the PNG headers (or the f32 shapes) before anything is decoded;
    only PNG is decoded from a ``png`` entry, whatever else PIL could read.

    Raises:
        RequestError: 400 for a malformed entry, an undecodable or empty image; 413 for an image
            over ``max_image_pixels`` or a batch over ``max_request_pixels``.
    """
    if not isinstance(entries, list) or not entries:
        raise RequestError(400, f"'images' is {type(entries).__name__}; expected a non-empty list "
                                f"of {{'format': 'png' | 'f32', 'data': base64, ...}} entries")
    formats = {e.get("format") if isinstance(e, dict) else None for e in entries}
    if formats == {"png"}:
        return _decode_png(entries, max_image_pixels, max_request_pixels)
    if formats == {"f32"}:
        return _decode_f32(entries, max_image_pixels, max_request_pixels)
    raise RequestError(400, f"image formats {sorted(map(str, formats))}; expected all 'png' or "
                            f"all 'f32'")


def _b64(entry: Dict[str, Any], i: int) -> bytes:
    try:
        return base64.b64decode(entry["data"], validate=True)
    except KeyError:
        raise RequestError(400, f"image {i} has no 'data'; expected base64 bytes") from None
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"image {i}: 'data' is not valid base64 ({err})") from None


def _check_pixels(i: int, w: int, h: int, total: int, max_image: int, max_request: int):
    if w < 1 or h < 1:
        raise RequestError(400, f"image {i} is empty ({w}x{h} pixels); send at least 1x1")
    if w * h > max_image:
        raise RequestError(413, f"image {i} is {w}x{h} = {w * h} pixels, over the server's "
                                f"max_image_pixels {max_image}; resize it (or raise "
                                f"--max-image-pixels)")
    if total > max_request:
        which = f"images 0..{i} hold" if i else "image 0 holds"
        raise RequestError(413, f"{which} {total} pixels, over the server's "
                                f"max_request_pixels {max_request}; send fewer images per "
                                f"request (or raise --max-request-pixels)")


def _decode_png(entries, max_image: int, max_request: int) -> List[Image.Image]:
    opened, total = [], 0
    for i, e in enumerate(entries):
        data = _b64(e, i)
        try:  # lazy: reads the header only
            im = Image.open(io.BytesIO(data), formats=["PNG"])
        except UnidentifiedImageError:
            raise RequestError(400, f"image {i} is declared 'png' but is not a PNG (starts with "
                                    f"{data[:8]!r}); send PNG bytes, no other format is "
                                    f"decoded") from None
        except Image.DecompressionBombError as err:
            raise RequestError(413, f"image {i}: {err}") from None
        w, h = im.size
        total += w * h
        _check_pixels(i, w, h, total, max_image, max_request)
        opened.append(im)
    for i, im in enumerate(opened):
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
            # PIL's decoders raise all of these on corrupt or truncated data
            raise RequestError(400, f"image {i}: the PNG could not be decoded ({type(err).__name__}"
                                    f": {err}); send complete PNG files") from None
    return opened


def _decode_f32(entries, max_image: int, max_request: int) -> torch.Tensor:
    shapes = set()
    for i, e in enumerate(entries):
        s = e.get("shape")
        if (not isinstance(s, list) or len(s) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in s)):
            raise RequestError(400, f"image {i} has shape {s!r}; expected [C, H, W] integers")
        shapes.add(tuple(s))
    if len(shapes) != 1:
        raise RequestError(400, f"f32 images have different shapes {sorted(shapes)}; send one "
                                f"shape per request")
    c, h, w = shape = shapes.pop()
    if c < 1:
        raise RequestError(400, f"f32 shape {list(shape)} has {c} channels; expected 1, 3 or 4")
    for i in range(len(entries)):  # all before any base64 is decoded
        _check_pixels(i, w, h, (i + 1) * h * w, max_image, max_request)
    arrs = []
    for i, e in enumerate(entries):
        raw = _b64(e, i)
        if len(raw) != 4 * c * h * w:
            raise RequestError(400, f"image {i} has {len(raw)} bytes of data for shape "
                                    f"{list(shape)}; expected {4 * c * h * w} (float32)")
        arrs.append(np.frombuffer(raw, dtype="<f4").reshape(shape))
    return torch.from_numpy(np.stack(arrs))  # np.stack copies: the tensor owns writable memory


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
    """Serve one scorer over HTTP (see module docstring for the protocol and security model).

    Args:
        scorer: any scorer (``scorer(images, prompts) -> Tensor[B]``).
        host: address to bind; loopback by default. Any other address needs a ``token``.
        port: TCP port; 0 picks a free one (read it back from ``.port``).
        token: shared secret required as ``Authorization: Bearer TOKEN`` (None: no token, only
            allowed on loopback; ``mmrl reward serve`` generates one unless told ``--no-token``).
        max_request_bytes: larger bodies (by Content-Length) get 413 without being read.
        max_batch: more images per request get 413.
        max_image_pixels: larger images (by their header) get 413 before decoding.
        max_request_pixels: a request whose images hold more pixels gets 413 before decoding.
        max_connections: open connections (one thread each); more get 503 at once.
        max_active: requests whose bodies are read, decoded and scored at once; others wait up
            to ``queue_timeout`` seconds for a slot, then get 503. Bounds memory to about
            ``max_active * (max_request_bytes + decoded max_request_pixels)``.
        allowed_hosts: extra names accepted in the ``Host`` header. Always accepted: IP
            literals, ``localhost``, the bound host name and, on a non-loopback bind, this
            machine's host name. Any other name gets 403 (DNS rebinding).
        queue_timeout: seconds a request waits for a free slot before 503.
        log: print one line per request (off in tests).

    Raises:
        ValueError: a non-loopback host without a token, or a limit below 1.
    """

    def __init__(self, scorer, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_batch: int = MAX_BATCH, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_request_pixels: int = MAX_REQUEST_PIXELS,
                 max_connections: int = MAX_CONNECTIONS, max_active: int = MAX_ACTIVE,
                 allowed_hosts: Iterable[str] = (), queue_timeout: float = 60.0,
                 log: bool = False):
        if not is_loopback(host) and not token:
            raise ValueError(f"refusing to serve on non-loopback host {host!r} without a token; "
                             f"give one (--token-file PATH or ${TOKEN_ENV}) or bind to "
                             f"127.0.0.1")
        limits = dict(max_request_bytes=max_request_bytes, max_batch=max_batch,
                      max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
                      max_connections=max_connections, max_active=max_active)
        bad = {k: v for k, v in limits.items() if int(v) < 1}
        if bad:
            raise ValueError(f"server limits {bad}; expected integers >= 1")
        self.scorer, self.token, self.log = scorer, token, log
        self.max_request_bytes, self.max_batch = int(max_request_bytes), int(max_batch)
        self.max_image_pixels = int(max_image_pixels)
        self.max_request_pixels = int(max_request_pixels)
        self.max_active, self.queue_timeout = int(max_active), float(queue_timeout)
        self.allowed_hosts = {"localhost", host.lower(), *(h.lower() for h in allowed_hosts)}
        if not is_loopback(host):
            self.allowed_hosts.add(socket.gethostname().lower())
        self._active = threading.BoundedSemaphore(self.max_active)
        self._lock = threading.Lock()  # one model call at a time: models are not thread-safe
        self.httpd = _BoundedHTTPServer((host, port), _make_handler(self), int(max_connections))
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._served = False  # shutdown() blocks forever on a server that never served

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def health(self) -> Dict[str, Any]:
        s = self.scorer
        return {"name": getattr(s, "name", type(s).__name__), "scale": getattr(s, "scale", ""),
                "uses_prompts": getattr(s, "uses_prompts", True), "max_batch": self.max_batch,
                "max_request_bytes": self.max_request_bytes,
                "max_image_pixels": self.max_image_pixels,
                "max_request_pixels": self.max_request_pixels}

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

    def score(self, body: Any) -> Dict[str, Any]:
        """The ``/score`` answer for a parsed body: ``{"scores": [...]}`` (+ ``"nonfinite"``).

        Raises:
            RequestError: a malformed or over-limit request (4xx).
            ValueError, TypeError: the scorer rejected its input (answered 400).
        """
        if not isinstance(body, dict):
            raise RequestError(400, f"body is a JSON {type(body).__name__}; expected an object "
                                    f"{{'prompts': [...], 'images': [...]}}")
        entries = body.get("images")
        if isinstance(entries, list) and len(entries) > self.max_batch:
            raise RequestError(413, f"{len(entries)} images exceed max_batch {self.max_batch}; "
                                    f"send smaller batches")
        images = decode_images(entries, self.max_image_pixels, self.max_request_pixels)
        with self._lock:
            values = self.scorer(images, body.get("prompts")).detach().cpu().tolist()
        # JSON has no NaN/Infinity: a non-finite score travels as null, its index listed
        out = {"scores": [v if math.isfinite(v) else None for v in values]}
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            out["nonfinite"] = bad
        return out

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
        if self._thread is not None:
            self._thread.join(timeout=10)


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

        def _check(self, route: str):
            """Raise RequestError unless the request may reach ``route``."""
            if not server.host_allowed(self.headers.get("Host")):
                raise RequestError(403, f"Host {self.headers.get('Host')!r} is not this server "
                                        f"(allowed: IP addresses, "
                                        f"{', '.join(sorted(server.allowed_hosts))}); connect "
                                        f"by IP or add the name with --allow-host")
            if self.headers.get("Origin") is not None:
                raise RequestError(403, f"requests from web pages are refused (Origin "
                                        f"{self.headers.get('Origin')!r}); call the server from "
                                        f"a program")
            if self.path != route:
                raise RequestError(404, f"no route {self.command} {self.path}; try {route}")
            if server.token:
                got = self.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {server.token}".encode()):
                    raise RequestError(401, "missing or wrong token (send 'Authorization: "
                                            "Bearer TOKEN')")

        def do_GET(self):  # noqa: N802 (http.server's naming)
            try:
                self._check("/health")
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
                self._check("/score")
                length = self._content_length()
                # a slot is taken before the body is read: bodies and decoded pixels of at most
                # max_active requests are in memory at once
                if not server._active.acquire(timeout=server.queue_timeout):
                    raise RequestError(503, f"{server.max_active} requests are being scored and "
                                            f"none finished in {server.queue_timeout:g} s; "
                                            f"retry later")
                try:
                    out = server.score(self._body(length))
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


class RemoteScorer(Scorer):
    """A scorer served by ``mmrl reward serve`` (see module docstring); no gradients.

    Output scale: the served scorer's (reported by its ``/health``, in ``.scale``). A score the
    server sent as ``null`` (non-finite) comes back as NaN, as the local scorer would return it.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        token: shared secret. When None: read from ``token_file``, else the
            ``MMRL_REWARD_TOKEN`` environment variable, else (loopback URLs) the file
            ``mmrl reward serve`` wrote for that port on this machine
            (:func:`default_token_file`), else no token.
        timeout: seconds per HTTP request.
        retries: extra attempts after a connection error, timeout or 5xx (never after 4xx:
            the request itself is wrong), with exponential backoff starting at ``backoff`` s.
        batch_size: images per request; requests are also split to stay within the server's
            ``max_request_bytes`` and ``max_request_pixels``.
        token_file: a file holding the token (e.g. the server's ``--token-file``).
    """

    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 32, token_file: Optional[str] = None):
        if int(retries) < 0 or float(timeout) <= 0:
            raise ValueError(f"remote retries={retries!r}, timeout={timeout!r}; expected "
                             f"retries >= 0 and timeout > 0")
        super().__init__(batch_size, grad=False)
        self.url = url.rstrip("/")
        self.token = token or self._default_token(token_file)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        info = self._request("GET", "/health")
        self.name = info.get("name", "remote")
        self.scale = info.get("scale", "")
        self.uses_prompts = bool(info.get("uses_prompts", True))
        self.batch_size = min(self.batch_size, int(info.get("max_batch", self.batch_size)))
        self.max_request_bytes = int(info.get("max_request_bytes", MAX_REQUEST_BYTES))
        self.max_image_pixels = int(info.get("max_image_pixels", MAX_IMAGE_PIXELS))
        self.max_request_pixels = int(info.get("max_request_pixels", MAX_REQUEST_PIXELS))

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
        if isinstance(images, torch.Tensor):
            pixels = [int(images.shape[-2]) * int(images.shape[-1])] * len(entries)
        else:
            pixels = [im.size[0] * im.size[1] for im in images]
        for i, n in enumerate(pixels):
            if n > self.max_image_pixels:
                raise ValueError(f"image {i} has {n} pixels, over the server's max_image_pixels "
                                 f"{self.max_image_pixels}; resize it or raise "
                                 f"--max-image-pixels")
        for lo, hi in _pack(entries, prompts, pixels, self.max_request_bytes,
                            self.max_request_pixels):
            out = self._request("POST", "/score", {"prompts": prompts[lo:hi],
                                                   "images": entries[lo:hi]})
            scores += [math.nan if v is None else v for v in out["scores"]]
        return torch.tensor(scores, dtype=torch.float32)


def _pack(entries, prompts, pixels, limit: int, pixel_limit: int):
    """``[(lo, hi)]`` runs of entries whose JSON body stays under ``limit`` bytes and whose
    images hold at most ``pixel_limit`` pixels."""
    budget = int(limit * 0.95) - 64  # room for the JSON wrapping
    runs, lo, size, px = [], 0, 0, 0
    for i, (e, p, n_px) in enumerate(zip(entries, prompts, pixels)):
        n = len(e["data"]) + len(p.encode()) * 2 + 64
        if n > budget:
            raise ValueError(f"image {i} needs {n} bytes, over the server's request limit of "
                             f"{limit}; send smaller images or raise --max-request-mb")
        if i > lo and (size + n > budget or px + n_px > pixel_limit):
            runs.append((lo, i))
            lo, size, px = i, 0, 0
        size, px = size + n, px + n_px
    runs.append((lo, len(entries)))
    return runs


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", "")
    except Exception:  # a non-JSON error body: report the status only
        return err.reason or ""
