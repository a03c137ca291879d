"""The reward server, started for real on 127.0.0.1 (ephemeral port), and the remote scorer."""
from __future__ import annotations

import http.client
import io
import json
import math
import os
import socket
import struct
import sys
import threading
import time
import zlib
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.rewards.server import RewardServer, decode_images, encode_images, is_loopback
from mmrl.rewards.video import VideoScorer

sys.path.insert(0, os.path.dirname(__file__))
from reward_testlib import make_images  # noqa: E402


class _Counting:
    """Brightness, counting the batches it sees (the server must pass batches through)."""
    name, scale, uses_prompts = "counting", "mean luma", False

    def __init__(self, fail=False):
        self.inner = R.load("brightness")
        self.calls = []
        self.fail_with = RuntimeError("model exploded") if fail else None

    def __call__(self, images, prompts, metadata=None):
        self.calls.append(len(images))
        if self.fail_with is not None:
            raise self.fail_with
        return self.inner(images, prompts)


@pytest.fixture
def server():
    started = []

    def start(scorer, **kw):
        s = RewardServer(scorer, host="127.0.0.1", port=0, **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_remote_scores_equal_local_for_pil_and_tensor(server):
    local = R.load("brightness", target=0.3)
    srv = server(local, max_batch=4)
    assert srv.host == "127.0.0.1" and srv.port > 0
    remote = R.load("remote", url=srv.url, batch_size=3)
    assert remote.name == "brightness" and remote.uses_prompts is False
    images = make_images(7, seed=1) + [make_images(1, mode="L")[0], make_images(1, mode="RGBA")[0]]
    torch.testing.assert_close(remote(images, None), local(images, None))  # PNG is lossless
    x = torch.rand(5, 3, 9, 7)
    torch.testing.assert_close(remote(x, None), local(x, None), rtol=0, atol=0)  # f32 exact


def test_batches_respect_server_limit(server):
    scorer = _Counting()
    srv = server(scorer, max_batch=2)
    remote = R.load("remote", url=srv.url, batch_size=8)
    assert remote.batch_size == 2  # clipped to the server's max_batch from /health
    remote(make_images(5), None)
    assert scorer.calls == [2, 2, 1]


def test_requests_are_split_to_fit_the_size_limit(server):
    scorer = _Counting()
    srv = server(scorer, max_request_bytes=30_000)
    remote = R.load("remote", url=srv.url, batch_size=16)
    x = torch.rand(6, 3, 32, 32)  # 12 KiB of float32 each -> ~16 KB base64: 1 per request
    torch.testing.assert_close(remote(x, None), R.load("brightness")(x, None))
    assert scorer.calls == [1] * 6
    with pytest.raises(ValueError, match="over the server's request limit"):
        remote(torch.rand(1, 3, 64, 64), None)


def _post(url, body, token=None, route="/score"):
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_token_size_limits_and_bad_requests(server):
    srv = server(R.load("brightness"), token="s3cret", max_request_bytes=20_000, max_batch=3)
    images = make_images(2, size=(8, 8))
    want = R.load("brightness")(images, None).tolist()  # PNG is lossless: the same pixels
    assert want[0] != pytest.approx(want[1], abs=1e-6)  # two different values, in order
    body = {"prompts": ["", ""], "images": encode_images(images)}
    assert _post(srv.url, body)[0] == 401
    assert _post(srv.url, body, token="wrong")[0] == 401
    code, out = _post(srv.url, body, token="s3cret")
    assert code == 200 and out["scores"] == pytest.approx(want, rel=1e-6)
    big = {"prompts": [""], "images": encode_images(make_images(1, size=(200, 200)))}
    code, out = _post(srv.url, big, token="s3cret")
    assert code == 413 and "exceeds 20000" in out["error"]
    many = {"prompts": [""] * 4, "images": encode_images(make_images(4, size=(4, 4)))}
    assert _post(srv.url, many, token="s3cret")[0] == 413
    code, out = _post(srv.url, {"prompts": [""], "images": [{"format": "gif"}]}, token="s3cret")
    assert code == 400 and "expected all 'png' or all 'f32'" in out["error"]
    code, out = _post(srv.url, [1, 2], token="s3cret")
    assert code == 400 and "expected an object" in out["error"]
    code, out = _post(srv.url, {"prompts": [""], "images": [{"format": "png", "data": "AAAA"}]},
                      token="s3cret")
    assert code == 400 and "declared 'png' but is not a PNG" in out["error"]
    code, out = _post(srv.url, {"prompts": ["", ""], "images": body["images"][:1]},
                      token="s3cret")
    assert code == 400 and "1 images but 2 prompts" in out["error"]
    with pytest.raises(ValueError, match="401.*token"):
        R.load("remote", url=srv.url, retries=0)
    ok = R.load("remote", url=srv.url, token="s3cret")
    torch.testing.assert_close(ok(images, None), torch.tensor(want))


def test_scorer_errors_become_500_and_are_retried(server):
    scorer = _Counting(fail=True)
    srv = server(scorer)
    remote = R.load("remote", url=srv.url, retries=2, backoff=0.01)
    with pytest.raises(ConnectionError, match="after 3 attempt.*500.*model exploded"):
        remote(make_images(1), None)
    assert scorer.calls == [1, 1, 1]


def test_unreachable_server_fails_clearly_after_retries():
    srv = RewardServer(R.load("brightness"), port=0)
    url = srv.url
    srv.stop()  # nothing listens on that port any more
    with pytest.raises(ConnectionError, match="failed after 2 attempt.*mmrl reward serve"):
        R.load("remote", url=url, retries=1, backoff=0.01, timeout=2)


def test_timeout_is_enforced(server):
    gate = threading.Event()

    class Slow(_Counting):
        def __call__(self, images, prompts, metadata=None):
            gate.wait(5)
            return super().__call__(images, prompts)

    srv = server(Slow())
    remote = R.load("remote", url=srv.url, retries=0, timeout=0.3)
    with pytest.raises(ConnectionError, match="timed out"):
        remote(make_images(1), None)
    gate.set()


def test_loopback_only_without_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="non-loopback host '0.0.0.0' without a token"):
        RewardServer(R.load("brightness"), host="0.0.0.0", port=0)


def test_wire_format_round_trip():
    x = torch.rand(2, 4, 3, 5)
    torch.testing.assert_close(decode_images(encode_images(x)), x, rtol=0, atol=0)
    ims = make_images(2, size=(6, 4))
    back = decode_images(encode_images(ims))
    assert [b.tobytes() for b in back] == [i.tobytes() for i in ims]
    with pytest.raises(ValueError, match="non-empty list"):
        decode_images([])


def _raw(srv, method, path, body=b"", headers=None):
    """``(status, parsed JSON)`` for a request with exactly these headers (Host included)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _png_header(w, h):
    """A PNG whose header claims w x h RGB pixels, with no pixel data (a few dozen bytes)."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _entry(data: bytes, fmt="png"):
    import base64
    return {"format": fmt, "data": base64.b64encode(data).decode()}


def _encoded(im, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_only_png_is_decoded_from_png_entries(server):
    srv = server(R.load("brightness"))
    im = make_images(1, size=(8, 8))[0]
    for fmt in ("BMP", "TIFF", "GIF", "JPEG"):
        data = _encoded(im, fmt)
        assert Image.open(io.BytesIO(data)).format == fmt  # PIL alone would decode it
        code, out = _post(srv.url, {"prompts": [""], "images": [_entry(data)]})
        assert code == 400, (fmt, out)
        assert out["error"].startswith("image 0 is declared 'png' but is not a PNG")
        assert out["error"].endswith("send PNG bytes, no other format is decoded")
    code, out = _post(srv.url, {"prompts": [""], "images": [_entry(_encoded(im, "PNG"))]})
    assert code == 200 and out["scores"] == pytest.approx([float(R.load("brightness")([im], None))])


def test_pixel_caps_are_checked_before_decoding(server):
    srv = server(R.load("brightness"), max_request_pixels=1000)
    # 9000^2 from a header of 57 bytes: 413 (not the 400 a decode of the empty data would give)
    code, out = _post(srv.url, {"prompts": [""], "images": [_entry(_png_header(9000, 9000))]})
    assert code == 413
    assert out["error"].startswith("image 0 is 9000x9000 = 81000000 pixels, over the server's "
                                   "max_image_pixels 16777216")
    code, out = _post(srv.url, {"prompts": [""], "images": [_entry(_png_header(20000, 20000))]})
    assert code == 413 and "decompression bomb" in out["error"]  # PIL's own guard, at open
    three = encode_images(make_images(3, size=(20, 20)))  # 400 pixels each
    code, out = _post(srv.url, {"prompts": [""] * 3, "images": three})
    assert code == 413
    assert out["error"].startswith("images 0..2 hold 1200 pixels, over the server's "
                                   "max_request_pixels 1000")
    assert _post(srv.url, {"prompts": [""] * 2, "images": three[:2]})[0] == 200
    # f32: the shape is checked before its (here bogus) data is decoded
    f32 = {"format": "f32", "shape": [3, 40, 30], "data": "not base64"}
    code, out = _post(srv.url, {"prompts": [""], "images": [f32]})
    assert code == 413 and out["error"].startswith("image 0 holds 1200 pixels, over the "
                                                   "server's max_request_pixels 1000")
    # the client reads the cap from /health and splits its requests to fit it
    scorer = _Counting()
    srv2 = server(scorer, max_request_pixels=1000)
    remote = R.load("remote", url=srv2.url, batch_size=8)
    assert remote.max_request_pixels == 1000
    images = make_images(5, size=(20, 20))
    torch.testing.assert_close(remote(images, None), R.load("brightness")(images, None))
    assert scorer.calls == [2, 2, 1]


def test_malformed_inputs_are_4xx_with_the_reason(server):
    scorer = _Counting()
    srv = server(scorer)
    png = _encoded(make_images(1, size=(64, 64))[0], "PNG")
    cases = [
        ({"prompts": [""], "images": [_entry(png[: len(png) // 2])]}, 400,
         "image 0: the PNG could not be decoded (OSError: image file is truncated"),
        ({"prompts": [""], "images": [{"format": "f32", "shape": [3, 0, 0], "data": ""}]}, 400,
         "image 0 is empty (0x0 pixels)"),
        ({"prompts": [""], "images": [{"format": "f32", "shape": [3, 2, 2], "data": "AAAA"}]},
         400, "image 0 has 3 bytes of data for shape [3, 2, 2]; expected 48"),
        ({"prompts": [""], "images": [{"format": "png", "data": "%%%"}]}, 400,
         "image 0: 'data' is not valid base64"),
        ({"prompts": [""], "images": None}, 400, "'images' is NoneType; expected a non-empty"),
    ]
    for body, code, message in cases:
        got, out = _post(srv.url, body)
        assert (got, out["error"][:len(message)]) == (code, message)
    deep = b"[" * 100_000 + b"]" * 100_000
    code, out = _raw(srv, "POST", "/score", deep, {"Content-Type": "application/json"})
    assert code == 400 and out["error"].startswith("the JSON is nested too deeply")
    code, out = _raw(srv, "POST", "/score", b"{nope", {"Content-Type": "application/json"})
    assert code == 400 and out["error"].startswith("the body is not JSON")
    assert scorer.calls == []  # nothing reached the model
    # a 4xx is the request's fault: the client raises at once, no retry
    scorer.fail_with = ValueError("prompts are required")
    remote = R.load("remote", url=srv.url, retries=3, backoff=5.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="answered 400: ValueError: prompts are required"):
        remote(make_images(1), None)
    assert scorer.calls == [1] and time.monotonic() - t0 < 4


def test_nonfinite_scores_are_null_in_valid_json(server):
    srv = server(R.load("brightness"))
    x = torch.rand(3, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    body = {"prompts": [""] * 3, "images": encode_images(x)}
    req = urllib.request.Request(srv.url + "/score", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()

    def strict(name):
        raise ValueError(f"invalid JSON constant {name}")

    out = json.loads(text, parse_constant=strict)
    local = R.load("brightness")(x, None)
    assert out["nonfinite"] == [1] and out["scores"][1] is None
    assert out["scores"][0] == pytest.approx(float(local[0]))
    remote = R.load("remote", url=srv.url)
    got = remote(x, None)
    assert math.isnan(got[1]) and math.isnan(local[1])  # the remote scorer returns what local does
    torch.testing.assert_close(got, local, equal_nan=True, rtol=0, atol=0)


def test_requests_from_browsers_are_refused(server):
    srv = server(R.load("brightness"), allowed_hosts=["trainer-box"])
    image = make_images(1, size=(4, 4))
    want = [float(R.load("brightness")(image, None))]
    body = json.dumps({"prompts": [""], "images": encode_images(image)})
    port = srv.port
    json_ct = {"Content-Type": "application/json"}
    cases = [  # (method, headers, status, start of the error)
        ("POST", {"Content-Type": "text/plain"}, 415, "Content-Type 'text/plain'; expected "
                                                      "application/json"),
        ("POST", {}, 415, "Content-Type None; expected application/json"),
        ("POST", {**json_ct, "Host": f"evil.example:{port}"}, 403,
         f"Host 'evil.example:{port}' is not this server"),
        ("GET", {"Host": f"evil.example:{port}"}, 403, "Host 'evil.example"),
        ("POST", {**json_ct, "Origin": "http://evil.example"}, 403,
         "requests from web pages are refused"),
    ]
    for method, headers, status, message in cases:
        code, out = _raw(srv, method, "/score" if method == "POST" else "/health",
                         body.encode(), headers)
        assert (code, out["error"][:len(message)]) == (status, message)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "trainer-box"):
        code, out = _raw(srv, "POST", "/score", body.encode(), {**json_ct, "Host": host})
        assert code == 200 and out["scores"] == pytest.approx(want, rel=1e-6), host
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and "no Content-Length" in json.loads(resp.read())["error"]
    conn.close()


def test_connections_and_active_requests_are_bounded(server):
    gate, entered = threading.Event(), threading.Event()

    class Gated(_Counting):
        def __call__(self, images, prompts, metadata=None):
            entered.set()
            gate.wait(10)
            return super().__call__(images, prompts)

    srv = server(Gated(), max_connections=2, max_active=1, queue_timeout=0.3)
    # accepted in order, each holds a connection slot (and a thread) while sending nothing
    idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(2)]
    try:
        extra = socket.create_connection((srv.host, srv.port), timeout=10)
        reply = extra.recv(4096).decode()
        extra.close()
        assert reply.startswith("HTTP/1.1 503") and "2 connections are open" in reply
    finally:
        for s in idle:
            s.close()
    for _ in range(100):  # the idle connections' threads see EOF and free their slots
        try:
            with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
                if r.status == 200:
                    break
        except urllib.error.HTTPError as e:
            assert e.code == 503
        time.sleep(0.05)
    body = {"prompts": [""], "images": encode_images(make_images(1, size=(4, 4)))}
    first = []
    t = threading.Thread(target=lambda: first.append(_post(srv.url, body)))
    t.start()
    try:
        assert entered.wait(10)
        code, out = _post(srv.url, body)  # the only active slot is busy scoring
        assert code == 503 and out["error"].startswith("1 requests are being scored")
    finally:
        gate.set()
        t.join(10)
    assert first[0][0] == 200


# --- batching, videos, pairwise judges -------------------------------------------------------

def _concurrently(fns):
    """Run the callables at once (one thread each); their results in order."""
    out, gate = [None] * len(fns), threading.Barrier(len(fns))

    def run(i):
        gate.wait(10)
        try:
            out[i] = fns[i]()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            out[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_concurrent_requests_are_merged_and_rows_go_back_to_their_request(server):
    scorer = _Counting()
    # 6 clients x 2 f32 images, and 3 x 4 PIL images, each fill max_batch = 12: a batch closes as
    # soon as its requests are in (the long window only matters on a very slow machine)
    srv = server(scorer, max_batch=12, max_active=9, batch_window_ms=5000)
    xs = [torch.rand(2, 3, 6, 5) for _ in range(6)]
    pil = [make_images(4, size=(5, 4), seed=k) for k in range(3)]  # another key: own batch
    bodies = ([{"prompts": [""] * 2, "images": encode_images(x)} for x in xs]
              + [{"prompts": [""] * 4, "images": encode_images(p)} for p in pil])
    got = _concurrently([lambda b=b: _post(srv.url, b) for b in bodies])
    local = R.load("brightness")
    for (code, out), images in zip(got, xs + pil):
        assert code == 200  # each request gets exactly its own rows back
        torch.testing.assert_close(torch.tensor(out["scores"]), local(images, None))
    assert scorer.calls == [12, 12]  # 9 requests, 2 model calls
    stats = R.load("remote", url=srv.url).conn.info["stats"]
    assert stats == {"requests": 9, "batches": 2, "model_calls": 2, "isolated_reruns": 0}


def test_a_failing_request_fails_alone_in_its_batch(server):
    class Picky(_Counting):
        def __call__(self, images, prompts, metadata=None):
            self.calls.append(len(images))
            if "bad" in prompts:
                raise ValueError("prompt 'bad' is not allowed")
            if "boom" in prompts:
                raise RuntimeError("CUDA out of memory")
            return self.inner(images, prompts)

    scorer = Picky()
    srv = server(scorer, max_batch=4, batch_window_ms=1000)
    xs = [torch.rand(1, 3, 4, 4) for _ in range(4)]
    prompts = ["ok", "bad", "ok", "boom"]
    got = _concurrently([lambda x=x, p=p: _post(srv.url, {"prompts": [p], "images":
                                                        encode_images(x)})
                         for x, p in zip(xs, prompts)])
    local = R.load("brightness")
    for (code, out), x, p in zip(got, xs, prompts):
        if p == "ok":
            assert code == 200 and out["scores"] == pytest.approx(local(x, None).tolist())
    assert [c for c, _ in got] == [200, 400, 200, 500]
    assert got[1][1]["error"] == "ValueError: prompt 'bad' is not allowed"
    assert got[3][1]["error"] == "RuntimeError: CUDA out of memory"
    assert scorer.calls == [4, 1, 1, 1, 1]  # the merged call failed: each re-run alone
    assert srv.stats["isolated_reruns"] == 4


class _Gated(_Counting):
    """Counts its calls; the first one blocks until ``gate`` is set."""

    def __init__(self):
        super().__init__()
        import threading
        self.gate, self.entered = threading.Event(), threading.Event()

    def __call__(self, images, prompts=None, metadata=None):
        if not self.calls:
            self.entered.set()
            self.gate.wait(30)
        return super().__call__(images, prompts, metadata)


def test_continuous_batching_merges_what_queued_while_the_model_was_busy(server):
    """The default (batch_window_ms=0): a lone request goes at once (alone), and the requests
    that arrive during its model call go together into the next call."""
    import threading
    scorer = _Gated()
    srv = server(scorer, max_active=8)
    assert srv.health()["batching"] is True and srv.batch_window_ms == 0
    xs = [torch.rand(k, 3, 4, 4) for k in (1, 2, 3, 1)]
    got = [None] * 4

    def post(i):
        got[i] = _post(srv.url, {"prompts": [""] * len(xs[i]), "images": encode_images(xs[i])})
    first = threading.Thread(target=post, args=(0,))
    first.start()
    assert scorer.entered.wait(30)  # request 0 is in its model call, alone
    rest = [threading.Thread(target=post, args=(i,)) for i in (1, 2, 3)]
    for t in rest:
        t.start()
    for _ in range(3000):  # until the three wait in the batcher's queue
        if len(srv.batcher._queue) == 3:
            break
        threading.Event().wait(0.01)
    scorer.gate.set()
    for t in [first, *rest]:
        t.join(30)
    assert scorer.calls == [1, 6]  # 2 + 3 + 1 images in one call
    for (code, out), x in zip(got, xs):
        assert code == 200 and out["scores"] == pytest.approx(R.load("brightness")(x, None)
                                                              .tolist())


def test_batching_off_scores_each_request_alone(server):
    scorer = _Counting()
    srv = server(scorer, batching=False)
    assert srv.batcher is None and srv.health()["batching"] is False
    xs = [torch.rand(k, 3, 4, 4) for k in (1, 2, 3)]
    got = _concurrently([lambda x=x: _post(srv.url, {"prompts": [""] * len(x),
                                                     "images": encode_images(x)}) for x in xs])
    for (code, out), x in zip(got, xs):
        assert code == 200 and out["scores"] == pytest.approx(R.load("brightness")(x, None)
                                                              .tolist())
    assert sorted(scorer.calls) == [1, 2, 3]
    assert srv.stats == {"requests": 3, "batches": 3, "model_calls": 3, "isolated_reruns": 0}
    with pytest.raises(ValueError, match="batch_window_ms=-1; expected >= 0"):
        RewardServer(scorer, batch_window_ms=-1)


class _MeanVideo(VideoScorer):
    """Mean pixel of each video plus its fps (0 when unknown); counts its calls. With
    ``columns``: ``{"mean", "first"}`` (the mean and the first frame's mean)."""
    name, scale, uses_prompts = "mean_video", "mean + fps", False

    def __init__(self, columns=False):
        super().__init__(batch_size=4)
        self.calls, self.columns = [], columns

    def _score_videos(self, videos, prompts, fps):
        self.calls.append(len(videos))
        mean = videos.mean(dim=(1, 2, 3, 4)) + torch.tensor([f or 0.0 for f in fps])
        if self.columns:
            return {"mean": mean, "first": videos[:, 0].mean(dim=(1, 2, 3))}
        return mean


def test_video_requests_round_trip_and_respect_limits(server):
    scorer = _MeanVideo()
    srv = server(scorer, token="t", max_video_frames=4, max_request_pixels=300,
                 batching=False)
    remote = R.load("remote_video", url=srv.url, token="t", fps=2.0)
    assert isinstance(remote, VideoScorer) and remote.media == "video"
    assert remote.name == "mean_video" and srv.health()["media"] == "video"
    v = torch.rand(3, 4, 3, 8, 8)  # 256 frame pixels per video: one video per request
    meta = [{"fps": 8.0}, {}, {"fps": 24}]
    want = v.mean(dim=(1, 2, 3, 4)) + torch.tensor([8.0, 2.0, 24.0])
    torch.testing.assert_close(remote(v, None, meta), want, rtol=0, atol=0)  # f32: exact
    assert scorer.calls == [1, 1, 1]  # split to fit max_request_pixels
    png = R.load("remote_video", url=srv.url, token="t", frames_format="png")
    torch.testing.assert_close(png(v, None), v.mean(dim=(1, 2, 3, 4)), rtol=0, atol=0.5 / 255)
    with pytest.raises(ValueError, match="5 frames exceed the server's max_video_frames 4"):
        remote(torch.rand(1, 5, 3, 2, 2), None)
    with pytest.raises(ValueError, match="serves 'mean_video', which scores videos; use "
                                         "load\\('remote_video'"):
        R.load("remote", url=srv.url, token="t")
    from mmrl.rewards.wire import encode_videos
    one = encode_videos(torch.rand(1, 2, 3, 4, 4), "png")
    body = {"media": "video", "prompts": [""], "videos": one}
    assert _post(srv.url, body)[0] == 401
    assert _post(srv.url, body, token="t")[0] == 200
    cases = [
        ({**body, "videos": encode_videos(torch.rand(1, 5, 3, 2, 2))}, 413,
         "video 0 has 5 frames, over the server's max_video_frames 4"),
        ({**body, "videos": [{"format": "png",
                              "frames": [_entry(_png_header(9, 9))["data"]] * 4}]}, 413,
         "video 0 holds 324 pixels, over the server's max_request_pixels 300"),
        ({**body, "videos": one + encode_videos(torch.rand(1, 2, 3, 4, 5), "png")}, 400,
         "png videos have different (frames, width, height)"),
        ({**body, "videos": [{"format": "png", "frames": [_entry(_encoded(
            make_images(1, size=(4, 4))[0], "BMP"))["data"]]}]}, 400,
         "video 0 frame 0 is declared 'png' but is not a PNG"),
        ({**body, "fps": [-1]}, 400, "'fps' is [-1]; expected 1 positive numbers or nulls"),
        ({**body, "media": "image"}, 400, "the request is media 'image' but this server scores "
                                          "videos"),
    ]
    for b, code, message in cases:
        got, out = _post(srv.url, b, token="t")
        assert (got, out["error"][:len(message)]) == (code, message)
    # named columns travel as {"columns": {name: [...]}}; batching on, from the CLI flags
    from mmrl.cli.app import build_parser
    from mmrl.rewards.cli import build_server
    args = build_parser().parse_args(["reward", "serve", "flicker", "--port", "0", "--quiet",
                                      "--no-token", "--batch-window-ms", "2",
                                      "--max-video-frames", "3"])
    cli_srv, _, _ = build_server(args)
    assert (cli_srv.batch_window_ms, cli_srv.max_video_frames) == (2.0, 3)
    cli_srv.stop()
    cols = server(_MeanVideo(columns=True), batch_window_ms=2)
    got = R.load("remote_video", url=cols.url)(v, None)
    assert sorted(got) == ["first", "mean"]
    torch.testing.assert_close(got["first"], v[:, 0].mean(dim=(1, 2, 3)), rtol=0, atol=0)


class _FakePairJudge:
    """P(A preferred) = sigmoid(10 (mean(A) - mean(B))), one call per batch (a ``vlm_pair``
    stand-in: ``compare``, ``name``, ``media``)."""
    name, media, scale, uses_prompts = "fake_pair", "image", "P(A preferred)", True

    def __init__(self):
        self.calls = []

    @staticmethod
    def _means(x):
        if isinstance(x, torch.Tensor):
            return x.mean(dim=(1, 2, 3))
        return torch.tensor([float(torch.tensor(list(im.convert("L").getdata())).float().mean())
                             / 255 for im in x])

    def compare(self, images_a, images_b, prompts):
        self.calls.append(len(prompts))
        if "bad" in prompts:
            raise ValueError("no judgement for 'bad'")
        return torch.sigmoid(10 * (self._means(images_a) - self._means(images_b)))


def test_compare_requests_round_trip_merge_and_respect_limits(server):
    from mmrl.rewards.server import RemoteJudge
    judge = _FakePairJudge()
    srv = server(judge, token="t", max_batch=6, max_request_pixels=2 * 6 * 8 * 8,
                 batching=False)
    assert srv.routes == ("/compare",)
    remote = RemoteJudge(srv.url, token="t", batch_size=3)
    assert (remote.name, remote.media) == ("fake_pair", "image")
    a, b = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    prompts = [f"p{i}" for i in range(5)]
    torch.testing.assert_close(remote.compare(a, b, prompts), judge.compare(a, b, prompts))
    pa, pb = make_images(2, size=(6, 6), seed=3), make_images(2, size=(7, 5), seed=4)
    torch.testing.assert_close(remote.compare(pa, pb, ["x", "y"]),
                               judge.compare(pa, pb, ["x", "y"]))
    # batching on: three clients x 2 pairs fill max_batch = 6, one merged compare call, and
    # the request with "bad" fails alone
    merging = _FakePairJudge()
    srv2 = server(merging, token="t", max_batch=6, batch_window_ms=5000)
    remote2 = RemoteJudge(srv2.url, token="t", retries=0)
    sides = [(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)) for _ in range(3)]
    asks = [["a", "b"], ["c", "bad"], ["e", "f"]]
    got = _concurrently([lambda s=s, p=p: remote2.compare(s[0], s[1], p)
                         for s, p in zip(sides, asks)])
    for res, (x, y), p in zip(got, sides, asks):
        if "bad" in p:
            assert isinstance(res, ValueError) and "400: ValueError: no judgement" in str(res)
        else:
            torch.testing.assert_close(res, judge.compare(x, y, p))
    assert merging.calls == [6, 2, 2, 2]  # merged, failed, then each request alone
    body = {"prompts": ["p"], "images_a": encode_images(a[:1]), "images_b": encode_images(b[:1])}
    assert _post(srv.url, body, route="/compare")[0] == 401
    code, out = _post(srv.url, body, token="t")
    assert code == 404 and "try /compare" in out["error"]  # a judge has no /score
    code, out = _post(srv.url, body, token="t", route="/compare")
    assert code == 200
    assert out["scores"] == pytest.approx(judge.compare(a[:1], b[:1], ["p"]).tolist())
    big = torch.rand(4, 3, 12, 12)  # 576 pixels per side: over 768 at the second image of b
    cases = [
        ({**body, "images_b": encode_images(b[:2])}, 400, "1 images_a but 2 images_b"),
        ({"prompts": [""] * 7, "images_a": encode_images(torch.rand(7, 3, 1, 1)),
          "images_b": encode_images(torch.rand(7, 3, 1, 1))}, 413, "7 pairs exceed max_batch 6"),
        ({"prompts": [""] * 4, "images_a": encode_images(big), "images_b": encode_images(big)},
         413, "images_b[0..1] hold 864 pixels, over the server's max_request_pixels 768"),
        ({**body, "images_a": [_entry(_png_header(9000, 9000))]}, 413,
         "images_a[0] is 9000x9000 = 81000000 pixels"),
    ]
    for b_, code, message in cases:
        got, out = _post(srv.url, b_, token="t", route="/compare")
        assert (got, out["error"][:len(message)]) == (code, message)
    with pytest.raises(ValueError, match="scores a pairwise judge"):
        R.load("remote", url=srv.url, token="t")
