"""Turn a client's file input (`image`, `mask`, `input_images`) into a local file, under the network policy.

Over HTTP a file input arrives as the client's raw string (the Cog edge declares these inputs so that Cog neither
reads local paths nor downloads URLs itself). Only two kinds of string are accepted:
1. an https:// URL, fetched by sdxl.guard.remote exactly as trained weights are: public addresses only, checked before
   connecting and pinned for the connection, every redirect re-checked, size cap, connect/read timeouts, deadline
   (plain http only to loopback, only with SDXL_ALLOW_LOOPBACK_HTTP=1, for tests);
2. a data: URI, whose decoded size (known from its length) is checked against the same cap before decoding.
Anything else (a path on the server, file:, ftp:, ...) is refused with an error naming the field.

A plain `pathlib.Path` value is a file the operator named on the command line (the shell entry, tests calling run()
directly): JSON cannot produce one, so it is used as given. Path subclasses (Cog's own Path and URLPath, made from
client strings) are refused like any other server path, so a Cog that converted these inputs again fails closed.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from urllib.parse import unquote_to_bytes, urlsplit

from sdxl import settings
from sdxl.errors import InputError
from sdxl.guard import remote
from sdxl.guard.request_deadline import RequestDeadline

MAX_IMAGE_ENV = "SDXL_MAX_IMAGE_BYTES"  # image and mask: URL body or decoded data: URI
MAX_ARCHIVE_ENV = "SDXL_MAX_ARCHIVE_BYTES"  # input_images (the training archive)
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # a 16-megapixel PNG (the pixel cap of sdxl.inputs.images) fits
DEFAULT_MAX_ARCHIVE_BYTES = 4 << 30  # the preprocessing's cap on the archive's uncompressed content
IMAGE_FETCH_DEADLINE = 120.0  # seconds for a whole image download; archives get remote's overall deadline
DECODE_CHUNK = 4 << 20  # base64 characters decoded at a time (a multiple of 4)
MAX_DATA_HEADER = 1024  # characters of "data:<media type>;base64" before the comma
WORK_PREFIX = "sdxl-inputs-"
LOCAL_PATH_TYPE = type(Path())  # PosixPath: what the shell entry makes of `-i image=@photo.png`
WHITESPACE = re.compile(r"\s")
ALLOWED = "give an https:// URL or a data: URI"


@dataclass(frozen=True)
class FileInputLimits:
    max_bytes: int
    fetch: remote.FetchLimits

    @classmethod
    def for_images(cls) -> FileInputLimits:
        max_bytes = settings.positive_int(MAX_IMAGE_ENV, DEFAULT_MAX_IMAGE_BYTES, "number of bytes")
        timeouts = remote.timeouts_from_env()
        timeouts["deadline"] = min(timeouts["deadline"], IMAGE_FETCH_DEADLINE)
        fetch = remote.FetchLimits(max_bytes=max_bytes, **timeouts)
        return cls(max_bytes, fetch)

    @classmethod
    def for_archives(cls) -> FileInputLimits:
        max_bytes = settings.positive_int(MAX_ARCHIVE_ENV, DEFAULT_MAX_ARCHIVE_BYTES, "number of bytes")
        return cls(max_bytes, remote.FetchLimits(max_bytes=max_bytes, **remote.timeouts_from_env()))


def decode_data_uri(uri: str, field: str, directory: Path, max_bytes: int) -> Path:
    """Write the bytes of a data: URI to a new file in `directory`; the size is checked before decoding.

    The payload is read in place, slice by slice (a data: URI can be as large as the request body)."""
    comma = uri.find(",", 0, MAX_DATA_HEADER)
    if comma < 0:
        raise InputError(field, f"the data: URI has no ',' after its media type; {ALLOWED}")
    is_base64 = uri[:comma].lower().endswith(";base64")
    payload, start = uri, comma + 1
    if is_base64 and len(uri) - start <= 2 * (max_bytes // 3 + 1) * 4 and WHITESPACE.search(uri, start):
        payload, start = "".join(uri[start:].split()), 0  # line-wrapped base64: decoded below in whole quads
    size = _decoded_size(payload, start) if is_base64 else len(payload) - start  # percent-encoding only shrinks
    if size > max_bytes:
        raise InputError(
            field,
            f"the data: URI holds {'' if is_base64 else 'up to '}{size:,} bytes, more than the {max_bytes:,} allowed",
        )
    handle, name = tempfile.mkstemp(prefix="data-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            if is_base64:
                _write_base64(payload, start, file, field)
            else:
                file.write(unquote_to_bytes(payload[start:]))
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _decoded_size(payload: str, start: int) -> int:
    """The bytes base64 text decodes to, from its length and padding alone."""
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return (len(payload) - start) // 4 * 3 - padding


def _write_base64(payload: str, start: int, file, field: str) -> None:
    """Decode payload[start:] in slices, so no more than one slice is copied at a time."""
    for offset in range(start, len(payload), DECODE_CHUNK):
        try:
            file.write(binascii.a2b_base64(payload[offset : offset + DECODE_CHUNK], strict_mode=True))
        except (binascii.Error, ValueError) as error:
            raise InputError(field, f"the data: URI is not valid base64 ({error})") from None


def fetch_file_input(
    value: str | PurePath,
    field: str,
    directory: Path,
    limits: FileInputLimits,
    resolver: remote.Resolver | None = None,
    deadline: RequestDeadline | None = None,
) -> Path:
    """One client value -> a local file (in `directory` unless the operator named a local file). A URL's download
    ends by the request's `deadline` too (when given)."""
    if isinstance(value, PurePath):
        if type(value) is not LOCAL_PATH_TYPE:
            raise InputError(field, f"a file path on the server is not accepted; {ALLOWED}")
        return value
    if not isinstance(value, str):
        raise InputError(field, f"expected a URL string, got {type(value).__name__}; {ALLOWED}")
    text = value.strip()
    if text[:5].lower() == "data:":  # before urlsplit, which would copy a payload of up to the whole request body
        return decode_data_uri(text, field, directory, limits.max_bytes)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in ("https", "http"):
        return remote.fetch_to_file(text, directory, field, limits.fetch, resolver, deadline)
    if scheme:
        raise InputError(field, f"the URL scheme {scheme}: is not allowed; {ALLOWED}")
    raise InputError(field, f"a file path on the server is not accepted; {ALLOWED}")


@contextlib.contextmanager
def local_files(
    values: dict[str, str | PurePath | None],
    limits: FileInputLimits,
    resolver: remote.Resolver | None = None,
    deadline: RequestDeadline | None = None,
) -> Iterator[dict[str, Path | None]]:
    """Fetch every given file input into one private folder, removed on exit whatever happens.

    Empty values (None or "") stay None. The folder is only made when something is fetched. `deadline` (the
    request's) bounds all of the fetches together.
    """
    work: Path | None = None
    try:
        files: dict[str, Path | None] = {}
        for field, value in values.items():
            if value is None or value == "":
                files[field] = None
                continue
            if work is None and not isinstance(value, PurePath):
                work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
            files[field] = fetch_file_input(value, field, work, limits, resolver, deadline)
        yield files
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
