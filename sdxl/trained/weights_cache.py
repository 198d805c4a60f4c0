"""An on-disk cache of downloaded weights: trained_model.tar contents and single LoRA files, keyed by URL.

- An entry is a folder named after the sha256 of the downloaded bytes (`sha256-<hex>`), under a folder for its kind
  (`trained/`, `lora/`); each URL that gave those bytes is a link named after the sha256 of the whole URL, query
  string included. A URL is only ever served the bytes that URL itself gave: a newly signed URL for the same object
  downloads again (a signature is the client's proof of access, never skipped), but takes no second copy on disk.
- A hit uses no network; it only touches the entry's mtime, which is the least-recently-used order.
- Disk use is bounded before a byte is written: a miss first asks the size the server announces (Content-Length),
  reserves that (twice for a trained tar: the tar and its extracted copy), evicting unused entries least recently
  used first, and the download is capped to the reservation. Held entries + every process's reservations never
  exceed the budget; a request that does not fit beside the entries in use is refused, never written.
- The budget is checked against the volume at start: without SDXL_WEIGHTS_CACHE_BYTES it is the free space plus what
  the cache holds, less FREE_HEADROOM; a configured budget larger than that is lowered, with a warning.
- Several processes may share one cache folder: an entry in use holds a shared flock (eviction tries the exclusive
  one and skips an entry it cannot get), reservations and eviction run under a lock on the folder, and a temporary
  folder is locked by its owner for its life, so only temporaries whose owner is gone are removed at start.
- Inserting downloads into a temporary folder, validates and extracts there, then renames the folder into place:
  an entry is complete or absent. Any failure removes everything it wrote.
- Tar extraction is done by hand: a plain (uncompressed) tar as the trainer writes it, headers capped before tarfile
  reads them (sdxl/guard/safe_tar.py), regular files only, no `..` or absolute paths, no links or devices, an entry count
  cap, a total size cap, per-file caps checked from the header before a byte is extracted, and only the file names
  the trainer writes. Every file is checked before anything parses it: JSON by size, safetensors by header size, key
  count and (for the token rows) row count.
- The cache folder is private to this process's user (sdxl/guard/private_dirs.py): created 0700, checked on every use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from safetensors import safe_open

from sdxl.errors import InputError
from sdxl.formats import (  # noqa: F401 (re-exported: the trained tar's names are read through this module too)
    EMBEDDINGS_FILE,
    KOHYA_LORA_FILE,
    LORA_FILE,
    REPORT_DIR,
    REPORT_JSON,
    SAFETENSORS_FILES,
    SDXL_EMBEDDING_FILE,
    SPECIAL_PARAMS_FILE,
    TRAINED_FILES,
    TRAINING_PARAMS_FILE,
    UNET_FILE,
)
from sdxl.guard import remote
from sdxl.guard.private_dirs import check_private_dir, private_dir
from sdxl.guard.safe_tar import TarHeaderRefused, compression, open_tar

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SDXL_WEIGHTS_CACHE_DIR"
CACHE_BUDGET_ENV = "SDXL_WEIGHTS_CACHE_BYTES"
MAX_TRAINED_ENV = "SDXL_MAX_TRAINED_BYTES"  # the largest trained_model.tar accepted
MAX_LORA_ENV = "SDXL_MAX_LORA_BYTES"  # the largest single LoRA file accepted
FREE_HEADROOM = 2 << 30  # left free on the cache's volume for request files and outputs
ENTRY_NAME = re.compile(r"sha256-[0-9a-f]{64}")
RESERVED_FILE = "reserved"  # in a temporary folder: the bytes its download reserved


MAX_TAR_ENTRIES = 64
MAX_JSON_BYTES = 64 << 10  # special_params.json and training_params.json; the trainer writes well under 2 KB
MAX_SAFETENSORS_HEADER = 8 << 20  # a full SDXL UNet's header is ~0.2 MB; safetensors itself allows 100 MB
MAX_SAFETENSORS_KEYS = 16_384  # a kohya SDXL LoRA with both text encoders has ~4,000; a full UNet ~1,700
MAX_TRAINED_TOKENS = 16  # rows of embeddings.pti; the trainer writes 2 per trained word
MAX_TRAINED_WORDS = 16  # entries of special_params.json
MAX_WORD_CHARS = 256
MAX_EMBEDDINGS_BYTES = 1 << 20  # 16 rows of both encoders' widths in fp32 are 128 KB
FILE_CAPS = {
    SPECIAL_PARAMS_FILE: MAX_JSON_BYTES,
    TRAINING_PARAMS_FILE: MAX_JSON_BYTES,
    EMBEDDINGS_FILE: MAX_EMBEDDINGS_BYTES,
}
# Files a training writes for other tools and for people (sdxl/training/interop.py, report.py): known, size-capped
# from the tar header, and skipped (never extracted or parsed): the predictor does not use them.
SKIPPED_FILE_CAPS = {
    KOHYA_LORA_FILE: 4 << 30,
    SDXL_EMBEDDING_FILE: MAX_EMBEDDINGS_BYTES,
    REPORT_JSON: 4 << 20,
    f"{REPORT_DIR}/loss.png": 16 << 20,
    f"{REPORT_DIR}/samples.png": 64 << 20,
}
KINDS = ("trained", "lora")


@dataclass(frozen=True)
class CacheLimits:
    budget_bytes: int | None = None  # None: what the volume holds (volume_budget)
    max_trained_bytes: int = 12 << 30  # a full fine-tune's fp32 UNet is ~10.3 GB
    max_lora_bytes: int = 2 << 30
    read_timeout: float = remote.FetchLimits.read_timeout
    deadline: float = remote.FetchLimits.deadline
    fetch: remote.FetchLimits | None = None  # None: FetchLimits(max_bytes=the kind's cap, read_timeout, deadline)


def url_key(url: str) -> str:
    return hashlib.sha256(url.strip().encode()).hexdigest()


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _try_lock(path: Path, how: int) -> int | None:
    """An open descriptor of `path` (a folder or file) holding flock `how` without waiting, or None if it is held."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def _lock_in_use(folder: Path) -> int | None:
    """A shared lock on an entry for as long as it is used (eviction takes the exclusive one, without waiting, and
    skips an entry it cannot get); None if the entry went meanwhile."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an evictor deletes it
    try:
        same = os.stat(folder).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def volume_budget(root: Path, budget: int | None, held: int) -> int:
    """The budget the volume can hold: what is free plus what the cache holds, less FREE_HEADROOM for the rest of
    the volume (request files, outputs); a configured budget above that is lowered, with a log line saying so."""
    usage = shutil.disk_usage(root)
    room = max(0, usage.free + held - FREE_HEADROOM)
    if budget is None:
        log.info("weights cache budget: %s (the free space of %s less %s)", _gib(room), root, _gib(FREE_HEADROOM))
        return room
    if budget > room:
        log.warning(
            "weights cache budget lowered from %s (%s) to %s: %s has %s free and the cache holds %s; set %s to fit "
            "the volume (its size limit, less what requests write there)",
            _gib(budget), CACHE_BUDGET_ENV, _gib(room), root, _gib(usage.free), _gib(held), CACHE_BUDGET_ENV,
        )  # fmt: skip
        return room
    return budget


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.2f} GiB"


class WeightsCache:
    """See the module's docstring. Shared safely by the threads of a process and by processes on one folder."""

    def __init__(self, root: Path, limits: CacheLimits = CacheLimits(), resolver: remote.Resolver | None = None):
        self.root = Path(root)
        self.limits = limits
        self.resolver = resolver
        self._lock = threading.Lock()  # flock is per open file: this process's threads queue here first
        self._discarded: set[Path] = set()  # discarded while in use: removed when the use ends
        private_dir(self.root, CACHE_DIR_ENV)
        for kind in KINDS:
            (self.root / kind).mkdir(mode=0o700, exist_ok=True)
        with self._root_lock():
            self._reserved()  # removes what processes that ended left
            self.budget = volume_budget(self.root, limits.budget_bytes, sum(_size(e) for e in self._entries()))

    @classmethod
    def from_env(cls) -> WeightsCache:
        root = Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "sdxl-weights-cache")
        defaults = CacheLimits()
        budget = os.environ.get(CACHE_BUDGET_ENV)
        limits = CacheLimits(
            budget_bytes=int(budget) if budget else None,
            max_trained_bytes=int(os.environ.get(MAX_TRAINED_ENV) or defaults.max_trained_bytes),
            max_lora_bytes=int(os.environ.get(MAX_LORA_ENV) or defaults.max_lora_bytes),
            **remote.timeouts_from_env(),
        )
        return cls(root, limits)

    def path_for(self, kind: str, url: str) -> Path:
        """The URL's link to its entry (a link, so that URLs naming the same bytes share one entry)."""
        return self.root / kind / url_key(url)

    @contextlib.contextmanager
    def open(self, kind: str, url: str, field: str, deadline: remote.RequestDeadline | None = None):
        """The entry's folder for `url` (fetched on a miss, by the request's `deadline` when given, which a cancel
        stops), protected from eviction (by any process) inside the with-block."""
        for _ in range(3):  # an entry evicted between the look-up and the lock is fetched again
            folder = self.get(kind, url, field, deadline)
            fd = _lock_in_use(folder)
            if fd is not None:
                break
        else:
            raise InputError(field, "the weights cache is too full to keep these weights; try again later")
        try:
            yield folder
        finally:
            os.close(fd)  # releases the shared lock
            if folder in self._discarded:
                with self._root_lock():
                    if self._evict(folder) or not folder.is_dir():
                        self._discarded.discard(folder)

    def get(self, kind: str, url: str, field: str, deadline: remote.RequestDeadline | None = None) -> Path:
        """The entry's folder for `url` (fetched on a miss); not protected from eviction: use `open` to use it."""
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}")
        folder = self._lookup(kind, url)
        if folder is not None:
            os.utime(folder)
            log.info("weights cache hit for %s (%s)", field, folder.name[:19])
            return folder
        return self._insert(kind, url, field, deadline)

    def _lookup(self, kind: str, url: str) -> Path | None:
        link = self.path_for(kind, url)
        try:
            target = os.readlink(link)
        except OSError:
            return None
        folder = self.root / kind / target
        if ENTRY_NAME.fullmatch(target) and folder.is_dir() and not folder.is_symlink():
            return folder
        link.unlink(missing_ok=True)  # its entry was evicted
        return None

    def discard(self, kind: str, url: str) -> None:
        """Drop an entry (for example one whose weights do not fit this model): no URL leads to it any more, and it
        goes now, or when this process's last user of it lets go (another process's use holds it until eviction)."""
        folder = self._lookup(kind, url)
        self.path_for(kind, url).unlink(missing_ok=True)
        if folder is not None:
            with self._root_lock():
                if not self._evict(folder):
                    self._discarded.add(folder)

    def _insert(self, kind: str, url: str, field: str, deadline: remote.RequestDeadline | None = None) -> Path:
        cap = self.limits.max_trained_bytes if kind == "trained" else self.limits.max_lora_bytes
        fetch_limits = self.limits.fetch or remote.FetchLimits(
            max_bytes=cap, read_timeout=self.limits.read_timeout, deadline=self.limits.deadline
        )
        remote.check_url(url, field, self.resolver or remote.system_resolver)  # refuse early, before any disk work
        check_private_dir(self.root, CACHE_DIR_ENV)
        factor = 2 if kind == "trained" else 1  # the tar and its extracted copy are both on disk until the end

        def reserve(declared: int | None) -> int:
            """Told the announced size before any body byte is written: the download is capped to what is granted.
            A server that announces less than it sends is refused."""
            need = factor * (declared if declared is not None else fetch_limits.max_bytes)
            return self._grant(work, field, need, partial=declared is None) // factor

        work, lock_fd = self._new_work()
        try:
            started = time.perf_counter()
            download = remote.fetch_to_file(url, work, field, fetch_limits, self.resolver, deadline, reserve=reserve)
            entry = work / "entry"
            entry.mkdir()
            if kind == "trained":
                extract_trained_tar(download, entry, field, max_bytes=cap)
            else:
                check_safetensors(download, field, "the LoRA file")
            folder = self._commit(kind, url, download, entry)
            log.info(
                "cached %s for %s: %.1f MB in %.1fs (%s)",
                kind, field, _size(folder) / 1e6, time.perf_counter() - started, folder.name[:19],
            )  # fmt: skip
            return folder
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock_fd)

    def _commit(self, kind: str, url: str, download: Path, entry: Path) -> Path:
        """Move the checked entry into place under its content's digest (a copy already there is used instead), and
        link the URL to it."""
        name = f"sha256-{_file_digest(download)}"
        if kind == "lora":
            download.rename(entry / LORA_FILE)
        download.unlink(missing_ok=True)
        folder = self.root / kind / name
        with self._root_lock():
            if folder.is_dir():
                os.utime(folder)  # the same bytes under another URL (a newly signed one, say): no second copy
            else:
                entry.rename(folder)
            (download.parent / RESERVED_FILE).write_text("0")  # its bytes are counted in the entries from now on
            self._link(kind, url, name)
        return folder

    def _link(self, kind: str, url: str, name: str) -> None:
        """Point the URL at entry `name`, replacing in one step any link it had (the caller holds the root lock)."""
        link = self.root / kind / f".link-{url_key(url)}-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        os.replace(link, self.path_for(kind, url))

    def put(self, kind: str, url: str, files: dict[str, bytes]) -> Path:
        """An entry for `url` holding `files` (name -> bytes), as a finished download leaves it (unchecked, outside
        the budget): for tests and benchmarks that must not fetch."""
        digest = hashlib.sha256()
        for name, body in sorted(files.items()):
            digest.update(name.encode() + b"\0" + body)
        folder = self.root / kind / f"sha256-{digest.hexdigest()}"
        with self._root_lock():
            folder.mkdir(mode=0o700, exist_ok=True)
            for name, body in files.items():
                (folder / name).write_bytes(body)
            self._link(kind, url, folder.name)
        return folder

    @contextlib.contextmanager
    def _root_lock(self):
        """Reservations, eviction and the startup sweep run one at a time across every process using this folder."""
        with self._lock:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _entries(self) -> list[Path]:
        return [e for kind in KINDS for e in (self.root / kind).iterdir() if ENTRY_NAME.fullmatch(e.name)]

    def _new_work(self) -> tuple[Path, int]:
        """A new temporary folder for one download, locked by its owner for its life (so no other process's start-up
        sweep removes it); it reserves nothing until `_grant`."""
        with self._root_lock():
            work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return work, fd

    def _grant(self, work: Path, field: str, need: int, partial: bool) -> int:
        """Reserve `need` bytes for the download in `work` (less if `partial` and only less fits), evicting unused
        entries first: held entries + every process's reservations stay within the budget. The reservation is
        written in the folder, where every process counts it."""
        with self._root_lock():
            room = self._make_room(need)
            granted = min(need, room)
            if granted < need and not (partial and granted > 0):
                raise InputError(
                    field,
                    f"the weights cache has no room for {remote.human_size(need)} now (budget "
                    f"{remote.human_size(self.budget)}, {remote.human_size(room)} free: the rest is in use by "
                    "requests in progress); try again later",
                )
            (work / RESERVED_FILE).write_text(str(granted))
            return granted

    def _make_room(self, need: int) -> int:
        """Evict least recently used entries that no process uses until `need` bytes fit; the bytes that fit."""
        entries = sorted(self._entries(), key=lambda e: e.stat().st_mtime)
        held = sum(_size(e) for e in entries)
        used = held + self._reserved()
        for entry in entries:
            if used + need <= self.budget:
                break
            size = _size(entry)
            if self._evict(entry):
                used -= size
                log.info("weights cache: evicted %s (%.1f MB) to stay under the budget", entry.name[:19], size / 1e6)
        return max(0, self.budget - used)

    def _evict(self, entry: Path) -> bool:
        """Remove an entry unless a process holds it (its shared lock): the exclusive lock is only tried."""
        fd = _try_lock(entry, fcntl.LOCK_EX)
        if fd is None:
            return False
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
        return True

    def _reserved(self) -> int:
        """The reservations of the downloads in progress, in every process. A temporary folder whose owner is gone
        (killed mid-download; an owner holds its folder's lock for the folder's life) is removed instead."""
        total = 0
        for work in self.root.glob(".tmp-*"):
            fd = _try_lock(work, fcntl.LOCK_EX)
            if fd is None:  # its owner is alive
                with contextlib.suppress(OSError, ValueError):
                    total += int((work / RESERVED_FILE).read_text())
                continue
            shutil.rmtree(work, ignore_errors=True)
            os.close(fd)
            log.info("weights cache: removed %s, left by a process that ended mid-download", work.name)
        return total


def safetensors_header(path: Path, field: str, what: str) -> dict[str, dict]:
    """A safetensors file's tensor entries ({key: {"dtype", "shape", "data_offsets"}}), its metadata left out, read
    with the header's size checked before it is read, and its key count before anything else looks at it."""
    with open(path, "rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= os.fstat(file.fileno()).st_size - 8:
            raise InputError(field, f"{what} is not a valid safetensors file (no header of the length it gives)")
        if length > MAX_SAFETENSORS_HEADER:
            raise InputError(
                field, f"{what} has a header of {length:,} bytes; at most {MAX_SAFETENSORS_HEADER:,} are allowed"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InputError(field, f"{what} is not a valid safetensors file ({error})") from None
    header.pop("__metadata__", None)
    if len(header) > MAX_SAFETENSORS_KEYS:
        raise InputError(field, f"{what} holds {len(header):,} tensors; at most {MAX_SAFETENSORS_KEYS:,} are allowed")
    return header


def check_safetensors(path: Path, field: str, what: str) -> dict[str, dict]:
    """Refuse a file that is not a safetensors file (it is never unpickled either way); its header entries."""
    header = safetensors_header(path, field, what)
    try:
        with safe_open(path, framework="pt") as file:  # the library's own checks: dtypes, offsets, overlaps
            if not list(file.keys()):
                raise InputError(field, f"{what} holds no tensors")
    except InputError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        raise InputError(field, f"{what} is not a valid safetensors file ({error})") from None
    return header


def check_token_rows(header: dict[str, dict], field: str) -> None:
    """embeddings.pti: each tensor's row count (one row per new token) is capped, read from the header."""
    for key, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        rows = shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else 0
        if rows > MAX_TRAINED_TOKENS:
            raise InputError(
                field,
                f"{EMBEDDINGS_FILE}: {key} holds {rows:,} token rows; at most {MAX_TRAINED_TOKENS} trained tokens are "
                "allowed (a training writes 2 per trained word)",
            )


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return f"an absolute path {name!r}"
    if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
        return f"a path that leaves the archive {name!r}"
    if member.issym() or member.islnk():
        return f"a link {name!r} -> {member.linkname!r}"
    if member.isdev():
        return f"a device or pipe {name!r}"
    if not (member.isfile() or member.isdir()):
        return f"{name!r}, which is not a regular file"
    return None


def extract_trained_tar(archive: Path, dest: Path, field: str, max_bytes: int) -> None:
    """Extract a trained_model.tar's known files into `dest` and check them; raise InputError(field) otherwise."""
    packed = compression(archive)
    if packed:  # the trainer writes a plain tar; a compressed one could expand far beyond what was downloaded
        raise InputError(
            field,
            f"the file is {packed}-compressed, not a tar archive as a training writes it; give the plain "
            "(uncompressed) trained_model.tar a training produced",
        )
    try:
        tar = open_tar(archive, mode="r:")
    except TarHeaderRefused as error:
        raise InputError(field, f"the tar {error}") from None
    except (tarfile.TarError, EOFError, OSError):
        raise InputError(
            field, "the file is not a tar archive; give the trained_model.tar a training produced"
        ) from None
    try:
        with tar:
            _extract_members(tar, dest, field, max_bytes)
    except TarHeaderRefused as error:
        raise InputError(field, f"the tar {error}") from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise InputError(field, f"the tar archive is damaged ({error})") from None
    check_trained_files(dest, field)


def _extract_members(tar: tarfile.TarFile, dest: Path, field: str, max_bytes: int) -> None:
    seen: set[str] = set()
    total = 0
    for count, member in enumerate(tar, start=1):
        if count > MAX_TAR_ENTRIES:
            raise InputError(field, f"the tar holds more than {MAX_TAR_ENTRIES} entries")
        problem = _member_problem(member)
        if problem:
            raise InputError(field, f"the tar holds {problem}; only regular files are allowed")
        name = PurePosixPath(member.name).as_posix().removeprefix("./")
        if member.isdir():
            if name not in (".", ""):
                log.info("%s: ignoring folder %r in the tar", field, member.name)
            continue
        total += member.size
        if total > max_bytes:
            raise InputError(field, f"the tar's files add up to more than {remote.human_size(max_bytes)}")
        if name in SKIPPED_FILE_CAPS:
            _check_skipped(name, member.size, field)
            continue
        if name not in TRAINED_FILES:
            log.info("%s: ignoring unknown file %r in the tar", field, member.name)
            continue
        cap = FILE_CAPS.get(name)
        if cap is not None and member.size > cap:  # from the header, before a byte of it is read
            raise InputError(field, f"{name} is {member.size:,} bytes; at most {cap:,} are allowed")
        if name in seen:
            raise InputError(field, f"the tar holds {name!r} twice")
        seen.add(name)
        _copy_member(tar, member, dest / name)


def _check_skipped(name: str, size: int, field: str) -> None:
    if size > SKIPPED_FILE_CAPS[name]:
        raise InputError(field, f"{name} is {size:,} bytes; at most {SKIPPED_FILE_CAPS[name]:,} are allowed")
    log.debug("%s: %s is for other tools; not extracted", field, name)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    with source, open(target, "xb") as out:  # "x": never through an existing file or link
        remaining = member.size
        while remaining:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                raise tarfile.ReadError(f"{member.name} is truncated")
            out.write(chunk)
            remaining -= len(chunk)


def check_trained_files(folder: Path, field: str) -> None:
    """The files a trained_model.tar must hold, and that each is what its name says (sizes checked before parsing)."""
    present = {f.name for f in folder.iterdir()}
    if not present & {LORA_FILE, UNET_FILE}:
        raise InputError(
            field,
            f"the tar holds neither {LORA_FILE} nor {UNET_FILE} (found: {', '.join(sorted(present)) or 'nothing'}); "
            "give the trained_model.tar a training produced",
        )
    if {LORA_FILE, UNET_FILE} <= present:
        raise InputError(field, f"the tar holds both {LORA_FILE} and {UNET_FILE}; a training writes one of them")
    if (EMBEDDINGS_FILE in present) != (SPECIAL_PARAMS_FILE in present):
        missing = SPECIAL_PARAMS_FILE if EMBEDDINGS_FILE in present else EMBEDDINGS_FILE
        raise InputError(field, f"the tar holds trained tokens but not {missing}")
    for name, cap in FILE_CAPS.items():
        if name in present and (folder / name).stat().st_size > cap:
            raise InputError(field, f"{name} is larger than {cap:,} bytes")
    for name in SAFETENSORS_FILES:
        if name in present:
            header = check_safetensors(folder / name, field, name)
            if name == EMBEDDINGS_FILE:
                check_token_rows(header, field)
    if SPECIAL_PARAMS_FILE in present:
        read_token_map(folder / SPECIAL_PARAMS_FILE, field)


def read_token_map(path: Path, field: str) -> dict[str, str]:
    """special_params.json: {"TOK": "<s0><s1>"}: each trained word and the new tokens that stand for it."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(field, f"{SPECIAL_PARAMS_FILE} is larger than {MAX_JSON_BYTES:,} bytes")
    with open(path, "rb") as file:
        raw = file.read(MAX_JSON_BYTES + 1)  # bounded even if the file grew after the check
    try:
        if len(raw) > MAX_JSON_BYTES:
            raise ValueError(f"more than {MAX_JSON_BYTES:,} bytes")
        token_map = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InputError(field, f"{SPECIAL_PARAMS_FILE} is not valid JSON ({error})") from None
    if not isinstance(token_map, dict) or not token_map:
        raise InputError(
            field, f"{SPECIAL_PARAMS_FILE} must map each trained word to its tokens, e.g. {{'TOK': '<s0><s1>'}}"
        )
    if len(token_map) > MAX_TRAINED_WORDS:
        raise InputError(
            field, f"{SPECIAL_PARAMS_FILE} maps {len(token_map):,} words; at most {MAX_TRAINED_WORDS} are allowed"
        )
    for word, tokens in token_map.items():
        well_formed = isinstance(tokens, str) and word.strip() and tokens.strip()
        if not well_formed or len(word) > MAX_WORD_CHARS or len(tokens) > MAX_WORD_CHARS:
            raise InputError(
                field,
                f"{SPECIAL_PARAMS_FILE}: {word[:80]!r} -> {str(tokens)[:80]!r} is not a word and its tokens "
                f"(each at most {MAX_WORD_CHARS} characters)",
            )
    return token_map
