"""Fetch a client-given URL without letting it reach inside our network.

Every URL a request names (trained weights, LoRAs) is hostile input:
1. only https (plain http only for loopback, and only when SDXL_ALLOW_LOOPBACK_HTTP=1, for tests);
2. the host is resolved first and every address it resolves to is checked: private, loopback (unless that
   setting), link-local, multicast, reserved, unspecified and other non-global addresses are refused before any
   connection; the connection then goes to the checked address (TLS still verifies the host name), so a second DNS
   answer cannot swap in another address;
3. redirects are followed by hand, each hop checked again, at most MAX_REDIRECTS;
4. connect and read timeouts, an overall deadline, and a size cap checked on Content-Length and while streaming;
5. a large body from a server that advertises `Accept-Ranges: bytes` is fetched in parallel ranges, each checked;
6. the body lands in a temporary file that is removed on any failure.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from sdxl.errors import InputError

log = logging.getLogger(__name__)

ALLOW_LOOPBACK_ENV = "SDXL_ALLOW_LOOPBACK_HTTP"
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "sdxl-cog/0.1"

Resolver = Callable[[str, int], list[str]]


class FetchError(InputError):
    """A URL the client gave could not be fetched; the message says why and names the input field."""


class _Aborted(FetchError):
    """A parallel part stopped because another part failed."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # the longest silence between two reads
    deadline: float = 1800.0  # the whole download, redirects and ranges included
    parallel_min_bytes: int = 64 << 20  # below this a single stream is as fast
    parallel_parts: int = 8
    chunk_bytes: int = 1 << 20


def human_size(count: int) -> str:
    return f"{count} bytes" if count < 10**6 else f"{count / 1e6:,.1f} MB"


def loopback_allowed() -> bool:
    return os.environ.get(ALLOW_LOOPBACK_ENV) == "1"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the host resolves to (the check refuses the host if any one of them is refused)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def refusal(address: str, allow_loopback: bool) -> str | None:
    """Why we must not connect to this address, or None when it is a public (global unicast) address."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    for kind in ("unspecified", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, 6to4/Teredo relays, ...
        return "not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """One checked hop: where to connect (a checked IP) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str
    url: str


def check_url(url: str, field: str, resolver: Resolver = system_resolver) -> Target:
    """Parse, resolve and check a URL; nothing is connected to. Raises FetchError naming `field`."""
    allow_loopback = loopback_allowed()
    if not isinstance(url, str) or not url.strip():
        raise FetchError(field, f"{url!r} is not a URL; give an https:// URL")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise FetchError(field, f"{url!r} is not a valid URL ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise FetchError(
            field, f"the URL scheme {scheme + ':' if scheme else '(none)'} is not allowed; give an https:// URL"
        )
    if scheme == "http" and not allow_loopback:
        raise FetchError(field, "plain http is not allowed; give an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise FetchError(field, "credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise FetchError(field, f"{url!r} has no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as error:
        raise FetchError(field, f"cannot resolve {host!r}: {error}") from None
    if not addresses:
        raise FetchError(field, f"{host!r} resolves to no address")
    for address in addresses:
        reason = refusal(address, allow_loopback)
        if reason:
            raise FetchError(field, f"refused: {host} resolves to {address}, {reason}")
    if scheme == "http" and not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise FetchError(field, "plain http is allowed for loopback test servers only; give an https:// URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, addresses[0], path, url.strip())


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, whatever the host name resolves to now."""

    def __init__(self, target: Target, limits: FetchLimits):
        super().__init__(target.host, target.port, timeout=limits.connect_timeout)
        self._target, self._limits = target, limits

    def connect(self):
        self.sock = socket.create_connection((self._target.address, self._target.port), self._limits.connect_timeout)
        self.sock.settimeout(self._limits.read_timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def connect(self):
        super().connect()
        context = ssl.create_default_context()  # verifies the certificate against the host name, not the address
        self.sock = context.wrap_socket(self.sock, server_hostname=self._target.host)


def _request(target: Target, limits: FetchLimits, headers: dict[str, str], field: str):
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = kind(target, limits)
    try:
        connection.request("GET", target.path, headers={"User-Agent": USER_AGENT, **headers})
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        raise FetchError(field, f"cannot fetch {_redact(target.url)}: {_describe(error)}") from None


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    return str(error) or type(error).__name__


def open_url(url: str, field: str, limits: FetchLimits, headers: dict[str, str] | None = None, resolver=None):
    """GET `url`, following redirects by hand and checking each hop. Returns (connection, response, final target)."""
    target = check_url(url, field, resolver or system_resolver)
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _request(target, limits, headers or {}, field)
        if response.status not in REDIRECT_STATUSES:
            return connection, response, target
        location = response.getheader("Location")
        connection.close()
        if not location:
            raise FetchError(field, f"{_redact(target.url)} redirected (HTTP {response.status}) without a Location")
        log.info("%s redirects to %s", target.url, _redact(location))
        target = check_url(urljoin(target.url, location), field, resolver or system_resolver)
    raise FetchError(field, f"more than {MAX_REDIRECTS} redirects")


def _redact(url: str) -> str:
    """A URL for the logs: no query string (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


class _Progress:
    """Thread-safe byte counter that logs at most every few seconds."""

    def __init__(self, name: str, total: int | None, every: float = 5.0):
        self.name, self.total, self.every = name, total, every
        self.done, self.started, self.last = 0, time.monotonic(), time.monotonic()
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.done += count
            now = time.monotonic()
            if now - self.last >= self.every:
                self.last = now
                self.log("downloading")

    def log(self, what: str) -> None:
        seconds = max(time.monotonic() - self.started, 1e-6)
        share = f" of {self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)" if self.total else ""
        log.info(
            "%s %s: %.1f MB%s in %.1fs, %.1f MB/s",
            what,
            self.name,
            self.done / 1e6,
            share,
            seconds,
            self.done / 1e6 / seconds,
        )


def _copy_body(response, file, offset: int, length: int | None, ctx: _Download) -> int:
    """Stream the body into `file` at `offset`; enforce the cap, the expected length and the deadline."""
    written = 0
    while True:
        if time.monotonic() > ctx.deadline:
            raise FetchError(ctx.field, f"download took longer than {ctx.limits.deadline:.0f}s")
        if ctx.failed.is_set():
            raise _Aborted(ctx.field, "stopped: another part of the download failed")
        try:
            chunk = response.read(ctx.limits.chunk_bytes)
        except (OSError, http.client.HTTPException) as error:
            raise FetchError(ctx.field, f"download failed after {written} bytes: {_describe(error)}") from None
        if not chunk:
            break
        written += len(chunk)
        if offset + written > ctx.limits.max_bytes:
            raise FetchError(ctx.field, f"the file is larger than the {human_size(ctx.limits.max_bytes)} allowed")
        if length is not None and written > length:
            raise FetchError(ctx.field, "the server sent more bytes than it announced")
        os.pwrite(file.fileno(), chunk, offset + written - len(chunk))
        ctx.progress.add(len(chunk))
    if length is not None and written != length:
        raise FetchError(ctx.field, f"the connection closed after {written} of {length} bytes")
    return written


@dataclass
class _Download:
    url: str
    field: str
    limits: FetchLimits
    resolver: Resolver | None
    deadline: float
    progress: _Progress
    failed: threading.Event


def _content_length(response, ctx: _Download) -> int | None:
    value = response.getheader("Content-Length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise FetchError(ctx.field, f"the server sent an invalid Content-Length {value!r}")
    length = int(value)
    if length > ctx.limits.max_bytes:
        raise FetchError(
            ctx.field, f"the file is {human_size(length)}, larger than the {human_size(ctx.limits.max_bytes)} allowed"
        )
    return length


def _fetch_range(ctx: _Download, file, start: int, end: int, total: int) -> None:
    """One part of a parallel download: the server must answer 206 with exactly the bytes asked for."""
    connection, response, _ = open_url(ctx.url, ctx.field, ctx.limits, {"Range": f"bytes={start}-{end}"}, ctx.resolver)
    try:
        expected = f"bytes {start}-{end}/{total}"
        if response.status != 206 or response.getheader("Content-Range", "").strip() != expected:
            raise FetchError(
                ctx.field,
                f"the server answered a range request with HTTP {response.status} "
                f"{response.getheader('Content-Range')!r}, expected 206 {expected!r}",
            )
        _copy_body(response, file, start, end - start + 1, ctx)
    except BaseException:
        ctx.failed.set()
        raise
    finally:
        connection.close()


def _parallel(ctx: _Download, file, total: int) -> None:
    parts = max(1, min(ctx.limits.parallel_parts, total // ctx.limits.chunk_bytes))
    bounds = [(total * i // parts, total * (i + 1) // parts - 1) for i in range(parts)]
    log.info("downloading %s in %d parallel ranges", ctx.progress.name, parts)
    pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="fetch")
    try:
        futures = [pool.submit(_fetch_range, ctx, file, start, end, total) for start, end in bounds]
        wait(futures, return_when=FIRST_EXCEPTION)
        errors = [future.exception() for future in futures if future.done() and future.exception()]
        if errors:  # report the part that failed first, not the parts it stopped
            ctx.failed.set()
            raise next((e for e in errors if not isinstance(e, _Aborted)), errors[0])
    except BaseException:
        ctx.failed.set()  # a cancel stops every part at its next chunk
        raise
    finally:
        pool.shutdown(wait=True)


def fetch_to_file(url: str, directory: Path, field: str, limits: FetchLimits, resolver: Resolver | None = None) -> Path:
    """Download `url` into a new temporary file in `directory` and return its path (the caller owns it).

    On any failure, the temporary file is removed and a FetchError naming `field` is raised.
    """
    handle, name = tempfile.mkstemp(prefix=".download-", dir=directory)
    path = Path(name)
    ctx = _Download(
        url,
        field,
        limits,
        resolver,
        time.monotonic() + limits.deadline,
        _Progress(_redact(url), None),
        threading.Event(),
    )
    try:
        with os.fdopen(handle, "r+b") as file:
            connection, response, target = open_url(url, field, limits, resolver=resolver)
            try:
                if response.status != 200:
                    raise FetchError(field, f"{_redact(target.url)} answered HTTP {response.status} {response.reason}")
                length = _content_length(response, ctx)
                ctx.progress.total = length
                ranged = "bytes" in response.getheader("Accept-Ranges", "").lower()
                if ranged and length is not None and length >= limits.parallel_min_bytes:
                    connection.close()  # the ranges fetch the body; abandon this stream
                    ctx.url = target.url  # the final hop, checked; every range re-checks it
                    _parallel(ctx, file, length)
                else:
                    _copy_body(response, file, 0, length, ctx)
            finally:
                connection.close()
        ctx.progress.log("downloaded")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
