"""The download deadline holds whatever the sender does: a loopback server that trickles one byte at a time, each
just inside the read timeout (in the status line, the headers, the body, the parallel ranges, across redirects)
or that never answers the TLS handshake, cannot hold a fetch past its deadline. One request's deadline covers all of
its downloads, and a cancel (an event, or an exception raised in the fetching thread) stops one within a second.
Loopback only."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest

from sdxl.guard import remote
from sdxl.guard.remote import FetchError, FetchLimits
from sdxl.guard.request_deadline import RequestDeadline
from tools.testing.slow_senders import TrickleServer

FIELD = "replicate_weights"
DEADLINE = 1.0
MARGIN = 0.5  # measured: every fetch below ended 0.00-0.02 s after its deadline on this 2-core machine
SLOW = FetchLimits(max_bytes=10**7, connect_timeout=10, read_timeout=5, deadline=DEADLINE)


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    monkeypatch.setenv(remote.ALLOW_LOOPBACK_ENV, "1")


@pytest.fixture
def trickle():
    servers = []

    def start(**kwargs) -> TrickleServer:
        servers.append(TrickleServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def body_reply(head: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000


def timed_failure(call) -> tuple[float, FetchError]:
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        call()
    return time.monotonic() - started, error.value


def assert_deadline_error(elapsed: float, error: FetchError, deadline: float = DEADLINE):
    assert error.field == FIELD and str(error).startswith(f"{FIELD}: ")
    assert f"took longer than the {deadline:g}s allowed" in str(error), str(error)
    assert deadline - 0.05 <= elapsed < deadline + MARGIN, elapsed


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(body_reply, id="body"),
        pytest.param(lambda head: b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * 1000 + b"\r\n\r\n", id="headers"),
        pytest.param(lambda head: b"HTTP/1.1 200 " + b"O" * 1000, id="status-line"),
    ],
)
def test_a_trickling_sender_cannot_outlast_the_deadline(trickle, tmp_path, reply):
    server = trickle(reply=reply)
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, SLOW))
    assert_deadline_error(elapsed, error)
    assert list(tmp_path.iterdir()) == []


def test_the_deadline_spans_redirects(trickle, tmp_path):
    """Each hop answers in 0.6 s (below the deadline), but the chain of hops as a whole must end by it."""
    hop = b"HTTP/1.1 302 Found\r\nLocation: /next\r\nContent-Length: 0\r\n\r\n"  # 60 bytes, 10 ms apart
    server = trickle(reply=lambda head: hop, every=0.01)
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, SLOW))
    assert_deadline_error(elapsed, error)
    assert len(server.requests) == 2  # the second hop was cut off by the deadline, not by a redirect cap


def _ranges_then_trickle(head: str):
    """The first answer offers ranges of 4 MB; every range request then gets headers that never end."""
    if "Range:" not in head:
        return b"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nContent-Length: %d\r\n\r\n" % 4_000_000, b""
    return b"HTTP/1.1 206 Partial Content\r\n" + b"X-Pad: " + b"y" * 1000


def test_parallel_ranges_keep_to_the_deadline(trickle, tmp_path):
    """The first answer offers ranges; every range request then trickles."""
    server = trickle(reply=_ranges_then_trickle)
    limits = FetchLimits(max_bytes=10**7, read_timeout=5, deadline=1.5, parallel_min_bytes=1, chunk_bytes=10**6)
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, limits))
    assert_deadline_error(elapsed, error, deadline=1.5)
    assert sum("Range:" in r for r in server.requests) == 4
    assert list(tmp_path.iterdir()) == []


def test_a_failing_part_stops_the_others_at_once(trickle, tmp_path):
    """One range is answered wrongly; the other three are trickling with a long read timeout and deadline: they are
    woken and stopped at once, and the error is the first part's, not the stopped parts'."""
    total = 4_000_000

    def reply(head: str) -> bytes:
        if "Range:" not in head:
            return b"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nContent-Length: %d\r\n\r\n" % total, b""
        if "Range: bytes=0-" in head:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""  # at once, and not a 206: this part fails
        return b"HTTP/1.1 206 Partial Content\r\n" + b"X-Pad: " + b"y" * 1000

    server = trickle(reply=reply)
    limits = FetchLimits(max_bytes=10**7, read_timeout=30, deadline=60, parallel_min_bytes=1, chunk_bytes=10**6)
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, limits))
    assert "answered a range request with HTTP 200" in str(error), str(error)
    assert elapsed < MARGIN, elapsed  # measured 0.01-0.03 s: the trickling parts did not wait for their next byte
    assert list(tmp_path.iterdir()) == []


def test_a_silent_tls_handshake_keeps_to_the_deadline(trickle, tmp_path):
    """The server accepts the connection and never answers the ClientHello: the handshake, not only reads, is
    bounded by the deadline (connect and read timeouts are 10 s and 5 s here)."""
    server = trickle(silent=True)
    url = server.url(scheme="https")
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(url, tmp_path, FIELD, SLOW))
    assert_deadline_error(elapsed, error)
    assert server.connections == 1


def test_open_url_bounds_the_callers_reads(trickle):
    """A caller of open_url who reads the body itself gets a TimeoutError at the deadline, however fast bytes come."""
    server = trickle(reply=lambda head: (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"x" * 1000))
    started = time.monotonic()
    connection, response, _ = remote.open_url(server.url(), FIELD, SLOW)
    try:
        with pytest.raises(TimeoutError):
            response.read()
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + MARGIN, elapsed


def test_an_explicit_deadline_is_shared(trickle, tmp_path):
    """`deadline=` (monotonic seconds) lets a caller give several fetches one end time."""
    server = trickle(reply=body_reply)
    end = time.monotonic() + 0.5
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, SLOW, deadline=end))
    assert 0.45 <= elapsed < 0.5 + MARGIN, elapsed
    assert "took longer" in str(error)


def test_a_fast_server_is_untouched_by_a_short_deadline(tmp_path):
    """The deadline stops slow senders, not downloads that finish in time (300 kB from loopback, deadline 1 s)."""
    from tools.testing.file_server import FileServer

    server = FileServer()
    try:
        body = os.urandom(300_000)
        url = server.serve("/w.bin", body)
        path = remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=10**6, deadline=DEADLINE))
        assert path.read_bytes() == body
    finally:
        server.close()


def test_a_slow_name_server_keeps_to_the_deadline(tmp_path, monkeypatch):
    """The URL's owner runs its DNS server too: a lookup that takes 5 s is abandoned at the 1 s deadline (and nothing
    is connected to)."""

    def slow_resolver(host, port):
        time.sleep(5)
        return ["127.0.0.1"]

    def refuse(*args, **kwargs):
        raise AssertionError("connected")

    monkeypatch.setattr(remote, "_connect", refuse)
    call = lambda: remote.fetch_to_file("http://weights.test/w.tar", tmp_path, FIELD, SLOW, slow_resolver)  # noqa: E731
    elapsed, error = timed_failure(call)
    assert f"cannot resolve 'weights.test': the download took longer than the {DEADLINE:g}s" in str(error), error
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + MARGIN, elapsed


def cancel_after(seconds: float) -> threading.Event:
    event = threading.Event()
    threading.Timer(seconds, event.set).start()
    return event


@pytest.mark.parametrize(
    "how", [pytest.param(dict(reply=body_reply), id="body"), pytest.param(dict(silent=True), id="tls-handshake")]
)
def test_a_cancel_stops_a_running_download_within_a_second(trickle, tmp_path, how):
    """The request's cancel event is set 0.3 s in; the read timeout (5 s), connect timeout (10 s) and deadline (60 s)
    are all far away: the download stops in the next slice, not at any of them."""
    server = trickle(**how)
    url = server.url(scheme="https" if how.get("silent") else "http")
    budget = RequestDeadline.start(60, cancelled=cancel_after(0.3))
    limits = FetchLimits(max_bytes=10**7, connect_timeout=10, read_timeout=5, deadline=60)
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(url, tmp_path, FIELD, limits, deadline=budget))
    assert isinstance(error, remote.DownloadCancelled) and error.field == FIELD, error
    assert 0.3 <= elapsed < 0.3 + 1.0, elapsed  # measured 0.31 s
    assert list(tmp_path.iterdir()) == []


def test_a_cancel_stops_parallel_ranges_within_a_second(trickle, tmp_path):
    server = trickle(reply=_ranges_then_trickle)
    limits = FetchLimits(max_bytes=10**7, read_timeout=30, deadline=60, parallel_min_bytes=1, chunk_bytes=10**6)
    budget = RequestDeadline.start(60, cancelled=cancel_after(0.3))
    call = lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, limits, deadline=budget)  # noqa: E731
    elapsed, error = timed_failure(call)
    assert isinstance(error, remote.DownloadCancelled), error
    assert elapsed < 0.3 + 1.0, elapsed
    assert list(tmp_path.iterdir()) == []


def test_an_exception_raised_in_the_fetching_thread_lands_within_a_second(trickle, tmp_path):
    """Cog cancels run() by raising an exception in its thread (PyThreadState_SetAsyncExc), which Python delivers
    only between bytecodes: the image fetch on that thread waits in slices, so it lands within one."""
    server = trickle(reply=body_reply)
    limits = FetchLimits(max_bytes=10**7, read_timeout=20, deadline=60)
    outcome: dict[str, object] = {}

    def fetch():
        try:
            remote.fetch_to_file(server.url(), tmp_path, FIELD, limits)
        except BaseException as error:  # the injected exception
            outcome["error"], outcome["at"] = error, time.monotonic()

    thread = threading.Thread(target=fetch)
    thread.start()
    time.sleep(0.3)
    raised = time.monotonic()
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Injected)) == 1
    thread.join(5)
    assert isinstance(outcome.get("error"), _Injected), outcome
    assert outcome["at"] - raised < 1.0, outcome["at"] - raised  # measured ~0.01 s
    assert list(tmp_path.iterdir()) == []


class _Injected(BaseException):
    """Stands for coglet's CancelationException."""


def test_one_deadline_covers_all_of_a_requests_downloads(trickle, tmp_path):
    """Three downloads, each allowed 60 s of its own, share the request's 1.5 s: all three end by it."""
    server = trickle(reply=body_reply)
    budget = RequestDeadline.start(1.5)
    limits = FetchLimits(max_bytes=10**7, read_timeout=5, deadline=60)
    started, errors = time.monotonic(), []
    for name in ("/a", "/b", "/c"):
        with pytest.raises(FetchError) as error:
            remote.fetch_to_file(server.url(name), tmp_path, FIELD, limits, deadline=budget)
        errors.append(str(error.value))
    elapsed = time.monotonic() - started
    assert 1.5 - 0.05 <= elapsed < 1.5 + MARGIN, elapsed
    assert all("the request's downloads took longer than the 1.5s allowed for them" in e for e in errors), errors


@pytest.mark.parametrize("value", ["²", "١٢", "+5", "5 5", "0x10"])
def test_content_length_takes_ascii_digits_only(trickle, tmp_path, value):
    """Python's isdigit() takes "²" and Arabic-Indic digits, which int() then refuses or reads: the header is refused
    plainly, naming the field and the value, before any body is read."""
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\n".encode()
    server = trickle(reply=lambda _: (head, b""))
    elapsed, error = timed_failure(lambda: remote.fetch_to_file(server.url(), tmp_path, FIELD, SLOW))
    as_sent = value.encode().decode("latin-1")  # how HTTP headers are read
    assert str(error) == f"{FIELD}: the server sent an invalid Content-Length {as_sent!r}", error
    assert elapsed < MARGIN and list(tmp_path.iterdir()) == []
