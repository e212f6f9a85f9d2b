"""Weights that fetch themselves: a real HTTP server on 127.0.0.1 serving ../shared/data/weights."""

from __future__ import annotations

import errno
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from retinaface_jax.weights import download as dl
from retinaface_jax.weights.download import WeightsError, resolve_weights

MNET = dl.OFFICIAL["mobilenet0.25"]


class _Server:
    """Serves files by release name; ``mode`` = ok | corrupt | truncated | short | missing."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.mode, self.requests = files, "ok", []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                name = self.path.rsplit("/", 1)[-1]
                if outer.mode == "missing" or name not in outer.files:
                    self.send_error(404, "Not Found")
                    return
                data = outer.files[name].read_bytes()
                declared = len(data)
                if outer.mode == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                elif outer.mode == "truncated":
                    data = data[: len(data) // 2]  # connection drops mid-transfer
                elif outer.mode == "short":
                    data = data[: len(data) // 2]
                    declared = len(data)  # a consistent but too short response
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if outer.mode == "truncated":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/xinntao/v0.1.0/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(shared, tmp_path):
    standin = tmp_path / "standin_resnet50.pth"
    standin.write_bytes(hashlib.sha256(b"stand-in").digest() * 1000)
    srv = _Server(
        {
            MNET.filename: shared / "data" / "weights" / "mobilenet0.25_Final.pth",
            dl.OFFICIAL["resnet50"].filename: standin,
        }
    )
    srv.standin = standin
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RETINAFACE_WEIGHTS", raising=False)
    monkeypatch.delenv("RETINAFACE_WEIGHTS_URL", raising=False)
    root = tmp_path / "cache"
    monkeypatch.setenv("RETINAFACE_CACHE", str(root))
    return root


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


def test_download_success_then_no_network(server, cache):
    path = resolve_weights("mobilenet0.25", base_url=server.url, progress=False)
    assert path == cache / MNET.filename
    assert path.stat().st_size == MNET.size and dl.sha256_of(path) == MNET.sha256
    assert server.requests == ["/xinntao/v0.1.0/" + MNET.filename]
    assert _leftovers(cache) == [MNET.filename]
    # already available: no request at all (cache, env var, explicit path)
    assert resolve_weights("mobilenet", base_url=server.url, progress=False) == path
    assert resolve_weights(str(path), base_url=server.url) == path
    assert len(server.requests) == 1


def test_url_from_environment(server, cache, monkeypatch):
    monkeypatch.setenv("RETINAFACE_WEIGHTS_URL", server.url)
    assert resolve_weights("mobilenet0.25", progress=False).is_file()
    assert len(server.requests) == 1


def test_env_weights_take_precedence(server, cache, monkeypatch, shared):
    target = shared / "data" / "weights" / "mobilenet0.25_Final.pth"
    monkeypatch.setenv("RETINAFACE_WEIGHTS", str(target))
    assert resolve_weights("mobilenet0.25", base_url=server.url) == target
    monkeypatch.setenv("RETINAFACE_WEIGHTS", str(cache / "nope.pth"))
    with pytest.raises(WeightsError, match="RETINAFACE_WEIGHTS"):
        resolve_weights("mobilenet0.25", base_url=server.url)
    assert server.requests == []


@pytest.mark.parametrize(
    "mode,match",
    [
        ("corrupt", "sha256"),
        ("truncated", "bytes"),
        ("short", "expected 1789735"),
        ("missing", "HTTP 404"),
    ],
)
def test_bad_transfers_are_refused_and_leave_nothing(server, cache, mode, match):
    server.mode = mode
    with pytest.raises(WeightsError, match=match) as info:
        resolve_weights("mobilenet0.25", base_url=server.url, progress=False)
    assert info.value.__cause__ is None
    assert _leftovers(cache) == []
    server.mode = "ok"  # a later good download works
    assert resolve_weights("mobilenet0.25", base_url=server.url, progress=False).is_file()


def test_server_down(server, cache):
    url = server.url
    server.close()
    with pytest.raises(WeightsError, match="cannot reach"):
        resolve_weights(
            "mobilenet0.25",
            base_url=url,
            progress=False,
        )
    assert _leftovers(cache) == []


def test_no_network(cache, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(WeightsError, match="cannot reach.*--weights") as info:
        resolve_weights("mobilenet0.25", progress=False)  # the real GitHub URL
    assert _leftovers(cache) == []
    _assert_self_contained(info.value, cache)


def _assert_self_contained(error: WeightsError, cache: Path) -> None:
    """What failed, the file name, how to do without the download, where the cache is; and no
    chained tracebacks (the message carries the cause)."""
    msg = str(error)
    assert f"could not download the weights file {MNET.filename}" in msg
    assert "--weights PATH" in msg and "$RETINAFACE_WEIGHTS" in msg
    assert str(cache / MNET.filename) in msg
    assert error.__cause__ is None and error.__suppress_context__


def test_unreachable_url_message(cache):
    with pytest.raises(WeightsError, match="Connection refused") as info:
        resolve_weights("mobilenet0.25", base_url="http://127.0.0.1:9/", progress=False)
    _assert_self_contained(info.value, cache)


def test_resnet50_path_with_stand_in(server, cache, monkeypatch):
    data = server.standin.read_bytes()
    spec = dl.WeightFile(
        "resnet50", dl.OFFICIAL["resnet50"].filename, len(data), hashlib.sha256(data).hexdigest()
    )
    # the real entry is checked against the real release file's published size and hash
    assert dl.OFFICIAL["resnet50"].size == 109_497_761
    with pytest.raises(WeightsError, match="expected 109497761"):
        resolve_weights("resnet50", base_url=server.url, progress=False)
    monkeypatch.setitem(dl.OFFICIAL, "resnet50", spec)
    path = resolve_weights("resnet", base_url=server.url, progress=False)
    assert path.read_bytes() == data and path.name == "detection_Resnet50_Final.pth"
    n = len(server.requests)
    assert resolve_weights("resnet50", base_url=server.url) == path
    assert len(server.requests) == n


def test_unknown_source_is_a_clear_error(cache):
    with pytest.raises(WeightsError, match="not an official model name"):
        resolve_weights("mobilenet0.5")


def test_from_pretrained_converts_once_to_native(server, cache):
    import numpy as np

    from retinaface_jax.inference.detector import Detector

    det = Detector.from_pretrained("mobilenet0.25", base_url=server.url, progress=False)
    native = cache / "native" / "mobilenet0.25"
    assert (native / "config.toml").is_file()
    assert resolve_weights("mobilenet0.25") == native
    det2 = Detector.from_pretrained("mobilenet0.25", base_url=server.url, progress=False)
    assert len(server.requests) == 1
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    a = [f.to_row() for f in det.detect(img)]
    b = [f.to_row() for f in det2.detect(img)]
    assert len(a) == len(b) and all((x == y).all() for x, y in zip(a, b, strict=True))


def test_corrupt_cached_file_is_fetched_again(server, cache):
    cache.mkdir(parents=True)
    (cache / MNET.filename).write_bytes(b"\0" * MNET.size)  # right size, wrong content
    path = resolve_weights("mobilenet0.25", base_url=server.url, progress=False)
    assert dl.sha256_of(path) == MNET.sha256 and len(server.requests) == 1
