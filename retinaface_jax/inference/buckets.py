"""Size buckets: a small set of padded input shapes, so mixed-size photos reuse compiled programs.

Rule (per side, in network-input pixels after any resize): round up to a multiple of
``step(s) = max(32, 2**floor(log2(s)) / 8)`` — 32 below 512 px, 64 in [512, 1024), 128 in
[1024, 2048), 256 in [2048, 4096), ... — i.e. at most 8 buckets per octave, padding at most 12.5 %
per side. Every bucket side is a multiple of 32 (the coarsest FPN stride), so each pyramid level of
the padded input is exactly twice the next one; together with zeroing the padded region before every
padded convolution (``backends.padded_region``) the detections inside the original extent are
identical to an unpadded run (tests: padded vs unpadded).

Batches: ``Detector.detect_batch`` groups images by bucket and runs full batches of ``batch_size``
and the remainder one image at a time, so each bucket compiles at most two programs.
``bucket_batch`` (next power of two) pads batches handed directly to ``Detector.run_prepared``.
"""

from __future__ import annotations

import math

MIN_STEP = 32


def bucket_side(size: int) -> int:
    """The padded length for one image side of ``size`` pixels (see module docstring)."""
    if size <= 0:
        raise ValueError(f"bucket_side: size must be positive, got {size}")
    step = max(MIN_STEP, (1 << (int(size).bit_length() - 1)) // 8)
    return int(math.ceil(size / step) * step)


def bucket_shape(height: int, width: int, exact: bool = False) -> tuple[int, int]:
    """The padded ``(H, W)`` for an input of ``(height, width)``; ``exact`` means no padding."""
    if exact:
        return int(height), int(width)
    return bucket_side(height), bucket_side(width)


def bucket_batch(n: int, batch_size: int) -> int:
    """The padded batch length for ``n`` images: next power of two, capped at ``batch_size``."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"bucket_batch: n and batch_size must be positive, got {n}, {batch_size}")
    return min(1 << (n - 1).bit_length(), max(batch_size, n))
