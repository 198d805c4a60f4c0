"""The URL fetcher: the address check (literal addresses and a resolver stub: nothing but loopback is ever
connected to), then real downloads from a loopback server."""

import errno
import logging
import os
import shutil
import socket
import subprocess

import pytest

from sdxl.guard import remote
from sdxl.guard.remote import FetchError, FetchLimits
from tools.testing.file_server import FileServer

FIELD = "replicate_weights"


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setenv(remote.ALLOW_LOOPBACK_ENV, "1")


@pytest.fixture
def server(loopback):
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def no_connect(monkeypatch):
    """Any connection attempt fails the test: refusals must happen before connecting."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(remote, "_connect", refuse)


def stub(*addresses):
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    "address, reason",
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "not a public"),  # carrier-grade NAT
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),  # broadcast
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("::ffff:127.0.0.1", "loopback"),
        ("fe80::1%eth0", "link-local"),
        ("fec0::1", "a site-local address"),  # deprecated, and not covered by ipaddress' is_private
        ("2002:a00:1::1", "a 6to4 address embedding 10.0.0.1, a private address"),
        ("2002:a9fe:a9fe::1", "a 6to4 address embedding 169.254.169.254, a link-local address"),
        ("2002:7f00:1::1", "a 6to4 address embedding 127.0.0.1, a loopback address"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo tunnel address (server 65.54.227.120, client 192.0.2.45)"),
        ("2001:0:808:808:8000:63bf:f7f7:f7f7", "a Teredo tunnel address"),  # public server and client: still refused
        ("::10.0.0.1", "an IPv4-compatible address embedding 10.0.0.1, a private address"),
        ("::8.8.8.8", "a reserved address"),  # the deprecated form itself, even with a public IPv4 inside
        ("::ffff:0:a00:1", "an IPv4-translated address embedding 10.0.0.1, a private address"),
        ("64:ff9b::a00:1", "a NAT64 address embedding 10.0.0.1, a private address"),
        ("64:ff9b::a9fe:a9fe", "a NAT64 address embedding 169.254.169.254, a link-local address"),
        (
            "64:ff9b:1::a00:1",
            "a reserved address",
        ),  # local-use NAT64 prefix: where the IPv4 sits is the network's choice
        ("weights.example", "not an IP address"),  # a resolver that answers garbage
    ],
)
def test_refused_addresses(address, reason):
    assert reason in remote.refusal(address, allow_loopback=False)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "151.101.1.1",
        "::ffff:8.8.8.8",  # IPv4-mapped: the same socket as 8.8.8.8
        "64:ff9b::808:808",  # DNS64's answer for an IPv4-only public host, from an IPv6-only cluster
        "2002:808:808::1",  # 6to4 around a public IPv4
    ],
)
def test_public_addresses_pass(address):
    assert remote.refusal(address, allow_loopback=False) is None


def test_loopback_passes_only_with_the_setting():
    assert remote.refusal("127.0.0.1", allow_loopback=True) is None
    assert remote.refusal("::1", allow_loopback=True) is None
    assert remote.refusal("::ffff:127.0.0.1", allow_loopback=True) is None
    assert remote.refusal("10.0.0.1", allow_loopback=True) == "a private address"


@pytest.mark.parametrize("address", ["2002:7f00:1::1", "64:ff9b::7f00:1", "::127.0.0.1", "::ffff:0:7f00:1"])
def test_the_loopback_setting_never_reaches_through_a_translator(address):
    """A 6to4 relay or NAT64 gateway would connect to ITS loopback: refused even in tests."""
    assert "embedding 127.0.0.1, a loopback address" in remote.refusal(address, allow_loopback=True)


@pytest.mark.parametrize(
    "url, message",
    [
        ("file:///etc/passwd", "scheme file: is not allowed"),
        ("ftp://example.com/w.tar", "scheme ftp: is not allowed"),
        ("data:application/x-tar;base64,AAAA", "scheme data: is not allowed"),
        ("gopher://example.com/", "scheme gopher: is not allowed"),
        ("example.com/w.tar", r"scheme \(none\) is not allowed"),
        ("http://example.com/w.tar", "plain http is not allowed"),
        ("https://user:pw@example.com/w.tar", "credentials"),
        ("https:///w.tar", "has no host"),
        ("https://example.com:99999/w.tar", "not a valid URL"),
        ("", "is not a URL"),
    ],
)
def test_refused_urls(url, message, no_connect):
    with pytest.raises(FetchError, match=message) as error:
        remote.check_url(url, FIELD, stub("93.184.215.14"))
    assert error.value.field == FIELD and str(error.value).startswith(f"{FIELD}: ")


@pytest.mark.parametrize(
    "addresses",
    [
        ("10.0.0.1",),
        ("169.254.169.254",),
        ("93.184.215.14", "192.168.0.1"),
        ("127.0.0.1",),
        ("2606:4700:4700::1111", "2002:a9fe:a9fe::1"),  # dual-stack answer whose IPv6 hides the metadata address
        ("64:ff9b::a00:1",),
        ("fec0::1", "93.184.215.14"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2",),
    ],
)
def test_host_resolving_to_a_refused_address(addresses, no_connect):
    """Every resolved address is checked: one bad answer among good ones refuses the host."""
    with pytest.raises(FetchError, match="refused: weights.example resolves to"):
        remote.check_url("https://weights.example/w.tar", FIELD, stub(*addresses))


@pytest.mark.parametrize("url", ["https://10.0.0.1/w.tar", "https://[fe80::1]/w.tar", "https://169.254.169.254/x"])
def test_literal_addresses_refused_before_connecting(url, no_connect, tmp_path):
    with pytest.raises(FetchError, match="refused"):
        remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=1000))
    assert list(tmp_path.iterdir()) == []


def test_checked_target_connects_to_the_checked_address():
    target = remote.check_url("https://weights.example:8443/a/b.tar?sig=1", FIELD, stub("93.184.215.14"))
    assert (target.host, target.port, target.address, target.path) == (
        "weights.example",
        8443,
        "93.184.215.14",
        "/a/b.tar?sig=1",
    )


def test_target_keeps_every_address_in_the_resolvers_order(no_connect):
    target = remote.check_url("https://weights.example/w", FIELD, stub("2606:4700:4700::1111", "93.184.215.14"))
    assert target.addresses == ("2606:4700:4700::1111", "93.184.215.14")
    assert target.address == "2606:4700:4700::1111"


def test_system_resolver_keeps_getaddrinfo_order(monkeypatch):
    """getaddrinfo sorts by RFC 6724 preference; that order is kept (it used to be sorted as text), repeats dropped."""
    answers = [("2606:4700:4700::1111", 443, 0, 0), ("93.184.215.14", 443), ("2606:4700:4700::1111", 443, 0, 0)]
    infos = [(socket.AF_INET6 if ":" in a[0] else socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in answers]
    monkeypatch.setattr(remote.socket, "getaddrinfo", lambda *args, **kwargs: infos)
    assert remote.system_resolver("weights.example", 443) == ["2606:4700:4700::1111", "93.184.215.14"]


def test_a_non_ascii_path_is_percent_encoded(no_connect):
    target = remote.check_url("https://weights.example/wé.tar?name=é", FIELD, stub("93.184.215.14"))
    assert target.path == "/w%C3%A9.tar?name=%C3%A9"


def test_http_needs_the_loopback_setting(monkeypatch, no_connect):
    monkeypatch.delenv(remote.ALLOW_LOOPBACK_ENV, raising=False)
    with pytest.raises(FetchError, match="plain http is not allowed"):
        remote.check_url("http://127.0.0.1:1/w.tar", FIELD)
    with pytest.raises(FetchError, match="loopback address"):
        remote.check_url("https://127.0.0.1:1/w.tar", FIELD)


def test_the_ports_setting_allows_loopback_on_the_listed_ports_only(monkeypatch, no_connect):
    """The playground's setting: its file server's port, never another loopback port (the predictor's own)."""
    monkeypatch.delenv(remote.ALLOW_LOOPBACK_ENV, raising=False)
    monkeypatch.setenv(remote.ALLOW_LOOPBACK_PORTS_ENV, "7861")
    assert remote.check_url("http://127.0.0.1:7861/trained/x/trained_model.tar", FIELD).addresses == ("127.0.0.1",)
    for url in ("http://127.0.0.1:5000/shutdown", "http://127.0.0.1/w.tar", "https://127.0.0.1:443/w.tar"):
        with pytest.raises(FetchError, match="plain http is not allowed|loopback address"):
            remote.check_url(url, FIELD)
    with pytest.raises(FetchError, match="private address"):
        remote.check_url("http://10.0.0.1:7861/w.tar", FIELD)


def test_http_with_the_setting_is_for_loopback_only(loopback, no_connect):
    with pytest.raises(FetchError, match="public address|loopback test servers only"):
        remote.check_url("http://weights.example/w.tar", FIELD, stub("93.184.215.14"))


# -- real downloads from 127.0.0.1 -------------------------------------------------------------------------------------


def test_download(server, tmp_path, caplog):
    body = os.urandom(300_000)
    url = server.serve("/w.bin", body)
    with caplog.at_level(logging.INFO, logger="sdxl.guard.remote"):
        path = remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=10**6))
    assert path.read_bytes() == body and path.parent == tmp_path
    assert server.requests["/w.bin"] == 1 and server.range_requests == []
    assert "downloaded" in caplog.text


def test_parallel_ranges(server, tmp_path):
    body = os.urandom(1_000_003)
    url = server.serve("/big.bin", body)
    limits = FetchLimits(max_bytes=2 * 10**6, parallel_min_bytes=500_000, parallel_parts=4, chunk_bytes=100_000)
    path = remote.fetch_to_file(url, tmp_path, FIELD, limits)
    assert path.read_bytes() == body
    assert len(server.range_requests) == 4
    ends = sorted(int(r.split("-")[1]) for r in server.range_requests)
    assert ends[-1] == len(body) - 1


def test_no_ranges_without_accept_ranges(server, tmp_path):
    server.ranges = False
    body = os.urandom(600_000)
    url = server.serve("/big.bin", body)
    limits = FetchLimits(max_bytes=10**6, parallel_min_bytes=100_000, chunk_bytes=50_000)
    assert remote.fetch_to_file(url, tmp_path, FIELD, limits).read_bytes() == body
    assert server.range_requests == []


def test_redirect_followed_and_rechecked(server, tmp_path):
    server.serve("/final.bin", b"weights")
    server.redirects["/start"] = "/final.bin"
    path = remote.fetch_to_file(server.url("/start"), tmp_path, FIELD, FetchLimits(max_bytes=100))
    assert path.read_bytes() == b"weights"


@pytest.mark.parametrize(
    "location, message",
    [
        ("http://10.0.0.1/w.tar", "10.0.0.1, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[fd00::1]/w.tar", "private"),
        ("file:///etc/passwd", "scheme file:"),
    ],
)
def test_redirect_to_a_refused_host(server, tmp_path, location, message, monkeypatch):
    server.redirects["/start"] = location
    real = remote._connect

    def loopback_only(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "::1"), f"connected to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(remote, "_connect", loopback_only)
    with pytest.raises(FetchError, match=message):
        remote.fetch_to_file(server.url("/start"), tmp_path, FIELD, FetchLimits(max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_redirect_loop_is_capped(server, tmp_path):
    server.redirects["/a"] = "/b"
    server.redirects["/b"] = "/a"
    with pytest.raises(FetchError, match=f"more than {remote.MAX_REDIRECTS} redirects"):
        remote.fetch_to_file(server.url("/a"), tmp_path, FIELD, FetchLimits(max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_not_found(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        remote.fetch_to_file(server.url("/missing.tar"), tmp_path, FIELD, FetchLimits(max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_stalled_server_times_out(server, tmp_path):
    server.stalls.add("/slow")
    with pytest.raises(FetchError, match="timed out"):
        remote.fetch_to_file(server.url("/slow"), tmp_path, FIELD, FetchLimits(max_bytes=100, read_timeout=0.3))
    assert list(tmp_path.iterdir()) == []


def test_over_the_cap_by_content_length(server, tmp_path):
    url = server.serve("/big.bin", b"x" * 5000)
    with pytest.raises(FetchError, match="larger than"):
        remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=4999))
    assert list(tmp_path.iterdir()) == []


def test_over_the_cap_while_streaming(server, tmp_path):
    """No Content-Length: the cap is enforced on the bytes that arrive."""
    url = server.serve("/big.bin", b"x" * 50_000)
    server.no_length.add("/big.bin")
    with pytest.raises(FetchError, match="larger than"):
        remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=20_000, chunk_bytes=4096))
    assert list(tmp_path.iterdir()) == []


def test_refused_early_without_a_request(server, tmp_path, monkeypatch):
    monkeypatch.delenv(remote.ALLOW_LOOPBACK_ENV)
    url = server.serve("/w.bin", b"w")
    with pytest.raises(FetchError):
        remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=100))
    assert server.requests["/w.bin"] == 0


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An https server on 127.0.0.1 with a self-signed certificate for `localhost`, trusted through SSL_CERT_FILE."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = FileServer(tls=(cert, key))
    yield server
    server.close()


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_server, tmp_path, loopback):
    """The resolver's (checked) answer is where the connection goes; TLS still checks the certificate's name."""
    url = tls_server.serve("/w.bin", b"secure weights")
    limits = remote.FetchLimits(max_bytes=100)
    path = remote.fetch_to_file(tls_server.url("/w.bin", "localhost"), tmp_path, FIELD, limits, stub("127.0.0.1"))
    assert path.read_bytes() == b"secure weights"
    with pytest.raises(FetchError, match="certificate verify failed|match"):
        remote.fetch_to_file(url, tmp_path, FIELD, limits)  # 127.0.0.1 is not the certificate's name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".download")] == [path.name]


# -- every resolved address, in order ----------------------------------------------------------------------------------


def hold_closed_on_ipv6_loopback(port: int) -> socket.socket | None:
    """Bind ::1:`port` without listening, so a connection there is refused (and nothing else can listen there
    meanwhile). Without IPv6, connecting to ::1 fails anyway (no address): the same fall-through."""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.bind(("::1", port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            pytest.skip(f"something listens on [::1]:{port}")
        return None  # no IPv6 loopback here
    return sock


@pytest.fixture
def connections(monkeypatch):
    """Every address a connection is attempted to, in order; anything but loopback fails the test."""
    attempts, real = [], remote._connect

    def loopback_only(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "::1"), f"connected to {address}"
        attempts.append(address[0])
        return real(address, *args, **kwargs)

    monkeypatch.setattr(remote, "_connect", loopback_only)
    return attempts


def test_an_unreachable_address_falls_through_to_the_next(server, tmp_path, connections, caplog):
    """A dual-stack host seen from an IPv4-only container: its IPv6 address fails, its IPv4 address serves."""
    url = server.serve("/w.bin", b"weights").replace("127.0.0.1", "weights.test")
    closed = hold_closed_on_ipv6_loopback(server.httpd.server_port)
    try:
        with caplog.at_level(logging.INFO, logger="sdxl.guard.remote"):
            path = remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=100), stub("::1", "127.0.0.1"))
    finally:
        if closed:
            closed.close()
    assert path.read_bytes() == b"weights"
    assert connections == ["::1", "127.0.0.1"]
    assert "cannot connect to ::1" in caplog.text and server.requests["/w.bin"] == 1


def test_every_address_failing_names_each(server, tmp_path, connections):
    port = server.httpd.server_port
    server.close()  # nothing listens on 127.0.0.1:port any more
    closed = hold_closed_on_ipv6_loopback(port)
    try:
        with pytest.raises(FetchError, match=r"no address of weights.test answered \(::1: .*; 127.0.0.1: .*refused"):
            remote.fetch_to_file(
                f"http://weights.test:{port}/w.bin",
                tmp_path,
                FIELD,
                FetchLimits(max_bytes=100),
                stub("::1", "127.0.0.1"),
            )
    finally:
        if closed:
            closed.close()
    assert connections == ["::1", "127.0.0.1"] and list(tmp_path.iterdir()) == []


# -- credentials in URLs stay out of logs and errors -------------------------------------------------------------------

SECRET = "SECRETc0ffee"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"https://b.s3.amazonaws.com/w.tar?X-Amz-Signature={SECRET}", "https://b.s3.amazonaws.com/w.tar?..."),
        (f"https://h/w.tar#{SECRET}", "https://h/w.tar?..."),
        (f"https://user:{SECRET}@h/w.tar", "https://***@h/w.tar"),
        (f"https://h:99999/w?sig={SECRET}", "https://h:99999/w?..."),
        (f"https://[::1/w?sig={SECRET}", "https://[::1/w?..."),  # malformed: urlsplit would raise
        (f"/relative?sig={SECRET}", "/relative?..."),
        ("https://h/w.tar", "https://h/w.tar"),
    ],
)
def test_redact(url, shown):
    assert remote.redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"https://h:99999/w?X-Amz-Signature={SECRET}",  # invalid port
        f"https://?X-Amz-Signature={SECRET}",  # no host
        f"https://h/w?X-Amz-Signature={SECRET} x",  # a space
        f"https://h/w?X-Amz-Signature={SECRET}\x01",  # a control character (http.client would quote it whole)
        f"https://[::1/w?X-Amz-Signature={SECRET}",
        f"ftp://h/w?X-Amz-Signature={SECRET}",
        f"https://10.0.0.1/w?X-Amz-Signature={SECRET}",
    ],
)
def test_refusals_never_quote_the_query(url, no_connect):
    with pytest.raises(FetchError) as error:
        remote.check_url(url, FIELD)  # each is refused before resolving, or is a literal address
    assert SECRET not in str(error.value)


@pytest.mark.parametrize("outcome", ["served", "missing"])
def test_redirect_logs_and_errors_carry_no_query(server, tmp_path, caplog, outcome):
    """A presigned URL redirects to another presigned URL (the secret in its Location too), then is served or
    not found: neither the log lines (redirect hop, progress, result) nor the error hold the secret."""
    server.redirects[f"/start?X-Amz-Signature={SECRET}1"] = f"/final?X-Amz-Signature={SECRET}2"
    if outcome == "served":
        server.serve(f"/final?X-Amz-Signature={SECRET}2", b"weights")
    url = server.url(f"/start?X-Amz-Signature={SECRET}1")
    with caplog.at_level(logging.DEBUG):
        try:
            remote.fetch_to_file(url, tmp_path, FIELD, FetchLimits(max_bytes=100))
            error = ""
        except FetchError as failure:
            error = str(failure)
    assert "redirects to http://127.0.0.1" in caplog.text and "?..." in caplog.text
    assert ("HTTP 404" in error) == (outcome == "missing") and ("downloaded" in caplog.text) == (outcome == "served")
    assert SECRET not in caplog.text and SECRET not in error
