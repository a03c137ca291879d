"""The reward server, started for real on 127.0.0.1 (ephemeral port), and the remote scorer."""
from __future__ import annotations

import json
import os
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

import mmrl.rewards as R
from mmrl.rewards.server import RewardServer, decode_images, encode_images, is_loopback

sys.path.insert(0, os.path.dirname(__file__))
from reward_testlib import make_images  # noqa: E402


class _Counting:
    """Brightness, counting the batches it sees (the server must pass batches through)."""
    name, scale, uses_prompts = "counting", "mean luma", False

    def __init__(self, fail=False):
        self.inner = R.load("brightness")
        self.calls, self.fail = [], fail

    def __call__(self, images, prompts, metadata=None):
        self.calls.append(len(images))
        if self.fail:
            raise RuntimeError("model exploded")
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


def _post(url, body, token=None):
    req = urllib.request.Request(url + "/score", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_token_size_limits_and_bad_requests(server):
    srv = server(R.load("brightness"), token="s3cret", max_request_bytes=20_000, max_batch=3)
    body = {"prompts": ["", ""], "images": encode_images(make_images(2, size=(8, 8)))}
    assert _post(srv.url, body)[0] == 401
    assert _post(srv.url, body, token="wrong")[0] == 401
    code, out = _post(srv.url, body, token="s3cret")
    assert code == 200 and len(out["scores"]) == 2
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
    assert code == 400 and "could not be decoded" in out["error"]
    code, out = _post(srv.url, {"prompts": ["", ""], "images": body["images"][:1]},
                      token="s3cret")
    assert code == 400 and "1 images but 2 prompts" in out["error"]
    with pytest.raises(ValueError, match="401.*token"):
        R.load("remote", url=srv.url, retries=0)
    ok = R.load("remote", url=srv.url, token="s3cret")
    assert ok(make_images(2, size=(8, 8)), None).shape == (2,)


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
