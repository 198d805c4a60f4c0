"""Read the uploaded training archive safely: zip or tar told apart by content, hostile entries refused.

Only regular files and folders are extracted, one by one, into a fresh temporary folder that never outlives the
call that made it. Links, devices, paths that leave the folder, too many entries, too many uncompressed bytes and
images with too many pixels (decompression bombs) reject the whole archive with an error naming the entry.
"""

from __future__ import annotations

import csv
import logging
import lzma
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image

from sdxl.errors import InputError
from sdxl.formats import ARCHIVE_TYPES, UPLOAD_CAPTION_COLUMNS, UPLOAD_CAPTIONS_FILE, UPLOAD_IMAGE_COLUMNS
from sdxl.guard.safe_tar import TarHeaderRefused, is_tar, open_tar
from sdxl.inputs.images import ACCEPTED, ImageTooLarge, decode, flatten, open_checked, sniff_format
from sdxl.preprocess.config import DEFAULT_MAX_IMAGES, MAX_IMAGES_ENV, max_training_images
from sdxl.validation import check_choice

log = logging.getLogger(__name__)

ARCHIVE_FIELD = "input_images"
FILETYPE_FIELD = "input_images_filetype"
CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds that keep a hostile upload from filling the disk or the memory."""

    max_entries: int = 10_000
    max_total_bytes: int = 4 << 30  # uncompressed, over all extracted files
    # Per image, read from the header before decoding. Above generation's input cap: phone cameras shoot 50 MP.
    max_image_pixels: int = 8192 * 8192
    # Images kept for training (each is held in memory until the training set is written) and their shape: a
    # long thin image is never shrunk, and its upscaled copy would grow with its length.
    max_images: int = DEFAULT_MAX_IMAGES
    max_aspect_ratio: int = 4
    # caption.csv is parsed into Python objects many times its size: its bytes and each caption are capped.
    max_caption_csv_bytes: int = 1 << 20
    max_caption_chars: int = 1000

    def __post_init__(self):
        for name in (
            "max_entries",
            "max_total_bytes",
            "max_image_pixels",
            "max_images",
            "max_aspect_ratio",
            "max_caption_csv_bytes",
            "max_caption_chars",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ArchiveLimits.{name}: {value!r} is not allowed; use a positive integer")


DEFAULT_LIMITS = ArchiveLimits()


def limits_from_env() -> ArchiveLimits:
    """The default limits with the image cap from SDXL_MAX_TRAINING_IMAGES, if set."""
    return replace(DEFAULT_LIMITS, max_images=max_training_images())


@dataclass(frozen=True)
class Sample:
    """One training image read from the archive."""

    name: str  # its path inside the archive, with "/" separators
    image: Image.Image  # RGB, EXIF rotation applied
    caption: str | None  # from caption.csv, else None (captioned later)


def _reject(message: str) -> InputError:
    return InputError(ARCHIVE_FIELD, message)


# --- which kind of archive ----------------------------------------------------------------------------------------


def _sniff(path: Path) -> str | None:
    """The archive type from the bytes: tar's "ustar" magic, zip's local header, compressed tars, then the
    libraries' own (slower, looser) checks."""
    with open(path, "rb") as file:
        head = file.read(512)
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) and is_tar(path):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    if is_tar(path):  # old v7 tars carry no magic
        return "tar"
    return None


def detect_filetype(path: Path | str, filetype: str = "infer") -> str:
    """'zip' or 'tar'. An explicit `filetype` wins over the content, but must still open as that type."""
    check_choice(FILETYPE_FIELD, filetype, ARCHIVE_TYPES)
    path = Path(path)
    if not path.is_file():
        raise _reject(f"{path} is not a file")
    sniffed = _sniff(path)
    if filetype == "infer":
        if sniffed is None:
            raise _reject("is neither a zip nor a tar archive; upload a .zip or .tar (optionally gzipped) of images")
        return sniffed
    opens = zipfile.is_zipfile(path) if filetype == "zip" else is_tar(path)
    if not opens:
        looks = f"it looks like a {sniffed} archive" if sniffed else "it is not an archive"
        raise _reject(f"is not a {filetype} archive as {FILETYPE_FIELD}={filetype!r} says ({looks}); use 'infer'")
    return filetype


# --- extraction -------------------------------------------------------------------------------------------------


def _safe_relpath(name: str) -> PurePosixPath | None:
    """The entry's path inside the extraction folder, or an error if it would land outside it."""
    if "\x00" in name:
        raise _reject(f"entry {name!r} has a NUL character in its name")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise _reject(f"entry {name!r} has an absolute path; archive entries must be relative")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _reject(f"entry {name!r} escapes the extraction folder ('..' in its path)")
    return PurePosixPath(*parts) if parts else None


class _Budget:
    """Counts entries and uncompressed bytes as they are extracted; declared sizes are not trusted."""

    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise _reject(f"has more than {self.limits.max_entries} entries")

    def spend(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.limits.max_total_bytes:
            raise _reject(f"expands to more than {self.limits.max_total_bytes:,} bytes uncompressed")


def _write(source: BinaryIO, dest: Path, rel: PurePosixPath, budget: _Budget) -> None:
    target = dest.joinpath(*rel.parts)
    if not target.resolve().is_relative_to(dest.resolve()):  # belt and braces over _safe_relpath
        raise _reject(f"entry {str(rel)!r} escapes the extraction folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:  # "x": a duplicate entry never overwrites an earlier one silently
            while chunk := source.read(CHUNK):
                budget.spend(len(chunk))
                out.write(chunk)
    except FileExistsError:
        raise _reject(f"entry {str(rel)!r} appears twice") from None
    except OSError as error:
        raise _reject(f"entry {str(rel)!r} could not be extracted ({error.strerror or error})") from None


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # Unix mode bits, zero when the zip was made elsewhere
    if info.is_dir() or stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits at all: a plain file (zipfile.writestr)
        return "device or special file"
    return "file"


def _extract_entry(name: str, kind: str, open_source, dest: Path, budget: _Budget) -> None:
    """One archive entry: counted, its path checked, refused unless a regular file or a folder; a file is written."""
    budget.entry()
    rel = _safe_relpath(name)
    if kind not in ("file", "dir"):
        raise _reject(f"entry {name!r} is a {kind}; only regular files and folders are allowed")
    if rel is None and kind == "file":  # skipping it would still decompress its bytes, uncounted
        raise _reject(f"entry {name!r} is a file without a name")
    if rel is not None and kind == "file":
        with open_source() as source:
            _write(source, dest, rel, budget)


def _directory_entries(path: Path, limit: int) -> int:
    """The zip's entry count from its end record and a walk over the central directory's fixed-size headers, stopping
    past `limit`: zipfile would read the whole directory into memory and build an object per entry first (300,000
    entries in a 14 MB zip: +94 MiB). The walk, not the end record's count (which may lie), bounds what zipfile reads."""
    with open(path, "rb") as file:
        end = zipfile._EndRecData(file)  # the end record zipfile itself reads (ZIP64 included)
        if end is None:
            raise zipfile.BadZipFile("it has no end of central directory record")
        if end[zipfile._ECD_ENTRIES_TOTAL] > limit:
            return end[zipfile._ECD_ENTRIES_TOTAL]
        location = end[zipfile._ECD_LOCATION]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            location -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        position, count = location - end[zipfile._ECD_SIZE], 0
        while position < location and count <= limit:
            file.seek(max(position, 0))
            header = file.read(46)
            if len(header) < 46 or not header.startswith(b"PK\x01\x02"):
                raise zipfile.BadZipFile("its central directory is corrupt")
            count += 1
            position += 46 + sum(struct.unpack_from("<3H", header, 28))  # name, extra field, comment
    return count


def _extract_zip(path: Path, dest: Path, budget: _Budget) -> None:
    entries = _directory_entries(path, budget.limits.max_entries)
    if entries > budget.limits.max_entries:
        raise _reject(f"has more than {budget.limits.max_entries} entries")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > budget.limits.max_entries:
            raise _reject(f"has {len(infos)} entries; at most {budget.limits.max_entries} are allowed")
        declared = sum(info.file_size for info in infos)
        if declared > budget.limits.max_total_bytes:
            raise _reject(
                f"expands to more than {budget.limits.max_total_bytes:,} bytes uncompressed (it declares {declared:,})"
            )
        for info in infos:
            _extract_entry(info.filename, _zip_kind(info), lambda info=info: archive.open(info), dest, budget)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    return "device or special file"


def _extract_tar(path: Path, dest: Path, budget: _Budget) -> None:
    with open_tar(path, "r:*") as archive:  # extension headers capped before tarfile reads them
        for member in archive:  # streamed: a million-entry tar stops at the limit, not after listing everything
            _extract_entry(
                member.name, _tar_kind(member), lambda member=member: archive.extractfile(member), dest, budget
            )


def extract(path: Path | str, dest: Path, *, filetype: str = "infer", limits: ArchiveLimits = DEFAULT_LIMITS) -> str:
    """Extract the archive's regular files into the existing folder `dest`; returns the type used."""
    try:
        kind = detect_filetype(path, filetype)
    except TarHeaderRefused as error:
        raise _reject(str(error)) from None
    budget = _Budget(limits)
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(Path(path), Path(dest), budget)
    except TarHeaderRefused as error:
        raise _reject(str(error)) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise _reject(f"is a corrupt {kind} archive ({error})") from None
    except (NotImplementedError, RuntimeError) as error:  # a compression method Python lacks; an encrypted zip
        raise _reject(f"uses an unsupported {kind} feature ({error})") from None
    log.info("%s: extracted %d entries, %d bytes from a %s archive", ARCHIVE_FIELD, budget.entries, budget.bytes, kind)
    return kind


@contextmanager
def extracted(
    path: Path | str,
    *,
    filetype: str = "infer",
    limits: ArchiveLimits = DEFAULT_LIMITS,
    parent: Path | None = None,
) -> Iterator[Path]:
    """A fresh temporary folder holding the archive's files; removed on leaving, and at once on any failure."""
    dest = Path(tempfile.mkdtemp(prefix="sdxl-archive-", dir=parent))
    try:
        extract(path, dest, filetype=filetype, limits=limits)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# --- images and captions ----------------------------------------------------------------------------------------


def _shrink(image: Image.Image, short_side: int | None) -> Image.Image:
    """Scaled down so its short side is `short_side`: training never uses more, and memory stays bounded."""
    if short_side is None or min(image.size) <= short_side:
        return image
    scale = short_side / min(image.size)
    size = (max(short_side, round(image.width * scale)), max(short_side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _check_shape(image: Image.Image, name: str, limits: ArchiveLimits) -> None:
    """From the header: a long thin strip is never shrunk (its short side is small) but would be upscaled along its
    whole length, so its shape is capped before any pixel is decoded."""
    width, height = image.size
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > limits.max_aspect_ratio:
        image.close()
        raise _reject(
            f"image {name!r} is {width}x{height}: its long side is {ratio:,.0f} times its short side; at most"
            f" {limits.max_aspect_ratio}:1 is accepted (crop it to the part to train on)"
        )


def load_image(
    path: Path, name: str, limits: ArchiveLimits = DEFAULT_LIMITS, short_side: int | None = None
) -> Image.Image | None:
    """The RGB image with its EXIF rotation applied (and at most `short_side` on its short side, if given), None
    (logged) if it cannot be decoded. Too many pixels or too long a shape is an error, found from the header."""
    label = f"image {name!r}:"
    try:
        image = open_checked(path, ARCHIVE_FIELD, limits.max_image_pixels, label)
    except ImageTooLarge:
        raise
    except InputError as error:
        log.warning("%s: skipping %s: not a readable image (%s)", ARCHIVE_FIELD, name, error)
        return None
    _check_shape(image, name, limits)
    if short_side is not None and image.format == "JPEG":
        image.draft("RGB", (short_side, short_side))  # JPEG decodes at 1/2..1/8 scale, never below short_side
    try:
        decoded = decode(image, ARCHIVE_FIELD, label)
    except InputError as error:
        log.warning("%s: skipping %s: corrupt image data (%s)", ARCHIVE_FIELD, name, error)
        return None
    return _shrink(flatten(decoded), short_side)


def _normalise(name: str) -> str:
    return "/".join(part for part in name.strip().replace("\\", "/").split("/") if part not in ("", "."))


def _caption_columns(fieldnames) -> tuple[str, str]:
    columns = {(name or "").strip().lower(): name for name in fieldnames or []}
    image_column = next((columns[c] for c in UPLOAD_IMAGE_COLUMNS if c in columns), None)
    caption_column = next((columns[c] for c in UPLOAD_CAPTION_COLUMNS if c in columns), None)
    if image_column is None or caption_column is None:
        raise _reject(
            f"{UPLOAD_CAPTIONS_FILE} has the columns {fieldnames}; it needs an image column (one of"
            f" {', '.join(UPLOAD_IMAGE_COLUMNS)}) and a caption column (one of {', '.join(UPLOAD_CAPTION_COLUMNS)})"
        )
    return image_column, caption_column


def _caption_rows(reader: csv.DictReader, limits: ArchiveLimits) -> Iterator[tuple[str, str]]:
    """(image, caption) per row, streamed: the row count and each caption's length are checked as they come."""
    image_column, caption_column = _caption_columns(reader.fieldnames)
    for count, row in enumerate(reader, start=1):
        if count > limits.max_images:
            raise _reject(f"{UPLOAD_CAPTIONS_FILE} has more than {limits.max_images:,} rows (one per image at most)")
        caption = (row.get(caption_column) or "").strip()
        if len(caption) > limits.max_caption_chars:
            raise _reject(
                f"{UPLOAD_CAPTIONS_FILE} line {reader.line_num}: the caption has {len(caption):,} characters;"
                f" at most {limits.max_caption_chars:,} are accepted"
            )
        yield row.get(image_column) or "", caption


def read_caption_csv(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> dict[str, str]:
    """caption.csv as {image path as written: caption}. Column names are matched case-insensitively. Its size is
    checked before it is read."""
    size = path.stat().st_size
    if size > limits.max_caption_csv_bytes:
        raise _reject(
            f"{UPLOAD_CAPTIONS_FILE} is {size:,} bytes; at most {limits.max_caption_csv_bytes:,} are accepted"
            f" (one row per image, captions up to {limits.max_caption_chars:,} characters)"
        )
    captions: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            for image, caption in _caption_rows(csv.DictReader(file), limits):
                if _normalise(image) and caption:
                    captions[_normalise(image)] = caption
    except UnicodeDecodeError:
        raise _reject(f"{UPLOAD_CAPTIONS_FILE} is not UTF-8 text") from None
    except csv.Error as error:
        raise _reject(f"{UPLOAD_CAPTIONS_FILE} is not valid CSV ({error})") from None
    return captions


def match_captions(image_names: list[str], rows: dict[str, str], csv_folder: str = "") -> dict[str, str]:
    """Captions by image NAME, never by order: the row's path from the archive root, or from caption.csv's folder,
    or (path prefixes from the uploader's machine tolerated) its file name when exactly one image has it."""
    by_path = set(image_names)
    by_file: dict[str, list[str]] = {}
    for name in image_names:
        by_file.setdefault(PurePosixPath(name).name, []).append(name)
    matched: dict[str, str] = {}
    for key, caption in rows.items():
        relative = f"{csv_folder}/{key}" if csv_folder else key
        candidates = (
            [key] if key in by_path else [relative] if relative in by_path else by_file.get(key.split("/")[-1], [])
        )
        if len(candidates) == 1:
            matched[candidates[0]] = caption
        elif candidates:
            log.warning("%s: %s row %r matches %s; give its path", ARCHIVE_FIELD, UPLOAD_CAPTIONS_FILE, key, candidates)
        else:
            log.warning("%s: %s row %r matches no image in the archive", ARCHIVE_FIELD, UPLOAD_CAPTIONS_FILE, key)
    return matched


def _skipped(folder: Path, rel: PurePosixPath) -> str | None:
    """Why a file is not a training image, or None if it is one: told by its first bytes, never by its name."""
    if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
        return "hidden or macOS metadata file"
    with open(folder.joinpath(*rel.parts), "rb") as file:
        head = file.read(16)
    if sniff_format(head) is None:
        return f"not an image (accepted: {ACCEPTED}, told by content)"
    return None


def _image_names(folder: Path, files: list[str], skip: list[str], limits: ArchiveLimits) -> list[str]:
    """The archive's image files by content, refused before any is decoded when there are too many."""
    names = []
    for name in files:
        if name in skip:
            continue
        reason = _skipped(folder, PurePosixPath(name))
        if reason:
            log.info("%s: skipping %s: %s", ARCHIVE_FIELD, name, reason)
            continue
        names.append(name)
        if len(names) > limits.max_images:
            raise _reject(
                f"holds more than {limits.max_images:,} images; at most {limits.max_images:,} are accepted"
                f" (setting {MAX_IMAGES_ENV})"
            )
    return names


def read_samples(
    path: Path | str,
    *,
    filetype: str = "infer",
    limits: ArchiveLimits = DEFAULT_LIMITS,
    parent: Path | None = None,
    short_side: int | None = None,
) -> list[Sample]:
    """Every usable image of the archive, in path order, with its caption.csv caption if it has one. With
    `short_side`, larger images are scaled down to it as they are read."""
    with extracted(path, filetype=filetype, limits=limits, parent=parent) as folder:
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        caption_files = [name for name in files if PurePosixPath(name).name.lower() == UPLOAD_CAPTIONS_FILE]
        if len(caption_files) > 1:
            raise _reject(f"has several {UPLOAD_CAPTIONS_FILE} files ({', '.join(caption_files)}); keep one")
        rows = read_caption_csv(folder / caption_files[0], limits) if caption_files else {}
        images: dict[str, Image.Image] = {}
        for name in _image_names(folder, files, caption_files, limits):
            image = load_image(folder / name, name, limits, short_side)
            if image is not None:
                images[name] = image
        captions: dict[str, str] = {}
        if caption_files:
            parent_folder = PurePosixPath(caption_files[0]).parent.as_posix()
            csv_folder = "" if parent_folder == "." else parent_folder
            captions = match_captions(list(images), rows, csv_folder)
    if not images:
        raise _reject(f"holds no usable image ({len(files)} files, none a readable {ACCEPTED} image)")
    log.info(
        "%s: %d images, %d of them captioned by %s", ARCHIVE_FIELD, len(images), len(captions), UPLOAD_CAPTIONS_FILE
    )
    return [Sample(name=name, image=image, caption=captions.get(name)) for name, image in images.items()]
