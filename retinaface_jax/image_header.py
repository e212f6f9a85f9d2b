"""Image sizes from file headers, without decoding: a small file can claim a huge image, and
decoding it to find out costs the memory the pixel cap exists to protect. Also the fast way to
learn the sizes of a whole training set.

Formats read: PNG, JPEG, GIF, BMP, WebP, TIFF, PNM/PAM/PFM, Sun raster, Radiance HDR,
JPEG 2000 and AVIF. Anything else (or a damaged header) gives None: the caller decodes.
"""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO

_HEADER_BYTES = 1 << 16
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def _gif_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", head[6:10])
    return None


def _bmp_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    if head[:2] != b"BM" or len(head) < 26:
        return None
    if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", head[18:22])
    w, h = struct.unpack("<ii", head[18:26])
    return abs(w), abs(h)  # negative height: rows stored top-down


def _webp_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
        return None
    kind = head[12:16]
    if kind == b"VP8 ":  # lossy: 14-bit sizes after the start code
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L":  # lossless: 14-bit (size - 1) fields packed after the signature
        bits = struct.unpack("<I", head[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":  # extended: 24-bit (canvas size - 1)
        return (
            int.from_bytes(head[24:27], "little") + 1,
            int.from_bytes(head[27:30], "little") + 1,
        )
    return None


def _pnm_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """PBM/PGM/PPM (P1-P6), PAM (P7) and PFM (PF/Pf): sizes are ASCII numbers after the magic."""
    if (
        len(head) < 3
        or head[0:1] != b"P"
        or head[1:2] not in b"1234567fF"
        or not head[2:3].isspace()
    ):
        return None
    text = re.sub(rb"#[^\n]*", b"", head[2:4096])
    if head[1:2] == b"7":
        w, h = re.search(rb"WIDTH\s+(\d+)", text), re.search(rb"HEIGHT\s+(\d+)", text)
        return (int(w[1]), int(h[1])) if w and h else None
    tokens = text.split()
    if len(tokens) < 2 or not (tokens[0].isdigit() and tokens[1].isdigit()):
        return None
    return int(tokens[0]), int(tokens[1])


def _sunras_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    if head[:4] == b"\x59\xa6\x6a\x95" and len(head) >= 12:
        return struct.unpack(">II", head[4:12])
    return None


def _hdr_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """Radiance HDR: a text header, a blank line, then e.g. ``-Y 480 +X 640``."""
    if not head.startswith((b"#?RADIANCE", b"#?RGBE")):
        return None
    m = re.search(rb"\n\n?([-+])([XY]) (\d+) ([-+])([XY]) (\d+)", head[:4096])
    if m is None:
        return None
    first, second = int(m[3]), int(m[6])
    return (second, first) if m[2] == b"Y" else (first, second)


def _jp2_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """JPEG 2000: the ``ihdr`` box of a .jp2 file, or the SIZ marker of a bare codestream."""
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        i = head.find(b"ihdr")
        if i >= 0 and len(head) >= i + 12:
            h, w = struct.unpack(">II", head[i + 4 : i + 12])
            return w, h
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 24:
        x, y, x0, y0 = struct.unpack(">IIII", head[8:24])
        return x - x0, y - y0
    return None


def _avif_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """AVIF/HEIF: the largest ``ispe`` (image spatial extents) property in the header."""
    if head[4:8] != b"ftyp" or not any(b in head[8:64] for b in (b"avif", b"avis", b"heic")):
        return None
    sizes = [
        struct.unpack(">II", head[i + 8 : i + 16])
        for i in (m.start() for m in re.finditer(b"ispe", head))
        if len(head) >= i + 16
    ]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def _jpeg_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """JPEG: walk the marker segments (EXIF etc. can be long) up to the start-of-frame."""
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    for _ in range(10_000):
        f.seek(pos)
        seg = f.read(9)
        if len(seg) < 2 or seg[0] != 0xFF:
            return None
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
        elif len(seg) < 9:
            return None
        elif marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", seg[5:9])
            return w, h
        else:
            pos += 2 + struct.unpack(">H", seg[2:4])[0]
    return None


def _tiff_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """TIFF: ImageWidth (256) and ImageLength (257) of the first image file directory."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(head[:4])
    if order is None:
        return None
    f.seek(struct.unpack(order + "I", head[4:8])[0])
    count = f.read(2)
    if len(count) < 2:
        return None
    entries = f.read(12 * min(struct.unpack(order + "H", count)[0], 4096))
    dims = {}
    for i in range(0, len(entries) - 11, 12):
        tag, kind = struct.unpack(order + "HH", entries[i : i + 4])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"  # SHORT or LONG, left-justified in the value field
            dims[tag] = struct.unpack(order + fmt, entries[i + 8 : i + 8 + struct.calcsize(fmt)])[0]
    return (dims[256], dims[257]) if len(dims) == 2 else None


_SIZE_READERS = (
    _png_size,
    _jpeg_size,
    _gif_size,
    _bmp_size,
    _webp_size,
    _tiff_size,
    _pnm_size,
    _sunras_size,
    _hdr_size,
    _jp2_size,
    _avif_size,
)


def image_file_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` read from the file's header without decoding it, for PNG, JPEG, GIF,
    BMP, WebP, TIFF, PNM/PAM/PFM, Sun raster, Radiance HDR, JPEG 2000 and AVIF; None otherwise
    (or for a damaged header). Raises OSError if the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        for reader in _SIZE_READERS:
            try:
                size = reader(head, f)
            except (struct.error, ValueError, OverflowError):
                size = None
            if size is not None:
                return int(size[0]), int(size[1])
    return None
