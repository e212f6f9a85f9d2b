"""WIDER FACE val ground truth from the official ``.mat`` files.

``wider_face_val.mat`` holds every face box (``x, y, w, h``, all 3,226 val images by event);
``wider_{easy,medium,hard}_val.mat`` hold, per image, the 1-based indices of the faces that count
in that setting (``gt_list``). Faces not listed are "ignored": detections on them are neither true
nor false positives. Only the needed variables are read, which keeps loading fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy.io import loadmat

SETTINGS = ("easy", "medium", "hard")
_BOX_VARS = ("face_bbx_list", "event_list", "file_list")


@dataclasses.dataclass(frozen=True)
class WiderFaceGT:
    """Ground truth of the WIDER FACE val set in the official event/file order.

    ``names[i]`` is ``"event/image"`` (no extension), ``boxes[i]`` float64 ``[K, 4]`` (x, y, w, h),
    ``keep[setting][i]`` bool ``[K]`` (the face counts in that setting).
    """

    names: tuple[str, ...]
    boxes: tuple[np.ndarray, ...]
    keep: dict[str, tuple[np.ndarray, ...]]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def index(self) -> dict[str, int]:
        """``"event/image"`` -> position in :attr:`names`."""
        return {name: i for i, name in enumerate(self.names)}

    def require_known(self, names: Iterable[str], what: str) -> None:
        """Raise a KeyError listing names (of ``what``) that are not val images."""
        index = self.index
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(
                f"{len(unknown)} {what} are not WIDER FACE val images, e.g. {unknown[:3]} "
                f"(expected 'event/image' without extension, e.g. {self.names[0]!r})"
            )


def _load_mat(path: Path, variables: tuple[str, ...]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"WIDER FACE ground truth file missing: {path} (the GT dir must hold "
            "wider_face_val.mat and wider_easy_val.mat, wider_medium_val.mat, wider_hard_val.mat)"
        )
    try:
        mat = loadmat(str(path), variable_names=list(variables))
    except Exception as e:  # scipy raises several types for corrupt files
        raise ValueError(f"cannot read WIDER FACE ground truth {path}: {e}") from e
    missing = [v for v in variables if v not in mat]
    if missing:
        raise ValueError(
            f"{path}: missing variable(s) {missing}; is this an official WIDER FACE .mat?"
        )
    return mat


def load_widerface_gt(gt_dir: str | Path) -> WiderFaceGT:
    """Read the official val ground truth from ``gt_dir`` (clear errors naming any missing file)."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"WIDER FACE ground truth directory not found: {gt_dir}")
    main_path = gt_dir / "wider_face_val.mat"
    main = _load_mat(main_path, _BOX_VARS)
    settings = {s: _load_mat(gt_dir / f"wider_{s}_val.mat", ("gt_list",)) for s in SETTINGS}

    names: list[str] = []
    boxes: list[np.ndarray] = []
    keep: dict[str, list[np.ndarray]] = {s: [] for s in SETTINGS}
    events = main["event_list"]
    for i in range(len(events)):
        event = str(events[i][0][0])
        files = main["file_list"][i][0]
        event_boxes = main["face_bbx_list"][i][0]
        for j in range(len(files)):
            names.append(f"{event}/{files[j][0][0]}")
            b = np.asarray(event_boxes[j][0], dtype=np.float64).reshape(-1, 4)
            boxes.append(b)
            for s in SETTINGS:
                try:
                    kept = np.asarray(settings[s]["gt_list"][i][0][j][0], dtype=np.int64).ravel()
                except IndexError as e:
                    raise ValueError(
                        f"{gt_dir / f'wider_{s}_val.mat'}: gt_list has no entry for {names[-1]}"
                    ) from e
                if kept.size and (kept.min() < 1 or kept.max() > len(b)):
                    raise ValueError(
                        f"{gt_dir / f'wider_{s}_val.mat'}: face index out of range for {names[-1]}"
                    )
                mask = np.zeros(len(b), dtype=bool)
                mask[kept - 1] = True
                keep[s].append(mask)
    return WiderFaceGT(
        names=tuple(names), boxes=tuple(boxes), keep={s: tuple(v) for s, v in keep.items()}
    )
