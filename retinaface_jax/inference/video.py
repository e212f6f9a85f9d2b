"""Video input/output for the CLI: frames in with ``cv2.VideoCapture``, annotated frames out.

The writer keeps the input's codec (FourCC) and container when OpenCV can encode it, and otherwise
falls back to the same family of widely available encoders (``mp4v`` for .mp4/.mov/.m4v, ``MJPG``
for .avi, ``VP80`` for .webm), so the output plays wherever the input did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
_FALLBACK = {
    ".mp4": "mp4v",
    ".mov": "mp4v",
    ".m4v": "mp4v",
    ".avi": "MJPG",
    ".mkv": "MJPG",
    ".webm": "VP80",
}


class VideoError(ValueError):
    """A video that cannot be opened or written."""


def is_video(path: str | Path) -> bool:
    """True for file names with a common video extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _fourcc_text(code: float) -> str:
    c = int(code)
    return "".join(chr((c >> (8 * i)) & 0xFF) for i in range(4)) if c > 0 else ""


class VideoReader:
    """Iterate the BGR frames of a video file; ``fps``, ``size`` (w, h), ``fourcc``, ``frame_count``.

    Iteration raises :class:`VideoError` saying how many frames were read when the video ends
    early (fewer frames than its header announces, or a decoder error), after yielding every
    frame that could be read; ``frames_read`` counts them.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cap = cv2.VideoCapture(str(self.path))
        if not self.cap.isOpened():
            raise VideoError(f"{self.path}: cannot open as a video")
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 25.0
        self.size = (
            int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self.fourcc = _fourcc_text(self.cap.get(cv2.CAP_PROP_FOURCC))
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frames_read = 0

    def _stopped(self, why: str) -> VideoError:
        total = f" of {self.frame_count}" if self.frame_count > 0 else ""
        return VideoError(f"{self.path}: stopped after {self.frames_read}{total} frames: {why}")

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            try:
                ok, frame = self.cap.read()
            except cv2.error as e:
                raise self._stopped(" ".join(str(e).split())) from None
            if not ok:
                break
            self.frames_read += 1
            yield frame
        if self.frames_read < self.frame_count:
            raise self._stopped("the file is truncated or damaged")

    def close(self) -> None:
        self.cap.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_writer(path: Path, fps: float, size: tuple[int, int], fourcc: str = "") -> cv2.VideoWriter:
    """A ``cv2.VideoWriter`` for ``path``: the input's FourCC if usable, else the family fallback."""
    candidates = [c for c in (fourcc, _FALLBACK.get(path.suffix.lower(), "mp4v")) if len(c) == 4]
    for code in dict.fromkeys(candidates):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*code), fps, size)
        if writer.isOpened():
            return writer
        writer.release()
    raise VideoError(f"{path}: cannot open a video writer (tried FourCC {candidates})")
