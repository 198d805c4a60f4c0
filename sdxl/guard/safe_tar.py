"""Tar reading with bounded header parsing, for every archive a client sends.

Python's tarfile reads a PAX extended header or a GNU long-name/long-link block into memory whole, before any
caller sees the member: a 45 KB .tar.xz can carry a 300 MB header. CappedTarInfo checks each such header's declared
size against MAX_HEADER_BYTES before tarfile reads it, bounds how many of them may precede one member and how much
global PAX state may pile up, and refuses negative sizes (base-256; Python 3.11.7's tarfile loops on them) and sparse files (their maps are read from the data blocks, unbounded).

xz has a second amplifier: the decoder allocates, and fills as output flows, the dictionary the file's header asks
for, up to 4 GiB; lzma.LZMAFile sets no memory limit. A .tar.xz is read here with liblzma's limit instead.
"""

from __future__ import annotations

import _compression  # the stdlib's own decompressing reader (gzip, bz2 and lzma use it); LZMAFile takes no memlimit
import io
import lzma
import tarfile
import zlib
from pathlib import Path

MAX_HEADER_BYTES = 64 << 10  # one PAX header or GNU long name; real ones are a few hundred bytes
MAX_XZ_MEMORY = 256 << 20  # liblzma decoder memory; xz -9 needs 65 MiB, a 183 KB hostile .tar.xz asked for 1.5 GiB
MAX_HEADER_CHAIN = 8  # extension headers in a row before one member (PAX + long name + long link is 3)
EXTENSION_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
EXTENSION_TYPES += (tarfile.SOLARIS_XHDTYPE,)
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class TarHeaderRefused(tarfile.TarError):
    """A header too large or of a kind we do not read. Not a tarfile.HeaderError: tarfile would take one of those,
    after the first member, for the end of the archive and stop silently."""


def _global_pax_bytes(tar: tarfile.TarFile) -> int:
    return sum(len(key) + len(value) for key, value in tar.pax_headers.items())


class CappedTarInfo(tarfile.TarInfo):
    """Pass as tarfile.open(..., tarinfo=CappedTarInfo); every member header goes through _proc_member."""

    def _proc_member(self, tar: tarfile.TarFile):
        if self.size < 0:  # base-256 sizes can be negative: tarfile then steps back and loops (CVE-2025-8194)
            raise TarHeaderRefused(f"has a header with a negative size ({self.size:,}) for {self.name!r}")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise TarHeaderRefused(f"holds a sparse file {self.name!r}; only regular files and folders are allowed")
        if self.type not in EXTENSION_TYPES:
            return super()._proc_member(tar)
        if self.size > MAX_HEADER_BYTES:
            raise TarHeaderRefused(
                f"has an extended header of {self.size:,} bytes; at most {MAX_HEADER_BYTES:,} bytes are allowed"
            )
        if self.type == tarfile.XGLTYPE and _global_pax_bytes(tar) + self.size > MAX_HEADER_BYTES:
            raise TarHeaderRefused(f"has global headers of more than {MAX_HEADER_BYTES:,} bytes in all")
        depth = getattr(tar, "_extension_depth", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise TarHeaderRefused(f"has more than {MAX_HEADER_CHAIN} extended headers in a row")
        tar._extension_depth = depth + 1  # tarfile recurses into the next header from inside this one
        try:
            return super()._proc_member(tar)
        finally:
            tar._extension_depth = depth

    # Sparse maps in PAX headers (GNU formats 0.0, 0.1, 1.0): 1.0 reads its map from the data blocks, unbounded.
    def _proc_gnusparse_00(self, next, *_):
        raise TarHeaderRefused(f"holds a sparse file {next.name!r}; only regular files and folders are allowed")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def compression(path: Path) -> str | None:
    """The compression a file's first bytes announce ('gzip', 'bzip2', 'xz', 'zstd'), or None."""
    with open(path, "rb") as file:
        head = file.read(8)
    return next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


class _XzDecompressor:
    """lzma.LZMADecompressor with a memory limit whose refusal says what it is."""

    def __init__(self):
        self._decompressor = lzma.LZMADecompressor(memlimit=MAX_XZ_MEMORY)

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        try:
            return self._decompressor.decompress(data, max_length)
        except lzma.LZMAError as error:
            if "memory" not in str(error).lower():
                raise
            raise TarHeaderRefused(
                f"is xz-compressed with a dictionary that needs more than {MAX_XZ_MEMORY >> 20} MiB to decompress "
                "(xz -9 needs 65 MiB); compress it with a smaller preset"
            ) from None

    def __getattr__(self, name):  # eof, unused_data, needs_input
        return getattr(self._decompressor, name)


class _XzFile(io.BufferedReader):
    def __init__(self, path: Path):
        self._compressed = open(path, "rb")  # noqa: SIM115 (closed in close)
        reader = _compression.DecompressReader(self._compressed, _XzDecompressor, trailing_error=lzma.LZMAError)
        super().__init__(reader)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._compressed.close()


def open_tar(path: Path, mode: str = "r:*") -> tarfile.TarFile:
    """tarfile.open with capped headers (and an xz memory limit). Raises TarHeaderRefused for a hostile header (also
    in the first member, which tarfile reads while opening), tarfile.ReadError for what is not a tar."""
    if mode != "r:*" or compression(path) != "xz":
        return tarfile.open(path, mode=mode, tarinfo=CappedTarInfo)
    stream = _XzFile(path)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=CappedTarInfo)
    except BaseException:
        stream.close()
        raise
    tar._extfileobj = False  # closing the tar closes the stream, as tarfile's own xzopen arranges
    return tar


def is_tar(path: Path, mode: str = "r:*") -> bool:
    """tarfile.is_tarfile without its unbounded first header: False for what is not a tar; a hostile header still
    raises TarHeaderRefused (a tar, but one we refuse)."""
    try:
        with open_tar(path, mode):
            return True
    except TarHeaderRefused:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error):
        return False
