"""Per-channel sums over batch and space, in a form XLA's CPU backend runs in a few memory passes.

Training needs many sums of full-size NHWC tensors over ``(N, H, W)``: the depthwise kernel
gradient (one per kernel tap), the BatchNorm batch statistics and the BatchNorm backward
(``sum(g)``, ``sum(g * xhat)``). Written as ``jnp.sum(a * b, axis=(0, 1, 2))``, XLA's CPU
reductions are slow for these shapes: with YNNPACK (XLA's default) the operands are first
materialised, shifted views included; with XLA's own reduction emitter (under
``retinaface_jax.compiler_options()``) the train step was slower still. :func:`channel_sums` instead
- adds ``ROW_GROUP`` rows of every term in one elementwise loop (XLA fuses the slices and products
  into it, and splits it over the CPU threads), so no full-size operand is stored, then
- reduces the ``ROW_GROUP``-times smaller partials with a matrix-vector product against ones (a
  plain ``jnp.sum`` there let XLA fuse the two stages back together).
This makes the mobilenet0.25 train step faster on CPU, under XLA's default options and under
``retinaface_jax.compiler_options()``. GPU
and TPU fuse a product into its reduction anyway and take the plain sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

ROW_GROUP = 4  # rows added per element by the elementwise first stage


def _row_chunks(h: int) -> list[tuple[int, int, int]]:
    """``(start, stop, group)`` row ranges covering ``0..h``, each a whole number of groups."""
    full = h - h % ROW_GROUP
    chunks = [(0, full, ROW_GROUP)] if full else []
    if h % ROW_GROUP:
        chunks.append((full, h, h - full))
    return chunks


def _sum_leading(p: jax.Array) -> jax.Array:
    """Sum over the first three axes as ``ones @ p`` (a dot, so XLA keeps ``p``'s loop separate)."""
    rows = math.prod(p.shape[:3])
    ones = jnp.ones((1, rows), p.dtype)
    return (ones @ p.reshape(rows, -1)).reshape(p.shape[3:])


def channel_sums(
    terms: Callable[[slice], Sequence[jax.Array]], h: int, row_first: bool | None = None
) -> list[jax.Array]:
    """``[sum over (N, H, W) of t for t in terms(all rows)]`` for NHWC terms with ``h`` rows.

    ``terms(rows)`` must return the terms restricted to the rows ``rows`` (a ``slice``), e.g.
    ``lambda r: [g[:, r], g[:, r] * x[:, r]]``; it is called ``ROW_GROUP`` times with strided
    slices. ``row_first`` (default: on the CPU backend) chooses the row-grouped form; otherwise
    this is the plain ``jnp.sum`` of ``terms(slice(None))``.
    """
    if row_first is None:
        row_first = jax.default_backend() == "cpu"
    if not row_first:
        return [jnp.sum(t, axis=(0, 1, 2)) for t in terms(slice(None))]
    totals: list[jax.Array] | None = None
    for start, stop, group in _row_chunks(h):
        partial: list[jax.Array] | None = None
        for k in range(group):
            new = list(terms(slice(start + k, stop, group)))
            partial = new if partial is None else [p + t for p, t in zip(partial, new)]
        sums = [_sum_leading(p) for p in partial]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
    if totals is None:
        raise ValueError(f"channel_sums: need at least one row, got h={h}")
    return totals
