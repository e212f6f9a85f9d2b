"""Parsing one numeric row of the evaluation text formats, with an error naming file and line."""

from __future__ import annotations

from pathlib import Path


def parse_row(
    line: str, n: int, path: Path, lineno: int, expected: str, context: str = ""
) -> list[float]:
    """The first ``n`` numbers of ``line`` (extra fields are ignored, as the original does)."""
    fields = line.split()
    try:
        if len(fields) < n:
            raise ValueError
        return [float(v) for v in fields[:n]]
    except ValueError:
        raise ValueError(
            f"{path}: line {lineno}: expected '{expected}'{context}, got {line.strip()!r}"
        ) from None
