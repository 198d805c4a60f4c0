"""The download deadline holds whatever the sender does: a loopback server that trickles one byte at a time, each
just inside the read timeout (in the status line, the headers, the body, the parallel ranges, across redirects)
or that never answers the TLS handshake, cannot hold a fetch past its deadline. Loopback only."""

from __future__ import annotations

import os
import time

import pytest

from sdxl.guard import remote
from sdxl.guard.remote import FetchError, FetchLimits
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


def test_parallel_ranges_keep_to_the_deadline(trickle, tmp_path):
    """The first answer offers ranges; every range request then trickles."""
    total = 4_000_000

    def reply(head: str) -> bytes:
        if "Range:" not in head:
            return b"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nContent-Length: %d\r\n\r\n" % total, b""
        return b"HTTP/1.1 206 Partial Content\r\n" + b"X-Pad: " + b"y" * 1000

    server = trickle(reply=reply)
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

    monkeypatch.setattr(remote.socket, "create_connection", refuse)
    call = lambda: remote.fetch_to_file("http://weights.test/w.tar", tmp_path, FIELD, SLOW, slow_resolver)  # noqa: E731
    elapsed, error = timed_failure(call)
    assert f"cannot resolve 'weights.test': the download took longer than the {DEADLINE:g}s" in str(error), error
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + MARGIN, elapsed
