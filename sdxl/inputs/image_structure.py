"""Decode work bounded before decoding: a walk over a JPEG's markers or a PNG's chunks, linear in the file's size.

A decoder's work can grow with more than the pixel count. A progressive JPEG is decoded once per scan (libjpeg
re-reads the whole coefficient buffer each time): a 132 KB 4096 px JPEG whose last scan is repeated 600 times cost
6.7 s of CPU. Pillow reads PNG chunks one by one in Python: 5 MiB of empty chunks cost 1.2 s, 64 MiB would cost 15 s.
Both are counted here (bytes.find and a regex over a memory map, no Python step per byte) and refused past a cap that
real files stay far below.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

# Baseline JPEG has 1 scan (or one per component, 3-4); libjpeg's progressive script writes 10 for colour,
# mozjpeg's optimised scripts up to ~20. 64 leaves room for any encoder and bounds the decode at 64 passes.
MAX_JPEG_SCANS = 64
MAX_JPEG_SEGMENTS = 1024  # headers, tables, APPn/COM: a camera JPEG has ~10-30
# libpng writes 8 KiB IDAT chunks: 64 MiB (the input cap) of them is 8,192 chunks. Pillow writes 64 KiB ones.
MAX_PNG_CHUNKS = 16384
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker after entropy-coded data: not stuffing, RSTn or fill
_STANDALONE = {0xD8, 0x01, *range(0xD0, 0xD8)}  # SOI, TEM, RSTn: no length field


class TooMuchWork(ValueError):
    """The file's structure would cost more decoding work than any real image of its kind."""


def check_structure(path: Path | str, kind: str) -> None:
    """Raise TooMuchWork for a JPEG with too many scans or segments, or a PNG with too many chunks."""
    walk = {"JPEG": _jpeg, "PNG": _png}.get(kind)
    if walk is None:  # WebP: libwebp decodes the first frame only (Pillow reads no further unless seeked)
        return
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walk(data)


def _jpeg(data) -> None:
    position, scans, segments = 2, 0, 0  # after SOI
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # EOI: libjpeg reads no further
            return
        if marker in _STANDALONE:
            position += 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooMuchWork(f"has more than {MAX_JPEG_SEGMENTS} JPEG segments")
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
        if marker == 0xDA:  # SOS: entropy-coded data follows, up to the next real marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooMuchWork(f"is a JPEG of more than {MAX_JPEG_SCANS} scans (progressive passes)")
            found = _MARKER.search(data, position)
            position = found.start() if found else len(data)


def _png(data) -> None:
    position, chunks = 8, 0  # after the signature
    while position + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooMuchWork(f"has more than {MAX_PNG_CHUNKS:,} PNG chunks")
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            return
        position += 12 + length
