"""detect.py on live streams: an MJPEG-over-HTTP server on 127.0.0.1, run by the test itself.

Frames are processed as they arrive, the ones that arrive during a detection are dropped and
counted, every frame's JSON line carries its index, timestamps and the running drop count, and the
output video plays after the stream ends, after the server goes away and after Ctrl-C.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from retinaface_jax.inference import cli
from retinaface_jax.inference.cli import main
from retinaface_jax.inference.draw import draw_faces
from retinaface_jax.inference.face import Face
from retinaface_jax.inference.stream import display_name, file_stem, is_stream

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGE = "biubug6_curve_test.jpg"


def _synthetic_frame(width: int = 160, height: int = 120) -> np.ndarray:
    """A bright textured frame (for tests that need no real faces)."""
    rng = np.random.default_rng(0)
    img = rng.integers(80, 256, (height, width, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (5, 5), 0)


class MjpegServer:
    """Serves ``frames`` JPEG frames (None: until :meth:`close`) at ``fps`` as
    multipart/x-mixed-replace on 127.0.0.1; ``sent`` counts the frames written."""

    def __init__(self, image: np.ndarray, fps: float, frames: int | None):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        jpeg, self.sent, self.stopped = buf.tobytes(), 0, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                n = 0
                try:
                    while (frames is None or n < frames) and not server.stopped.is_set():
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n"
                        )
                        self.wfile.flush()
                        n += 1
                        server.sent += 1
                        time.sleep(1.0 / fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/live.mjpg"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving: an open connection ends after its current frame."""
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(image=None, fps=30.0, frames=None):
        s = MjpegServer(_synthetic_frame() if image is None else image, fps, frames)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


class StubDetector:
    """Numpy-only detector: one face (score 0.9) on the centre quarter of every frame, after
    ``delay`` seconds per frame (a detector slower than the source)."""

    cfg = SimpleNamespace(vis_threshold=0.6)

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def detect_batch(self, images, **kw):
        out = []
        for img in images:
            time.sleep(self.delay)
            h, w = img.shape[:2]
            box = np.array([3 * w / 8, 3 * h / 8, 5 * w / 8, 5 * h / 8], np.float32)
            lm = np.array([[w * (0.4 + 0.05 * i), h / 2] for i in range(5)], np.float32)
            out.append([Face(box, 0.9, lm)])
        return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _output_of(out: Path, url: str) -> Path:
    return out / (file_stem(url) + ".avi")


def _check_records(recs: list[dict], start: float, end: float) -> None:
    """Frame indices increase, drops are counted from the gaps, timestamps are plausible."""
    assert recs
    frames = [r["frame"] for r in recs]
    assert frames == sorted(set(frames)) and frames[0] >= 0
    for k, r in enumerate(recs):
        assert r["dropped"] == r["frame"] - k  # frames skipped before this one, running count
    times = [r["time"] for r in recs]
    assert times[0] >= 0 and times == sorted(times) and times[-1] <= end - start + 0.1
    assert all(start - 0.1 <= r["wall_time"] <= end + 0.1 for r in recs)


def test_source_names():
    assert is_stream("0") and is_stream("12") and is_stream("rtsp://cam/live")
    assert is_stream("HTTPS://example.com/a.mjpg") and is_stream("http://127.0.0.1:8080/")
    assert not is_stream("video.mp4") and not is_stream("./0") and not is_stream("file://x")
    assert file_stem("0") == "camera0"
    assert file_stem("rtsp://user:pw@10.0.0.2:554/stream1?x=1") == "10.0.0.2_554_stream1"
    assert display_name("rtsp://user:pw@cam:554/s") == "rtsp://user:***@cam:554/s"
    assert display_name("rtsp://cam/s") == "rtsp://cam/s"


def test_stream_until_server_closes(serve, tmp_path, capsys):
    """Frames processed as they arrive; the server going away ends the stream cleanly."""
    server = serve(fps=25.0)
    threading.Timer(1.5, server.close).start()
    out, js = tmp_path / "out", tmp_path / "live.jsonl"
    start = time.time()
    code = main(
        [server.url, "--output", str(out), "--json", str(js), "--quiet"], detector=StubDetector()
    )
    end = time.time()
    assert code == 0
    err = capsys.readouterr().err
    recs = _records(js)
    _check_records(recs, start, end)
    assert len(recs) >= 10  # about 1.5 s at 25 fps with an instant detector
    assert all(r["image"] == server.url and len(r["faces"]) == 1 for r in recs)
    assert recs[-1]["frame"] + 1 == server.sent  # every frame sent: processed or dropped
    assert f"{len(recs)} frame(s) processed, {recs[-1]['dropped']} dropped" in err
    assert f"{recs[-1]['dropped']} stream frame(s) dropped" in err.splitlines()[-1]
    frames = _frames(_output_of(out, server.url))
    assert len(frames) == len(recs) and frames[0].shape == (120, 160, 3)


def test_slow_detector_drops_frames(serve, tmp_path, capsys):
    """A source faster than detection: the newest frame is taken, the others dropped."""
    server = serve(fps=100.0, frames=60)
    js = tmp_path / "live.jsonl"
    code = main(
        [server.url, "--output", str(tmp_path / "o"), "--json", str(js), "--quiet"],
        detector=StubDetector(delay=0.06),
    )
    assert code == 0
    recs = _records(js)
    _check_records(recs, 0.0, time.time())
    total = recs[-1]["dropped"]
    assert len(recs) + total == server.sent == 60
    assert total >= 20 and len(recs) < 40  # ~0.6 s of frames, one detection per 0.06 s
    assert any(b["frame"] - a["frame"] > 1 for a, b in zip(recs, recs[1:], strict=False))
    assert f"{total} dropped" in capsys.readouterr().err
    assert len(_frames(_output_of(tmp_path / "o", server.url))) == len(recs)


def test_real_weights_find_faces(serve, shared, tmp_path):
    """The official MobileNet weights find the faces of a real photo served as a stream."""
    img = cv2.imread(str(shared / "data" / "images" / TEST_IMAGE))
    img = cv2.resize(img, (480, round(480 * img.shape[0] / img.shape[1])))
    weights = shared / "data" / "weights" / "mobilenet0.25_Final.pth"
    server = serve(img, fps=10.0, frames=6)
    out, js = tmp_path / "out", tmp_path / "live.jsonl"
    code = main([server.url, "--weights", str(weights), "--output", str(out), "--json", str(js)])
    assert code == 0
    recs = _records(js)
    found = [sum(f["score"] >= 0.6 for f in r["faces"]) for r in recs]
    assert min(found) >= 5, found  # a group photo
    # the drawn boxes change the written frames
    frames = _frames(_output_of(out, server.url))
    assert len(frames) == len(recs)
    assert np.abs(frames[0].astype(int) - img.astype(int)).mean() > 2


def test_unopenable_sources(tmp_path, capsys):
    """One error line naming the source (password hidden), no traceback, exit status 1."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/nothing.mjpg"
    secret = f"rtsp://admin:hunter2@127.0.0.1:{port}/cam"
    code = main([url, secret, "97", "--output", str(tmp_path / "o")], detector=StubDetector())
    assert code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 3
    assert lines[0] == (
        f"error: {url}: cannot open the stream (expected a reachable URL that serves video) "
        "(skipped)"
    )
    assert "rtsp://admin:***@127.0.0.1" in lines[1] and "hunter2" not in err
    assert lines[2].startswith("error: 97: cannot open the camera")
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("0 input(s) processed, 0 face(s) found, 3 failed")


def test_anonymize_stream(serve, tmp_path):
    """--anonymize works on live frames: the face box is covered in the written video."""
    server = serve(fps=20.0, frames=8)
    out = tmp_path / "out"
    code = main(
        [server.url, "--anonymize", "solid", "--output", str(out), "--quiet"],
        detector=StubDetector(),
    )
    assert code == 0
    frames = _frames(_output_of(out, server.url))
    assert len(frames) >= 1
    original = _synthetic_frame()
    # the stub's box: x 60..100, y 45..75; with the default margin, x 40..120, y 30..90
    assert original[45:75, 60:100].mean() > 100
    assert all(f[45:75, 60:100].mean() < 20 for f in frames)
    assert all(f[:20, :20].mean() > 100 for f in frames)  # outside box + margin: untouched


def test_track_ids_on_stream_and_video(serve, tmp_path):
    """--track: one tracker per stream or video, ids in the JSON (stub: one still face = id 1)."""
    server = serve(fps=20.0, frames=6)
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(4):
        w.write(_synthetic_frame())
    w.release()
    js = tmp_path / "t.jsonl"
    code = main(
        [str(video), server.url, "--track", "--output", str(tmp_path / "o"), "--json", str(js)],
        detector=StubDetector(),
    )
    assert code == 0
    recs = _records(js)
    assert [r["frame"] for r in recs if r["image"] == str(video)] == [0, 1, 2, 3]
    assert sum(r["image"] == server.url for r in recs) >= 1
    # ids restart per input: a fresh tracker for the stream
    assert all([f["id"] for f in r["faces"]] == [1] for r in recs)


def test_track_with_a_fake_tracker_and_images_note(tmp_path, monkeypatch, capsys):
    """The CLI hands every frame's faces to its tracker in order and writes what it returns."""
    calls = []

    class CountingTracker:
        def update(self, faces):
            calls.append(len(faces))
            return [f.with_track_id(len(calls) * 10) for f in faces]

    monkeypatch.setattr(cli, "make_tracker", lambda vis: CountingTracker())
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(3):
        w.write(_synthetic_frame())
    w.release()
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), _synthetic_frame())
    js = tmp_path / "t.jsonl"
    args = [str(video), str(image), "--track", "--output", str(tmp_path / "o"), "--json", str(js)]
    assert main(args + ["--quiet"], detector=StubDetector()) == 0
    recs = _records(js)
    assert "id" not in recs[0]["faces"][0]  # the image, not tracked
    assert [r["faces"][0]["id"] for r in recs[1:]] == [10, 20, 30] and calls == [1, 1, 1]
    assert "--track applies to videos and streams" in capsys.readouterr().err


def test_track_id_drawn():
    img = _synthetic_frame()
    face = StubDetector().detect_batch([img])[0][0]
    plain, tracked = draw_faces(img, [face]), draw_faces(img, [face.with_track_id(7)])
    diff = np.abs(plain.astype(int) - tracked.astype(int)).sum(axis=2)
    ys, xs = np.nonzero(diff)
    assert len(ys) > 20 and ys.max() < 45  # the label sits above the box (top at y=45)


def test_show_without_display_warns(serve, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    server = serve(fps=20.0, frames=4)
    code = main([server.url, "--show", "--output", str(tmp_path / "o")], detector=StubDetector())
    assert code == 0
    err = capsys.readouterr().err
    assert "detect.py: warning: --show: no display (DISPLAY and WAYLAND_DISPLAY are unset)" in err
    assert _frames(_output_of(tmp_path / "o", server.url))


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_live_stream import StubDetector
from retinaface_jax.inference.cli import main
raise SystemExit(main(sys.argv[1:], detector=StubDetector(0.02)))
"""


def test_sigint_leaves_playable_output(serve, tmp_path):
    """Ctrl-C on a never-ending stream: exit 130, the video so far is complete and plays."""
    server = serve(fps=30.0)
    out, js = tmp_path / "out", tmp_path / "live.jsonl"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(tests=str(REPO / "tests"))]
        + [server.url, "--output", str(out), "--json", str(js), "--quiet"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and child.poll() is None:
            if js.exists() and len(js.read_text().splitlines()) >= 10:
                break
            time.sleep(0.1)
        assert child.poll() is None, child.communicate()[1]
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err
    recs = _records(js)
    frames = _frames(_output_of(out, server.url))
    assert len(recs) >= 10 and len(recs) - 1 <= len(frames) <= len(recs)


class FakeGui:
    """Stands in for OpenCV's HighGUI (no display here): records shown frames, presses
    ``key`` once ``press_after`` frames were shown."""

    def __init__(self, monkeypatch, press_after: int, key: str = "q"):
        self.shown: list[tuple[str, np.ndarray]] = []
        self.windows: list[str] = []
        self.press_after, self.key = press_after, ord(key)
        monkeypatch.setenv("DISPLAY", ":0")
        monkeypatch.setattr(cv2, "namedWindow", lambda title, flags=0: self.windows.append(title))
        monkeypatch.setattr(cv2, "imshow", lambda title, img: self.shown.append((title, img)))
        monkeypatch.setattr(cv2, "waitKey", self.wait_key)
        monkeypatch.setattr(cv2, "getWindowProperty", lambda title, prop: 1.0)
        monkeypatch.setattr(cv2, "destroyWindow", lambda title: None)

    def wait_key(self, delay=0):
        return self.key if len(self.shown) >= self.press_after else -1


def test_show_stops_on_q(serve, tmp_path, monkeypatch, capsys):
    """--show: every processed frame is shown; q ends the stream (outputs closed, exit 0) and
    ends a video early, the run going on with the next input."""
    gui = FakeGui(monkeypatch, press_after=3)
    server = serve(fps=30.0)  # never ends by itself
    js, out = tmp_path / "s.jsonl", tmp_path / "o"
    code = main(
        [server.url, "--show", "--output", str(out), "--json", str(js), "--quiet"],
        detector=StubDetector(),
    )
    assert code == 0
    assert "stopped from the window; 3 frame(s) processed" in capsys.readouterr().err
    assert len(gui.shown) == 3 and gui.windows == [f"detect.py: {server.url}"]
    assert len(_records(js)) == 3 and len(_frames(_output_of(out, server.url))) == 3
    # what is shown is what is written: the drawn frame
    assert np.abs(gui.shown[0][1].astype(int) - _synthetic_frame().astype(int)).max() > 100

    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(6):
        w.write(_synthetic_frame())
    w.release()
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), _synthetic_frame())
    gui.shown.clear()
    js2 = tmp_path / "v.jsonl"
    args = [str(video), str(image), "--show", "--batch-size", "1", "--json", str(js2)]
    assert main(args + ["--output", str(out), "--quiet"], detector=StubDetector()) == 0
    recs = _records(js2)
    assert [r.get("frame") for r in recs if r["image"] == str(video)] == [0, 1, 2]
    assert any(r["image"] == str(image) for r in recs)


def test_show_without_gui_support_warns(serve, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISPLAY", ":0")

    def no_gui(*args):  # as opencv-python-headless reports it
        raise cv2.error(
            "OpenCV(5.1.0) /io/opencv/modules/highgui/src/window.cpp:1301: error: "
            "(-2:Unspecified error) The function is not implemented.\nRebuild the library\n"
        )

    monkeypatch.setattr(cv2, "namedWindow", no_gui)
    server = serve(fps=20.0, frames=4)
    code = main([server.url, "--show", "--output", str(tmp_path / "o")], detector=StubDetector())
    assert code == 0
    err = capsys.readouterr().err
    assert (
        "detect.py: warning: --show: cannot open a window: The function is not implemented. "
        "Rebuild the library\n" in err
    )
    assert _frames(_output_of(tmp_path / "o", server.url))
