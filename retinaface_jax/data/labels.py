"""Parse WIDER FACE annotations into face records, reporting every bad item instead of crashing.

Two formats are read:

* the RetinaFace ``label.txt`` (``# relative/path.jpg`` then one line per face: ``x y w h`` followed
  by five ``x y flag`` landmark triples and a trailing value; a 4-number line or ``-1`` landmarks
  mean "no landmarks", label -1, else label 1);
* the official ``wider_face_*_bbx_gt.txt`` (image name, face count, then per face
  ``x y w h blur expression illumination invalid occlusion pose``; a count of 0 is followed by one
  dummy line). These faces have no landmarks (label -1).

Boxes follow the original's convention: ``x y w h`` -> ``x1=x, y1=y, x2=x+w, y2=y+h`` (pixels).
Images listed without faces are kept as pure negatives. Bad lines, NaNs, non-positive sizes, boxes
outside the image and missing/unreadable images are logged with file and line, skipped and counted
in a :class:`ParseReport`; nothing is dropped silently and nothing is fatal.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from retinaface_jax.image_header import image_file_size

log = logging.getLogger(__name__)

# Landmark x/y columns of a RetinaFace label line (after x y w h): triples (x, y, flag).
_LANDMARK_COLS = np.array([4, 5, 7, 8, 10, 11, 13, 14, 16, 17])
_NUM_LABEL_TXT_FIELDS = (4, 19, 20)  # boxes only; box + 5 triples; box + 5 triples + trailing
_NUM_BBX_GT_FIELDS = 10
LOGGED_PER_KIND = 20  # skipped items logged one by one per kind; the rest are only counted
FORMAT_HELP = (
    "expected a RetinaFace label.txt ('# <event>/<name>.jpg' lines, each followed by one line "
    "per face: x y w h and five landmark 'x y flag' triples) or a wider_face_*_bbx_gt.txt"
)


@dataclasses.dataclass(frozen=True, eq=False)
class FaceRecord:
    """One image and its faces, in original pixel coordinates.

    ``boxes`` float32 [N,4] (x1,y1,x2,y2); ``landmarks`` float32 [N,10] (x,y of left eye, right eye,
    nose, left mouth corner, right mouth corner; zeros where absent); ``labels`` float32 [N]
    (1 = has landmarks, -1 = box only). ``size`` is (height, width) when known, else None.
    """

    path: str
    boxes: np.ndarray
    landmarks: np.ndarray
    labels: np.ndarray
    size: tuple[int, int] | None = None

    @property
    def num_faces(self) -> int:
        return int(self.boxes.shape[0])


@dataclasses.dataclass(frozen=True)
class Issue:
    """A skipped item: the file and 1-based line it came from, what kind of problem, and details."""

    file: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.message}"


@dataclasses.dataclass
class ParseReport:
    """What was read and what was skipped (every skipped item is listed in ``issues``)."""

    source: str
    images: int = 0
    faces: int = 0
    empty_images: int = 0
    issues: list[Issue] = dataclasses.field(default_factory=list)
    _logged: Counter[str] = dataclasses.field(default_factory=Counter, repr=False, compare=False)

    def add(self, file: str | Path, line: int, kind: str, message: str) -> None:
        """Record a skipped item; the first ``LOGGED_PER_KIND`` of each kind are also logged (a
        wrong file must not bury the final error under thousands of lines)."""
        issue = Issue(str(file), line, kind, message)
        self.issues.append(issue)
        self._logged[kind] += 1
        if self._logged[kind] <= LOGGED_PER_KIND:
            log.warning("skipped %s", issue)
        if self._logged[kind] == LOGGED_PER_KIND:
            log.warning("%s: further %s items are counted, not logged", self.source, kind)

    @property
    def counts(self) -> Counter[str]:
        """Number of skipped items per kind (e.g. ``{'bad_line': 2, 'missing_image': 1}``)."""
        return Counter(i.kind for i in self.issues)

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        return (
            f"{self.source}: {self.images} images ({self.empty_images} without faces), "
            f"{self.faces} faces; skipped: {kinds}"
        )


@dataclasses.dataclass
class _Entry:
    """An image header seen in an annotation file, with the faces parsed so far."""

    name: str
    line: int
    rows: list[tuple[int, np.ndarray, float]] = dataclasses.field(default_factory=list)


def load_records(
    label_file: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: bool = True,
) -> tuple[list[FaceRecord], ParseReport]:
    """Read a ``label.txt`` or ``wider_face_*_bbx_gt.txt`` file (``# path`` lines mean label.txt).

    ``image_root`` defaults to ``<label dir>/images``. With ``check_images`` each image's header is
    read: missing/unreadable images are skipped and faces outside the image are dropped (both
    reported). Returns the records and a :class:`ParseReport`; a summary is logged.
    """
    label_file = Path(label_file)
    root = Path(image_root) if image_root is not None else label_file.parent / "images"
    report = ParseReport(source=str(label_file))
    try:
        text = label_file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {label_file}: cannot be read as text ({e})") from e
    lines = text.splitlines()
    if any(s.lstrip().startswith("#") for s in lines):  # bbx_gt files have no '#' lines
        entries = _parse_label_txt(lines, label_file, report)
    else:
        entries = _parse_bbx_gt(lines, label_file, report)
    records = []
    for entry in entries:
        record = _make_record(entry, root, label_file, report, check_images)
        if record is not None:
            records.append(record)
    report.images = len(records)
    report.faces = sum(r.num_faces for r in records)
    report.empty_images = sum(r.num_faces == 0 for r in records)
    log.info("%s", report.summary())
    return records, report


def load_training_records(
    label_file: str | Path, image_root: str | Path | None = None
) -> tuple[list[FaceRecord], ParseReport]:
    """:func:`load_records`, but a file that yields no usable image is a ``ValueError`` saying
    why (wrong format, or images not where the layout puts them)."""
    records, report = load_records(label_file, image_root)
    if not records:
        root = Path(image_root) if image_root is not None else Path(label_file).parent / "images"
        raise ValueError(no_usable_images(report, root))
    return records, report


def no_usable_images(report: ParseReport, image_root: Path) -> str:
    """Why ``report``'s file gave no training image, and what the file or layout should be."""
    counts = report.counts
    if not counts:
        return f"{report.source}: no images listed; {FORMAT_HELP}"
    first = report.issues[0]
    if set(counts) <= {"missing_image", "unreadable_image"}:
        return (
            f"{report.source}: none of the {len(report.issues)} images it lists could be read "
            f"under {image_root.resolve()} (first: {first.message}); the images must be at "
            "images/<event>/<name>.jpg beside the label file, the path each '# ' line names"
        )
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return (
        f"{report.source}: no usable training images (skipped: {kinds}; first: {first}); "
        f"{FORMAT_HELP}"
    )


def _parse_floats(tokens: Sequence[str]) -> np.ndarray | None:
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        return None


def _parse_label_txt(lines: list[str], file: Path, report: ParseReport) -> list[_Entry]:
    entries: list[_Entry] = []
    for lineno, raw in enumerate(lines, start=1):
        s = raw.strip()
        if not s:
            continue
        if s.startswith("#"):
            name = s[1:].strip()
            if not name:
                report.add(file, lineno, "bad_line", "image header '#' without a path")
                entries.append(_Entry("", lineno))  # its faces are skipped with the header
            else:
                entries.append(_Entry(name, lineno))
            continue
        if not entries:
            report.add(file, lineno, "bad_line", "face line before any '# path' image header")
            continue
        values = _parse_floats(s.split())
        if values is None or values.size not in _NUM_LABEL_TXT_FIELDS:
            report.add(
                file,
                lineno,
                "bad_line",
                f"expected 4, 19 or 20 numbers (x y w h [5 x y flag triples] [score]), got {s!r}",
            )
            continue
        if values.size == 4:
            landmarks, label = np.zeros(10), -1.0
        else:
            landmarks = values[_LANDMARK_COLS]
            # the original: first landmark x < 0 (the -1 placeholder) means "no landmarks"
            label = -1.0 if landmarks[0] < 0 else 1.0
            if label < 0:
                landmarks = np.zeros(10)
        entries[-1].rows.append((lineno, np.concatenate([values[:4], landmarks]), label))
    return entries


def _parse_bbx_gt(lines: list[str], file: Path, report: ParseReport) -> list[_Entry]:
    entries: list[_Entry] = []
    i, n = 0, len(lines)
    while i < n:
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        header_line = i + 1
        count_text = lines[i + 1].strip() if i + 1 < n else ""
        try:
            count = int(count_text)
            if count < 0:
                raise ValueError
        except ValueError:
            report.add(
                file,
                header_line + 1,
                "bad_line",
                f"expected the face count of {name!r} (an integer >= 0), got {count_text!r}",
            )
            # resynchronise: skip to the next line that looks like an image path
            i += 1
            while i < n and not lines[i].strip().lower().endswith((".jpg", ".jpeg", ".png")):
                i += 1
            continue
        entry = _Entry(name, header_line)
        entries.append(entry)
        i += 2
        if count == 0:  # one dummy line of zeros follows
            if i < n and _parse_floats(lines[i].split()) is not None:
                i += 1
            continue
        for _ in range(count):
            if i >= n:
                report.add(file, i, "bad_line", f"{name!r}: file ended before its {count} faces")
                break
            lineno, s = i + 1, lines[i].strip()
            i += 1
            values = _parse_floats(s.split())
            if values is None or values.size < 4 or values.size > _NUM_BBX_GT_FIELDS:
                report.add(
                    file,
                    lineno,
                    "bad_line",
                    f"expected x y w h blur expression illumination invalid occlusion pose, "
                    f"got {s!r}",
                )
                continue
            entry.rows.append((lineno, np.concatenate([values[:4], np.zeros(10)]), -1.0))
    return entries


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image header (decoded only for formats whose header we do not
    read), or None when missing/unreadable."""
    if not path.is_file():
        return None
    try:
        size = image_file_size(path)
    except OSError:
        return None
    if size is None:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        return None if img is None else (int(img.shape[0]), int(img.shape[1]))
    width, height = size
    return int(height), int(width)


def _make_record(
    entry: _Entry, root: Path, file: Path, report: ParseReport, check_images: bool
) -> FaceRecord | None:
    if not entry.name:
        for lineno, _, _ in entry.rows:
            report.add(file, lineno, "bad_line", "face of an image header without a path")
        return None
    path = root / entry.name
    size = None
    if check_images:
        size = _image_size(path)
        if size is None:
            kind = "missing_image" if not path.is_file() else "unreadable_image"
            report.add(file, entry.line, kind, f"{path} ({len(entry.rows)} faces skipped with it)")
            return None
    boxes, landmarks, labels = [], [], []
    for lineno, values, label in entry.rows:
        x, y, w, h = values[:4]
        if not np.all(np.isfinite(values)):
            report.add(file, lineno, "nan", f"{entry.name}: non-finite value in {values.tolist()}")
            continue
        if w <= 0 or h <= 0:
            report.add(file, lineno, "non_positive_size", f"{entry.name}: w={w:g} h={h:g}")
            continue
        x1, y1, x2, y2 = x, y, x + w, y + h
        if size is not None:
            height, width = size
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                report.add(
                    file,
                    lineno,
                    "outside_image",
                    f"{entry.name}: box ({x1:g},{y1:g},{x2:g},{y2:g}) not inside the "
                    f"{width}x{height} image",
                )
                continue
        boxes.append((x1, y1, x2, y2))
        landmarks.append(values[4:14])
        labels.append(label)
    return FaceRecord(
        path=str(path),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        landmarks=np.asarray(landmarks, np.float32).reshape(-1, 10),
        labels=np.asarray(labels, np.float32).reshape(-1),
        size=size,
    )
