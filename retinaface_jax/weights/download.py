"""Official weights that fetch and verify themselves, cached under the user cache dir.

Resolution order for :func:`resolve_weights` (used by ``Detector.from_pretrained`` and the CLI):
1. an explicit path (``source`` / ``--weights``): a ``.pth``/``.tar`` file or a native checkpoint dir;
2. ``$RETINAFACE_WEIGHTS`` (a path) when ``source`` is a backbone name;
3. the cache dir (``$RETINAFACE_CACHE``, default ``~/.cache/retinaface_jax``): the converted native
   checkpoint ``native/<backbone>/`` if present, else the verified original file;
4. a download of the original file from the GitHub release that re-hosts it (xinntao/facexlib
   v0.1.0; base URL overridable by ``base_url`` or ``$RETINAFACE_WEIGHTS_URL``).

Downloads stream to a temporary file in the cache dir with a tqdm progress bar, check the size and
sha256, and only then ``os.replace`` it into place: a failure never leaves a partial file behind.
Nothing touches the network when the weights are already available.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from retinaface_jax.user_cache import cache_dir

DEFAULT_BASE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
CHUNK = 1 << 16


class WeightsError(RuntimeError):
    """Weights could not be found, downloaded or verified (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """An official weight file: release file name, exact size in bytes and sha256."""

    backbone: str
    filename: str
    size: int
    sha256: str


OFFICIAL = {
    "mobilenet0.25": WeightFile(
        "mobilenet0.25",
        "detection_mobilenet0.25_Final.pth",
        1_789_735,
        "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
    ),
    "resnet50": WeightFile(
        "resnet50",
        "detection_Resnet50_Final.pth",
        109_497_761,
        "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
    ),
}


def official_name(source: str) -> str | None:
    """The canonical backbone name if ``source`` names an official model, else None."""
    from retinaface_jax.config import canonical_backbone

    return canonical_backbone(source)


def native_dir(backbone: str, cache: Path | None = None) -> Path:
    """Where the converted native checkpoint of an official model is cached."""
    return (cache or cache_dir()) / "native" / backbone


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    size: int | None = None,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``size`` and ``sha256`` when given.

    Raises :class:`WeightsError` (network failure, HTTP error, truncated transfer, size or hash
    mismatch); the temporary file is always removed and ``dest`` is only created on success.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        got = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                fd = -1
                total = size or int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"downloading {dest.name}",
                    disable=not progress,
                    leave=False,
                ) as bar:
                    while block := resp.read(CHUNK):
                        out.write(block)
                        h.update(block)
                        got += len(block)
                        bar.update(len(block))
        # ``from None``: the message says everything; a chain of urllib tracebacks does not help
        except urllib.error.HTTPError as e:
            raise WeightsError(_download_failed(url, dest, f"HTTP {e.code} {e.reason}")) from None
        except urllib.error.URLError as e:
            raise WeightsError(
                _download_failed(url, dest, f"cannot reach it: {e.reason}")
            ) from None
        except (OSError, ValueError) as e:  # connection reset, IncompleteRead, timeout
            why = f"failed after {got} bytes: {str(e) or type(e).__name__}"
            raise WeightsError(_download_failed(url, dest, why)) from None
        if size is not None and got != size:
            raise WeightsError(
                f"download of {url} is incomplete or wrong: got {got} bytes, expected {size}"
            )
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise WeightsError(
                f"download of {url} has sha256 {digest}, expected {sha256}: refusing the file"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _download_failed(url: str, dest: Path, why: str) -> str:
    """A self-contained message: what failed, why, and how to do without the download."""
    return (
        f"could not download the weights file {dest.name} from {url} ({why}). Check the "
        f"network, or download {dest.name} yourself and pass its path with --weights PATH "
        f"(or $RETINAFACE_WEIGHTS), or put it in the cache as {dest}"
    )


def _verify_cached(path: Path, spec: WeightFile) -> bool:
    """A cached original file is used only if its size and sha256 are right (else re-fetched)."""
    return path.is_file() and path.stat().st_size == spec.size and sha256_of(path) == spec.sha256


def resolve_weights(
    source: str | os.PathLike = "mobilenet0.25",
    *,
    base_url: str | None = None,
    cache: Path | None = None,
    progress: bool = True,
    prefer_native: bool = True,
) -> Path:
    """A local path for ``source`` (file or native dir), downloading the official file if needed.

    See the module docstring for the order. ``prefer_native=False`` returns the original file even
    when a converted native checkpoint is cached.
    """
    name = official_name(str(source)) if isinstance(source, str) else None
    if name is None:
        path = Path(source).expanduser()
        if not path.exists():
            raise WeightsError(
                f"weights {str(source)!r}: no such file or directory, and not an official model "
                f"name (expected one of {sorted(OFFICIAL)} or a path)"
            )
        return path
    env = os.environ.get("RETINAFACE_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise WeightsError(f"$RETINAFACE_WEIGHTS={env!r}: no such file or directory")
        return path
    spec = OFFICIAL[name]
    root = Path(cache) if cache is not None else cache_dir()
    native = native_dir(name, root)
    if prefer_native and (native / "config.toml").is_file():
        return native
    local = root / spec.filename
    if _verify_cached(local, spec):
        return local
    base = base_url or os.environ.get("RETINAFACE_WEIGHTS_URL") or DEFAULT_BASE_URL
    url = base.rstrip("/") + "/" + spec.filename
    return download(url, local, spec.size, spec.sha256, progress=progress)
