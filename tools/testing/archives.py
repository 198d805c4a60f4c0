"""Build real zip and tar archives (including hostile ones) and real images for the preprocessing tests."""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def astronaut() -> Image.Image:
    """A real photo with one frontal face (512x512)."""
    return Image.fromarray(data.astronaut())


def two_faces() -> Image.Image:
    """The astronaut twice, side by side: one image, two faces."""
    single = astronaut()
    both = Image.new("RGB", (single.width * 2, single.height))
    both.paste(single, (0, 0))
    both.paste(single, (single.width, 0))
    return both


def cat() -> Image.Image:
    """A real photo without a human face (451x300)."""
    return Image.fromarray(data.chelsea())


def solid(color, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def exif_rotated_jpeg(size=(60, 40)) -> bytes:
    """A landscape JPEG whose EXIF says "rotate 90 degrees clockwise to display": it must load as portrait."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1] // 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return encode(image, "JPEG", exif=exif, quality=95)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels: a decompression bomb that PIL sizes without decoding."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    return path


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def zip_with_symlink(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok.png", encode(solid("red"), "PNG"))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return path


def tar_with_special(path: Path, kind: bytes) -> Path:
    """A tar holding a good image and one entry of type `kind` (SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE, ...)."""
    with tarfile.open(path, "w") as archive:
        payload = encode(solid("red"), "PNG")
        info = tarfile.TarInfo("ok.png")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
        special = tarfile.TarInfo("special.png")
        special.type = kind
        special.linkname = "ok.png" if kind == tarfile.LNKTYPE else "/etc/passwd"
        archive.addfile(special)
    return path


def zeros(count: int) -> bytes:
    return bytes(count)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def unnamed_member_tar(path: Path, size: int, mode: str = "w:bz2") -> Path:
    """A compressed tar whose one file is named '.': bzip2 packs 64 MiB of zeros into ~80 bytes."""
    with tarfile.open(path, mode) as archive:
        info = tarfile.TarInfo(".")
        info.size = size
        archive.addfile(info, io.BytesIO(bytes(size)))
    return path


def negative_size_tar(path: Path) -> Path:
    """A tar whose first member's size is base-256 -512: tarfile's next header would be this one again (the
    negative-offset loop of CVE-2025-8194); it must be refused before tarfile acts on it."""
    make_tar(path, {"a.png": b"x" * 10})
    header = bytearray(path.read_bytes()[:512])
    header[124:136] = b"\xff" + (256**11 - 512).to_bytes(11, "big")  # -512: back onto itself
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    path.write_bytes(bytes(header) + bytes(1024))
    return path


def many_entry_zip(path: Path, count: int, declared: int | None = None) -> Path:
    """A zip of `count` empty stored entries, written directly (zipfile.writestr takes ~10 s for 300,000); its end
    record claims `declared` entries (default: the true count, as far as 16 bits hold it)."""
    local, directory = bytearray(), bytearray()
    for index in range(count):
        name = b"%d" % index
        offset = len(local)
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        directory += struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset
        )
        directory += name
    entries = min(count, 0xFFFF) if declared is None else declared
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, entries, entries, len(directory), len(local), 0)
    path.write_bytes(bytes(local + directory + end))
    return path
