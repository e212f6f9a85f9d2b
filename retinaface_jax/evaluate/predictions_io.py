"""WIDER FACE per-image prediction files (the layout the original ``test_widerface.py`` writes).

``<pred_dir>/<event>/<image>.txt``::

    <image>              image name, no extension
    <N>                  number of boxes
    x y w h score        N lines (the original ends each line with a space)

Detector output is written exactly like the original: ``x = int(x1)``, ``w = int(x2) - int(x1)``
(truncation), the float32 score printed with ``str``. Arbitrary float predictions are written with
a round-trip exact representation, so evaluating written files equals evaluating the arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinaface_jax.evaluate.text_rows import parse_row


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


def read_prediction_file(path: str | Path) -> tuple[str, np.ndarray]:
    """Parse one prediction file -> (image name, float64 ``[N, 5]``); errors name file and line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}: truncated prediction file (expected the image name and a count)")
    name = lines[0].strip().split("/")[-1].removesuffix(".jpg")
    if not name:
        raise ValueError(f"{path}: line 1: expected the image name, got an empty line")
    if name != path.stem:
        raise ValueError(f"{path}: line 1 names image {name!r} but the file is {path.name}")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise ValueError(
            f"{path}: line 2: expected the number of boxes, got {lines[1].strip()!r}"
        ) from None
    rows = []
    for lineno, line in enumerate(lines[2:], start=3):
        if line.strip():
            rows.append(parse_row(line, 5, path, lineno, "x y w h score"))
    if len(rows) != count:
        raise ValueError(
            f"{path}: truncated or malformed: header says {count} boxes, found {len(rows)}"
        )
    out = np.array(rows, dtype=np.float64).reshape(-1, 5)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{path}: non-finite value in the boxes")
    return name, out


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
    """Read a prediction directory (or an explicit list of files) -> ``{"event/image": [N, 5]}``."""
    files = (
        prediction_files(source) if isinstance(source, str | Path) else [Path(p) for p in source]
    )
    out: dict[str, np.ndarray] = {}
    for path in files:
        name, rows = read_prediction_file(path)
        out[f"{path.parent.name}/{name}"] = rows
    return out
