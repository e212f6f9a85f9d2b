"""Reading the evaluation text formats: lines of a UTF-8 file and numeric rows, with errors that
name the file and the line.

Detection rows are ``x y w h score``. What is rejected, and why (shared by the WIDER FACE and FDDB
readers):

- a number that is not finite (``nan``, ``inf``): no evaluation can rank or match it;
- a score outside ``[0, 1]``: RetinaFace scores are softmax probabilities, so such a value means a
  wrong column or another detector's raw scores. We reject rather than clip, because clipping
  would silently tie scores and change the ranking the AP / ROC is computed from;
- a negative width or height: rejected for FDDB (the original writes ``w = x2 - x1 + 1 >= 1``).
  WIDER FACE keeps them (``negative_size_ok``), because the official evaluation scores them as
  boxes that cover (almost) nothing, and its golden values include such rows; the WIDER reader
  warns about them instead (see ``predictions_io``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DETECTION_FIELDS = "x y w h score"


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (a ``what``, for the messages).

    Missing files, directories and binary content are reported naming the file (and, for bytes
    that are not UTF-8, the line), instead of Python's bare ``'utf-8'`` codec error.
    """
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a {what}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {lineno}: not UTF-8 text (byte 0x{data[e.start]:02x}); is this a {what}?"
        ) from None
    return text.splitlines()


def parse_row(
    line: str, n: int, path: Path, lineno: int, expected: str, context: str = ""
) -> list[float]:
    """The first ``n`` numbers of ``line`` (extra fields are ignored, as the original does);
    all must be finite."""
    fields = line.split()
    try:
        if len(fields) < n:
            raise ValueError
        values = [float(v) for v in fields[:n]]
    except ValueError:
        raise ValueError(
            f"{path}: line {lineno}: expected '{expected}'{context}, got {line.strip()!r}"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"{path}: line {lineno}: non-finite number in '{expected}'{context}: {line.strip()!r}"
        )
    return values


def invalid_detection(rows: np.ndarray, negative_size_ok: bool = False) -> tuple[int, str] | None:
    """Index and reason of the first ``[N, 5]`` ``x y w h score`` row that is not a valid
    detection (non-finite, score outside [0, 1], negative size unless ``negative_size_ok``);
    ``None`` when all are valid. Vectorised: one check per array, not per line."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    finite = np.isfinite(rows).all(axis=1)
    problems = [
        (~finite, "non-finite number"),
        (finite & ((rows[:, 4] < 0) | (rows[:, 4] > 1)), "score outside [0, 1]"),
    ]
    if not negative_size_ok:
        problems.append((finite & ((rows[:, 2] < 0) | (rows[:, 3] < 0)), "negative width/height"))
    first = [(int(np.argmax(bad)), reason) for bad, reason in problems if bad.any()]
    return min(first) if first else None


def check_detection_rows(
    rows: list[list[float]],
    linenos: list[int],
    path: Path,
    context: str = "",
    negative_size_ok: bool = False,
) -> np.ndarray:
    """``rows`` (parsed from lines ``linenos`` of ``path``) as float64 ``[N, 5]``, or a
    ValueError naming the file and line of the first invalid detection."""
    out = np.array(rows, dtype=np.float64).reshape(-1, 5)
    bad = invalid_detection(out, negative_size_ok)
    if bad is not None:
        i, reason = bad
        values = " ".join(f"{v:g}" for v in out[i])
        raise ValueError(f"{path}: line {linenos[i]}: {reason}{context}: '{values}'")
    return out
