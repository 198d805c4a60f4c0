"""Fetch a client-given URL without letting it reach inside our network, or hold a request past its deadline.

1. the URL and every address its host resolves to are checked first (sdxl.guard.url_policy): only public addresses, and
   https only; the connection then goes to the checked addresses, tried in the resolver's order (TLS still verifies
   the host name), so a second DNS answer cannot swap in another address;
2. redirects are followed by hand, each hop checked again, at most MAX_REDIRECTS;
3. one deadline for the whole download (redirects and ranges included) that holds whatever the sender does: the
   name lookup and every socket operation (connect, TLS handshake, send, each read) wait at most
   min(their timeout, the time left); a request's RequestDeadline (sdxl.guard.request_deadline) bounds all of its
   downloads together, and its cancel stops them: every wait is cut into slices of at most SLICE seconds, so a
   cancel (an event, or Cog's exception raised in the waiting thread) is seen within one;
   a size cap checked on Content-Length and while streaming;
4. a large body from a server that advertises `Accept-Ranges: bytes` is fetched in parallel ranges, each checked;
5. the body lands in a temporary file that is removed on any failure;
6. URLs in logs and errors go through `redact`: presigned URLs carry credentials in their query strings.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import http.client
import io
import logging
import os
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

# The URL checks live in sdxl.guard.url_policy; their names stay importable from here, where callers have always found them.
from sdxl.guard.request_deadline import RequestDeadline
from sdxl.guard.url_policy import ALLOW_LOOPBACK_ENV as ALLOW_LOOPBACK_ENV
from sdxl.guard.url_policy import ALLOW_LOOPBACK_PORTS_ENV as ALLOW_LOOPBACK_PORTS_ENV
from sdxl.guard.url_policy import FetchError, Resolver, Target, check_url, redact, system_resolver
from sdxl.guard.url_policy import loopback_allowed as loopback_allowed
from sdxl.guard.url_policy import refusal as refusal

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = "sdxl-cog/0.1"
SLICE = 0.25  # the longest a download blocks in one call: a cancel is seen after at most this long


class _Aborted(FetchError):
    """A parallel part stopped because another part failed."""


class _DeadlinePassed(TimeoutError):
    """The download's deadline passed before a socket operation could start."""


class DownloadCancelled(FetchError):
    """The request was cancelled: its downloads stop."""


READ_TIMEOUT_ENV = "SDXL_FETCH_READ_TIMEOUT"  # seconds of silence before a download is abandoned
DEADLINE_ENV = "SDXL_FETCH_DEADLINE"  # seconds for a whole download (redirects, ranges), whatever the sender does


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout: float = 10.0  # the name lookup, each address's connect, the TLS handshake
    read_timeout: float = 30.0  # the longest silence between two reads
    deadline: float = 1800.0  # the whole download, redirects and ranges included, whatever the sender does
    parallel_min_bytes: int = 64 << 20  # below this a single stream is as fast
    parallel_parts: int = 8
    chunk_bytes: int = 1 << 20


def timeouts_from_env() -> dict[str, float]:
    """The operator's read timeout and deadline (FetchLimits' defaults where unset), shared by every kind of download."""
    return {
        "read_timeout": float(os.environ.get(READ_TIMEOUT_ENV) or FetchLimits.read_timeout),
        "deadline": float(os.environ.get(DEADLINE_ENV) or FetchLimits.deadline),
    }


def human_size(count: int) -> str:
    return f"{count} bytes" if count < 10**6 else f"{count / 1e6:,.1f} MB"


class _Clock:
    """One download's deadline, and the stop signal of its parallel parts. Every socket operation asks it for its
    timeout: never longer than the time left, so a sender that trickles bytes cannot hold the download past it."""

    def __init__(self, limits: FetchLimits, field: str, deadline: float | RequestDeadline | None = None):
        self.limits, self.field = limits, field
        own = time.monotonic() + limits.deadline
        self.cancelled = deadline.cancelled if isinstance(deadline, RequestDeadline) else None
        self.request_seconds = deadline.seconds if isinstance(deadline, RequestDeadline) else None
        if isinstance(deadline, RequestDeadline):
            self.deadline = min(own, deadline.at)
        else:
            self.deadline = own if deadline is None else deadline
        self.stopped = threading.Event()
        self.first_error: BaseException | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def timeout(self, longest: float) -> float:
        if self.cancelled is not None and self.cancelled.is_set():
            raise DownloadCancelled(self.field, "the download stopped: the request was cancelled")
        if self.stopped.is_set():
            raise _Aborted(self.field, "stopped: another part of the download failed")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed("the download deadline passed")
        return min(longest, left)

    def slice(self, give_up: float) -> float:
        """One short wait of an operation that gives up (TimeoutError) at `give_up` (time.monotonic() seconds)."""
        left = give_up - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return self.timeout(min(SLICE, left))

    def passed(self) -> bool:
        return time.monotonic() >= self.deadline

    def expired_message(self) -> str:
        own_end = self.limits.deadline
        if self.request_seconds is not None and self.request_seconds < own_end:
            return f"the request's downloads took longer than the {self.request_seconds:g}s allowed for them"
        return f"the download took longer than the {own_end:g}s allowed for it"

    def watch(self, sock: socket.socket) -> None:
        """Keep the socket for `fail` (a closed socket's descriptor is -1: shutting it down touches nothing)."""
        with self._lock:
            self._sockets.add(sock)

    def fail(self, error: BaseException) -> None:
        """Record the first failure, then wake every part blocked on a socket so that it stops now."""
        with self._lock:
            if self.first_error is None:
                self.first_error = error
            self.stopped.set()
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS, too
            except OSError:
                pass  # already closed


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it (status line, headers, body): each read waits at most
    min(read timeout, time left). Holds a makefile() reference, so the socket lives as long as the response."""

    def __init__(self, sock: socket.socket, clock: _Clock):
        self._sock, self._raw, self._clock = sock, sock.makefile("rb", buffering=0), clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        """Waits in slices until bytes come, the read timeout's silence passes, the deadline passes or a cancel.
        Reads the socket itself: the makefile() reader refuses every read after its first timeout."""
        silent_until = time.monotonic() + self._clock.limits.read_timeout
        while True:
            self._sock.settimeout(self._clock.slice(silent_until))
            try:
                return self._sock.recv_into(buffer)
            except TimeoutError:
                continue  # the slice ended in silence: check the clock again

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, clock: _Clock, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # http.client's own reader knows one timeout; read through the clock instead
        self.fp = io.BufferedReader(_DeadlineReader(sock, clock))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked addresses in order, whatever the host name resolves to now; keeps to the clock."""

    def __init__(self, target: Target, clock: _Clock):
        super().__init__(target.host, target.port, timeout=clock.limits.connect_timeout)
        self._target, self._clock = target, clock
        self.response_class = functools.partial(_DeadlineResponse, clock=clock)

    def connect(self):
        failures = []
        for address in self._target.addresses or (self._target.address,):
            try:
                self.sock = _connect((address, self._target.port), self._clock)
                break
            except OSError as error:  # e.g. an IPv6 address from an IPv4-only container: try the next one
                reason = _describe(error, self._clock)
                failures.append(f"{address}: {reason}")
                log.info("cannot connect to %s (%s); trying the next address if there is one", address, reason)
        else:
            raise ConnectionError(f"no address of {self._target.host} answered ({'; '.join(failures)})")
        self._clock.watch(self.sock)
        self.sock.settimeout(self._clock.timeout(self._clock.limits.read_timeout))  # bounds sending the request


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    def connect(self):
        super().connect()
        context = ssl.create_default_context()  # verifies the certificate against the host name, not the address
        self.sock = context.wrap_socket(self.sock, server_hostname=self._target.host, do_handshake_on_connect=False)
        self._clock.watch(self.sock)
        give_up = time.monotonic() + self._clock.limits.connect_timeout  # the whole handshake, not per read
        while True:
            self.sock.settimeout(self._clock.slice(give_up))
            try:
                self.sock.do_handshake()
                break
            except TimeoutError:
                continue  # the handshake goes on where it stopped
        self.sock.settimeout(self._clock.timeout(self._clock.limits.read_timeout))


def _connect(address: tuple[str, int], clock: _Clock) -> socket.socket:
    """A TCP connection to (ip, port), waited for in slices (a cancel is seen in one) up to the connect timeout."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        give_up = time.monotonic() + clock.limits.connect_timeout
        sock.setblocking(False)
        error = sock.connect_ex(address)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while error in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            if poller.poll(clock.slice(give_up) * 1000):
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        sock.setblocking(True)
        return sock
    except BaseException:
        sock.close()
        raise


def _request(target: Target, clock: _Clock, headers: dict[str, str]):
    kind = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = kind(target, clock)
    try:
        connection.request("GET", target.path, headers={"User-Agent": USER_AGENT, **headers})
        return connection, connection.getresponse()
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        raise FetchError(clock.field, f"cannot fetch {redact(target.url)}: {_describe(error, clock)}") from None
    except BaseException:
        connection.close()
        raise


def _describe(error: BaseException, clock: _Clock | None = None) -> str:
    """An error for the client: no URL in it (http.client's InvalidURL quotes the whole path and query)."""
    if isinstance(error, TimeoutError | socket.timeout):
        return clock.expired_message() if clock is not None and clock.passed() else "timed out"
    if isinstance(error, http.client.InvalidURL):
        return "the URL holds characters HTTP does not allow"
    return str(error) or type(error).__name__


def open_url(
    url: str,
    field: str,
    limits: FetchLimits,
    headers: dict[str, str] | None = None,
    resolver=None,
    deadline: float | RequestDeadline | None = None,
):
    """GET `url`, following redirects by hand and checking each hop. Returns (connection, response, final target).

    `deadline` (time.monotonic() seconds, or a request's RequestDeadline; either way at most now + limits.deadline)
    bounds every socket operation, including the caller's reads of the response body; a read past it raises
    TimeoutError.
    """
    return _open(url, _Clock(limits, field, deadline), headers or {}, resolver or system_resolver)


def _bounded(resolver: Resolver, clock: _Clock) -> Resolver:
    """The resolver, waited for at most min(connect timeout, time left): the URL's owner runs its DNS server too.
    getaddrinfo cannot be interrupted; a lookup that runs late ends in its own daemon thread, its answer unused."""

    def resolve(host: str, port: int) -> list[str]:
        answer: dict[str, object] = {}

        def lookup():
            try:
                answer["addresses"] = resolver(host, port)
            except BaseException as error:  # handed to the caller's thread
                answer["error"] = error

        thread = threading.Thread(target=lookup, name="fetch-resolve", daemon=True)
        thread.start()
        give_up = time.monotonic() + clock.limits.connect_timeout
        try:
            while thread.is_alive():
                thread.join(clock.slice(give_up))
        except TimeoutError:
            message = clock.expired_message() if clock.passed() else "the name server did not answer in time"
            raise TimeoutError(message) from None
        if "error" in answer:
            raise answer["error"]
        return answer["addresses"]

    return resolve


def _open(url: str, clock: _Clock, headers: dict[str, str], resolver: Resolver):
    resolver = _bounded(resolver, clock)
    target = check_url(url, clock.field, resolver)
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _request(target, clock, headers)
        if response.status not in REDIRECT_STATUSES:
            return connection, response, target
        location = response.getheader("Location")
        connection.close()
        if not location:
            raise FetchError(
                clock.field, f"{redact(target.url)} redirected (HTTP {response.status}) without a Location"
            )
        next_url = urljoin(target.url, location)
        log.info("%s redirects to %s", redact(target.url), redact(next_url))
        target = check_url(next_url, clock.field, resolver)
    raise FetchError(clock.field, f"more than {MAX_REDIRECTS} redirects")


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
    """Stream the body into `file` at `offset`; enforce the cap and the expected length (every read inside
    response.read keeps to the clock's deadline)."""
    written = 0
    while True:
        try:
            chunk = response.read(ctx.clock.limits.chunk_bytes)
        except (OSError, http.client.HTTPException) as error:
            message = _describe(error, ctx.clock)
            raise FetchError(ctx.clock.field, f"download failed after {written} bytes: {message}") from None
        if not chunk:
            break
        written += len(chunk)
        if offset + written > ctx.clock.limits.max_bytes:
            raise FetchError(
                ctx.clock.field, f"the file is larger than the {human_size(ctx.clock.limits.max_bytes)} allowed"
            )
        if length is not None and written > length:
            raise FetchError(ctx.clock.field, "the server sent more bytes than it announced")
        os.pwrite(file.fileno(), chunk, offset + written - len(chunk))
        ctx.progress.add(len(chunk))
    if length is not None and written != length:
        raise FetchError(ctx.clock.field, f"the connection closed after {written} of {length} bytes")
    return written


@dataclass
class _Download:
    """One download's state, shared by its parallel parts (the clock knows the field and the limits)."""

    url: str
    clock: _Clock
    resolver: Resolver
    progress: _Progress


def _content_length(response, ctx: _Download) -> int | None:
    value = response.getheader("Content-Length")
    if value is None:
        return None
    if not value.strip().isascii() or not value.strip().isdigit():  # "²" and "٣" are digits to isdigit()
        raise FetchError(ctx.clock.field, f"the server sent an invalid Content-Length {value!r}")
    length = int(value)
    if length > ctx.clock.limits.max_bytes:
        raise FetchError(
            ctx.clock.field,
            f"the file is {human_size(length)}, larger than the {human_size(ctx.clock.limits.max_bytes)} allowed",
        )
    return length


def _fetch_range(ctx: _Download, file, start: int, end: int, total: int) -> None:
    """One part of a parallel download: the server must answer 206 with exactly the bytes asked for."""
    try:
        connection, response, _ = _open(ctx.url, ctx.clock, {"Range": f"bytes={start}-{end}"}, ctx.resolver)
        try:
            expected = f"bytes {start}-{end}/{total}"
            if response.status != 206 or response.getheader("Content-Range", "").strip() != expected:
                raise FetchError(
                    ctx.clock.field,
                    f"the server answered a range request with HTTP {response.status} "
                    f"{response.getheader('Content-Range')!r}, expected 206 {expected!r}",
                )
            _copy_body(response, file, start, end - start + 1, ctx)
        finally:
            connection.close()
    except BaseException as error:
        ctx.clock.fail(error)  # the first failure is the one reported; the other parts stop now
        raise


def _parallel(ctx: _Download, file, total: int) -> None:
    parts = max(1, min(ctx.clock.limits.parallel_parts, total // ctx.clock.limits.chunk_bytes))
    bounds = [(total * i // parts, total * (i + 1) // parts - 1) for i in range(parts)]
    log.info("downloading %s in %d parallel ranges", ctx.progress.name, parts)
    pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="fetch")
    try:
        futures = [pool.submit(_fetch_range, ctx, file, start, end, total) for start, end in bounds]
        while wait(futures, timeout=SLICE, return_when=FIRST_EXCEPTION).not_done:
            if any(future.done() and future.exception() for future in futures):
                break  # a cancel raised in this thread lands between the slices
        if any(future.done() and future.exception() for future in futures):
            raise ctx.clock.first_error
    except BaseException as error:
        ctx.clock.fail(error)  # a cancel stops every part at once
        raise
    finally:
        pool.shutdown(wait=True)


def fetch_to_file(
    url: str,
    directory: Path,
    field: str,
    limits: FetchLimits,
    resolver: Resolver | None = None,
    deadline: float | RequestDeadline | None = None,
    reserve: Callable[[int | None], int] | None = None,
) -> Path:
    """Download `url` into a new temporary file in `directory` and return its path (the caller owns it).

    `reserve`, when given, is told the size the server announces (None without a Content-Length) before any byte of
    the body is written, and answers how many bytes may be written: the download is capped to that.

    The whole download (redirects and parallel ranges included) ends by `deadline` (time.monotonic() seconds, or
    the request's RequestDeadline, whose cancel stops it within SLICE; at most now + limits.deadline). On any failure, the temporary file is removed and a FetchError naming `field`
    is raised.
    """
    handle, name = tempfile.mkstemp(prefix=".download-", dir=directory)
    path = Path(name)
    ctx = _Download(url, _Clock(limits, field, deadline), resolver or system_resolver, _Progress(redact(url), None))
    try:
        with os.fdopen(handle, "r+b") as file:
            connection, response, target = _open(url, ctx.clock, {}, ctx.resolver)
            try:
                if response.status != 200:
                    raise FetchError(field, f"{redact(target.url)} answered HTTP {response.status} {response.reason}")
                length = _content_length(response, ctx)
                if reserve is not None:
                    ctx.clock.limits = dataclasses.replace(limits, max_bytes=min(limits.max_bytes, reserve(length)))
                    _content_length(response, ctx)  # refused if the announced size is over what was granted
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
