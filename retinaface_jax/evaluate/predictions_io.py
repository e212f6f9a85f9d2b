"""WIDER FACE per-image prediction files (the layout the original ``test_widerface.py`` writes).

``<pred_dir>/<event>/<image>.txt``::

    <image>              image name, no extension
    <N>                  number of boxes
    x y w h score        N lines (the original ends each line with a space)

Detector output is written exactly like the original: ``x = int(x1)``, ``w = int(x2) - int(x1)``
(truncation), the float32 score printed with ``str``. Arbitrary float predictions are written with
a round-trip exact representation, so evaluating written files equals evaluating the arrays.

Reading is strict, and every error names the file and, where there is one, the line: content that
is not UTF-8, a wrong image name, a count line that is not a number or disagrees with the rows,
rows with fewer than 5 numbers, non-finite numbers and scores outside ``[0, 1]`` are *rejected*
(not clipped: clipping would tie scores and silently change the ranking the AP is computed from;
RetinaFace scores are probabilities, so an out-of-range score means a wrong file). Negative
widths or heights are *kept* with a ``UserWarning`` naming the first such line: the official
evaluation scores them as boxes covering (almost) nothing, and the golden values of that
evaluation include such rows, so rejecting or clipping them would change official results.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinaface_jax.evaluate.text_rows import (
    DETECTION_FIELDS,
    check_detection_rows,
    parse_row,
    read_lines,
)


def faces_to_rows(faces: Sequence[Any]) -> np.ndarray:
    """Detector faces (``.box`` x1,y1,x2,y2 and ``.score``) -> float32 ``[N, 5]`` ``x y w h score``
    rows with the original's integer truncation."""
    rows = np.zeros((len(faces), 5), dtype=np.float32)
    for k, face in enumerate(faces):
        x1, y1, x2, y2 = (int(v) for v in np.asarray(face.box, dtype=np.float32)[:4])
        rows[k] = (x1, y1, x2 - x1, y2 - y1, np.float32(face.score))
    return rows


def _format_value(v: Any, dtype: np.dtype, allow_int: bool) -> str:
    f = float(v)
    if allow_int and f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    if dtype == np.float32:
        return str(np.float32(v))
    return repr(f)


def format_prediction_file(name: str, rows: np.ndarray) -> str:
    """The text of one prediction file for image ``name`` and ``[N, 5]`` rows."""
    rows = np.asarray(rows)
    rows = rows.reshape(-1, 5) if rows.size else np.zeros((0, 5), rows.dtype)
    dtype = rows.dtype if rows.dtype == np.float32 else np.dtype(np.float64)
    lines = [name, str(len(rows))]
    for r in rows:
        coords = " ".join(_format_value(v, dtype, True) for v in r[:4])
        lines.append(f"{coords} {_format_value(r[4], dtype, False)} ")
    return "\n".join(lines) + "\n"


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"prediction key {key!r}: expected 'event/image' (no extension)")
    return parts[0], parts[1]


def write_predictions(
    pred_dir: str | Path, predictions: Mapping[str, np.ndarray], overwrite: bool = False
) -> list[Path]:
    """Write ``"event/image" -> [N,5]`` predictions as ``pred_dir/event/image.txt``.

    Refuses (before writing anything) to replace existing files unless ``overwrite``.
    """
    pred_dir = Path(pred_dir)
    targets = []
    for key in predictions:
        event, image = _split_key(key)
        targets.append((pred_dir / event / f"{image}.txt", image, predictions[key]))
    if not overwrite:
        existing = [p for p, _, _ in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} prediction file(s) already exist, e.g. {existing[0]}; "
                "choose another directory or pass overwrite=True (--overwrite)"
            )
    for path, image, rows in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_prediction_file(image, rows))
    return [p for p, _, _ in targets]


def _read_prediction_file(path: Path) -> tuple[str, np.ndarray, list[int]]:
    """(image name, float64 ``[N, 5]``, lines holding a negative width or height)."""
    lines = read_lines(path, "prediction file")
    if len(lines) < 2:
        raise ValueError(f"{path}: truncated prediction file (expected the image name and a count)")
    name = lines[0].strip().split("/")[-1].removesuffix(".jpg")
    if not name:
        raise ValueError(f"{path}: line 1: expected the image name, got an empty line")
    if name != path.stem:
        raise ValueError(f"{path}: line 1 names image {name!r} but the file is {path.name}")
    try:
        count = int(lines[1].strip())
        if count < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{path}: line 2: expected the number of boxes, got {lines[1].strip()!r}"
        ) from None
    rows, linenos = [], []
    for lineno, line in enumerate(lines[2:], start=3):
        if line.strip():
            rows.append(parse_row(line, 5, path, lineno, DETECTION_FIELDS))
            linenos.append(lineno)
    if len(rows) != count:
        raise ValueError(
            f"{path}: truncated or malformed: header says {count} boxes, found {len(rows)}"
        )
    out = check_detection_rows(rows, linenos, path, negative_size_ok=True)
    negative = [linenos[i] for i in np.flatnonzero((out[:, 2] < 0) | (out[:, 3] < 0))]
    return name, out, negative


def read_prediction_file(path: str | Path) -> tuple[str, np.ndarray]:
    """Parse one prediction file -> (image name, float64 ``[N, 5]``); errors name file and line
    (see the module docstring for what is rejected)."""
    path = Path(path)
    name, rows, negative = _read_prediction_file(path)
    if negative:
        _warn_negative_sizes(len(negative), path, negative[0])
    return name, rows


def _warn_negative_sizes(count: int, path: Path, lineno: int) -> None:
    warnings.warn(
        f"{count} prediction row(s) with a negative width or height, first at {path}: line "
        f"{lineno}; kept, as the official evaluation keeps them (they hardly ever match a face)",
        UserWarning,
        stacklevel=3,
    )


def prediction_files(pred_dir: str | Path) -> list[Path]:
    """All ``<event>/*.txt`` files under ``pred_dir`` (sorted); errors on a wrong layout."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {pred_dir}")
    files: list[Path] = []
    for entry in sorted(os.scandir(pred_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise ValueError(
                f"{Path(entry.path)}: expected only event sub-directories (event/image.txt) "
                f"in {pred_dir}"
            )
        files.extend(sorted(Path(entry.path).glob("*.txt")))
    if not files:
        raise FileNotFoundError(f"no prediction files (<event>/<image>.txt) in {pred_dir}")
    return files


def read_predictions(
    source: str | Path | Iterable[str | Path],
) -> dict[str, np.ndarray]:
    """Read a prediction directory (or an explicit list of files) -> ``{"event/image": [N, 5]}``.

    Rows with a negative width or height give one ``UserWarning`` for the whole set."""
    files = (
        prediction_files(source) if isinstance(source, str | Path) else [Path(p) for p in source]
    )
    out: dict[str, np.ndarray] = {}
    negative: list[tuple[Path, int]] = []
    for path in files:
        name, rows, bad = _read_prediction_file(path)
        out[f"{path.parent.name}/{name}"] = rows
        negative.extend((path, lineno) for lineno in bad)
    if negative:
        _warn_negative_sizes(len(negative), *negative[0])
    return out
