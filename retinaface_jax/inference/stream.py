"""Live sources for the CLI: camera indices and network streams, processed as frames arrive.

A reader thread pulls frames as fast as the source delivers them and keeps only the newest one,
so a detector slower than the source skips frames (counted as dropped) instead of falling ever
further behind through a queue. Also: an OpenCV window for ``--show`` and the check whether one
can be opened at all.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from retinaface_jax.inference.video import VideoError

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
# FFmpeg's own log level for this process; read once, when its first capture opens
_FFMPEG_LOGLEVEL_ENV = "OPENCV_FFMPEG_LOGLEVEL"
_AV_LOG_QUIET = "-8"
STOP_KEYS = (ord("q"), 27)  # q, Esc


class StreamError(VideoError):
    """A live source that cannot be opened or read."""


def is_stream(source: str) -> bool:
    """True for a camera index (``0``, ``1``...) or an ``rtsp://``, ``http(s)://``... URL."""
    if re.fullmatch(r"[0-9]+", source):
        return True
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.lower() in STREAM_SCHEMES


def display_name(source: str) -> str:
    """``source`` as shown in messages and JSON: a URL's password replaced by ``***``."""
    if not re.fullmatch(r"[0-9]+", source):
        try:
            parts = urlsplit(source)
            if parts.password is not None:
                user = parts.username or ""
                host = parts.netloc.rpartition("@")[2]
                return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
        except ValueError:
            pass
    return source


def file_stem(source: str) -> str:
    """A file name stem for a source's output: ``camera0``, or the URL's host and path
    (no scheme, user or password) with every unusual character replaced by ``_``."""
    if re.fullmatch(r"[0-9]+", source):
        return f"camera{int(source)}"
    try:
        parts = urlsplit(source)
        text = parts.netloc.rpartition("@")[2] + parts.path
    except ValueError:
        text = source.partition("://")[2]
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._-")[:100]
    return stem or "stream"


@dataclasses.dataclass(frozen=True)
class StreamFrame:
    """One frame handed to the consumer.

    ``index``: its number in the source (0 = the first frame received, dropped ones counted);
    ``time``: seconds from the first frame's arrival to this one's; ``wall_time``: its arrival as
    Unix time; ``dropped``: frames received so far that were never handed out.
    """

    image: np.ndarray
    index: int
    time: float
    wall_time: float
    dropped: int


class LiveStream:
    """Frames of a camera or network stream, newest first: :meth:`next` returns the newest frame
    not yet returned and counts the ones it skipped. ``fps``: as the source reports it (0 when it
    does not); ``received``, ``handed_out``: frame counts; ``error``: why reading stopped early.
    """

    def __init__(self, source: str, open_timeout: float = 10.0, read_timeout: float = 10.0):
        self.source = source
        self.name = display_name(source)
        self.read_timeout = read_timeout
        self.cap = _open_capture(source, open_timeout, read_timeout)
        if not self.cap.isOpened():
            self.cap.release()
            what = "camera" if source.isdigit() else "stream"
            expected = (
                "a connected camera with this index"
                if source.isdigit()
                else "a reachable URL that serves video"
            )
            raise StreamError(f"{self.name}: cannot open the {what} (expected {expected})")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 0.0
        self.received = 0
        self.handed_out = 0
        self.error: str | None = None
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, int, float, float] | None = None
        self._ended = False
        self._stop = threading.Event()
        self._t0: float | None = None
        self._thread = threading.Thread(target=self._read, name=f"read {self.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                ok, frame = self.cap.read()
                if not ok or frame is None:
                    break
                now, wall = time.monotonic(), time.time()
                with self._cond:
                    if self._t0 is None:
                        self._t0 = now
                    self._latest = (frame, self.received, now - self._t0, wall)
                    self.received += 1
                    self._cond.notify_all()
        except cv2.error as e:
            self.error = " ".join(str(e).split())
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def next(self) -> StreamFrame | None:
        """The newest frame not handed out yet, waiting for one; None once the source has ended
        (or :meth:`close` was called) and every frame was either handed out or dropped."""
        with self._cond:
            # short waits: the main thread stays responsive to Ctrl-C
            while self._latest is None and not self._ended:
                self._cond.wait(0.1)
            if self._latest is None:
                return None
            frame, index, t, wall = self._latest
            self._latest = None
            self.handed_out += 1
            return StreamFrame(frame, index, t, wall, index + 1 - self.handed_out)

    @property
    def dropped(self) -> int:
        """Frames received that were never handed out (so far)."""
        with self._cond:
            pending = 0 if self._latest is None else 1
            return self.received - self.handed_out - pending

    def close(self) -> None:
        """Stop the reader thread and release the source (a read still blocked on a stalled
        network source is left to its timeout rather than released under it)."""
        self._stop.set()
        self._thread.join(timeout=self.read_timeout + 1.0)
        with self._cond:
            self._ended = True
            self._latest = None
        if not self._thread.is_alive():
            self.cap.release()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_capture(source: str, open_timeout: float, read_timeout: float) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` for a camera index or URL, without OpenCV's and FFmpeg's log lines
    (a failure is reported once, by the caller, naming the source)."""
    os.environ.setdefault(_FFMPEG_LOGLEVEL_ENV, _AV_LOG_QUIET)
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        if source.isdigit():
            return cv2.VideoCapture(int(source))
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(open_timeout * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(read_timeout * 1000),
        ]
        return cv2.VideoCapture(source, cv2.CAP_ANY, params)
    except cv2.error:
        return cv2.VideoCapture()
    finally:
        logging.setLogLevel(level)


def display_problem() -> str | None:
    """Why no window can be shown here (None: one can): on Linux, no X11 or Wayland display."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    return None


class Window:
    """An OpenCV window for ``--show``; :meth:`show` returns False once the user asks to stop
    (q or Esc pressed, or the window closed)."""

    def __init__(self, title: str):
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)  # cv2.error when OpenCV has no GUI support

    def show(self, frame: np.ndarray) -> bool:
        cv2.imshow(self.title, frame)
        key = cv2.waitKey(1) & 0xFF
        if key in STOP_KEYS:
            return False
        return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass
