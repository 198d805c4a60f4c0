"""Builders of hostile archives and weights for the hardening tests: built in the test, streamed, never committed."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import struct
import tarfile
import zlib
from pathlib import Path

BLOCK = 512


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, tarfile.REGTYPE, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def header_bomb_chunks(header_bytes: int, kind: bytes = tarfile.XHDTYPE, chunk: int = 1 << 20):
    """A tar whose first member carries an extension header (PAX by default, or a GNU long name) of `header_bytes`,
    yielded in pieces so a 300 MB header never sits in the test's memory either."""
    yield _header(
        "././@PaxHeader" if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE) else "././@LongLink", kind, header_bytes
    )
    if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):  # one well-formed record: "<length> comment=xxxx...\n"
        digits = len(str(header_bytes))
        prefix = f"{header_bytes} comment=".encode()
        assert len(prefix) == digits + 9
        yield prefix
        left = header_bytes - len(prefix) - 1
    else:
        left = header_bytes
    while left > 0:
        yield b"x" * min(chunk, left)
        left -= chunk
    if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
        yield b"\n"
    yield b"\0" * (-header_bytes % BLOCK)
    yield _member("lora.safetensors", b"data")
    yield b"\0" * (2 * BLOCK)


def compressed(chunks, how: str) -> bytes:
    compressor = {
        "xz": lambda: lzma.LZMACompressor(preset=6),
        "gz": lambda: _GzipCompressor(),
        "bz2": lambda: bz2.BZ2Compressor(9),
        "plain": lambda: _Plain(),
    }[how]()
    out = io.BytesIO()
    for piece in chunks:
        out.write(compressor.compress(piece))
    out.write(compressor.flush())
    return out.getvalue()


class _Plain:
    def compress(self, data):
        return data

    def flush(self):
        return b""


class _GzipCompressor:
    def __init__(self):
        self._z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip wrapper

    def compress(self, data):
        return self._z.compress(data)

    def flush(self):
        return self._z.flush()


def big_dictionary_xz(data: bytes, dict_byte: int = 37) -> bytes:
    """`data` as .xz whose block header asks the decoder for a 1.5 GiB dictionary (LZMA2 property byte 37), its CRC
    fixed. Compressed with a 1 MiB dictionary, it decodes the same with any larger one: 1.2 GB of zero bytes in such
    a 183 KB .tar.xz cost 1.2 GB of resident memory through tarfile (measured)."""
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}])
    out = bytearray(compressor.compress(data) + compressor.flush())
    size = (out[12] + 1) * 4  # the block header follows the 12-byte stream header
    assert out[14:16] == b"\x21\x01", "one LZMA2 filter with one property byte"
    out[16] = dict_byte
    out[12 + size - 4 : 12 + size] = struct.pack("<I", zlib.crc32(bytes(out[12 : 12 + size - 4])))
    return bytes(out)


def header_chain(count: int) -> bytes:
    """`count` small PAX headers in a row before one member (tarfile recurses once per header)."""
    record = b"20 comment=aaaaaaaa\n"
    one = _header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record + b"\0" * (BLOCK - len(record))
    return one * count + _member("a.png", b"data") + b"\0" * (2 * BLOCK)


def sparse_member() -> bytes:
    return _header("a.png", tarfile.GNUTYPE_SPARSE, 4) + b"data" + b"\0" * 508 + b"\0" * (2 * BLOCK)


def claimed_size_tar(files: dict[str, bytes], name: str, claimed: int) -> bytes:
    """A tar whose last member's header claims `claimed` bytes and ends there: its data is never sent, so only a
    check of the header's size (before a byte is read) can answer anything but "truncated"."""
    body = b"".join(_member(n, d) for n, d in files.items())
    return body + _header(name, tarfile.REGTYPE, claimed) + b"{}"


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def safetensors_header_only(length: int) -> bytes:
    """A file whose safetensors header is `length` bytes of JSON whitespace."""
    return struct.pack("<Q", length) + b" " * length


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
