"""sdxl.inputs.file_inputs and sdxl.guard.egress_guard in this process: what a file input may be, the caps, the redirect checks,
and the audit-hook guard (in a subprocess: audit hooks cannot be removed). Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import base64
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from sdxl.errors import InputError
from sdxl.guard import remote
from sdxl.inputs import file_inputs

ROOT = Path(__file__).resolve().parents[2]
CAP = 1 << 20
LIMITS = file_inputs.FileInputLimits(CAP, remote.FetchLimits(max_bytes=CAP, read_timeout=5, deadline=20))


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setenv(remote.ALLOW_LOOPBACK_ENV, "1")


@pytest.fixture
def connections(monkeypatch):
    """Every address sdxl.guard.remote connects to (its one connect function), recorded; anything but loopback fails the test before connecting."""
    made = []
    real = remote._connect

    def recording(address, *args, **kwargs):
        made.append(address[0])
        assert address[0] in ("127.0.0.1", "::1"), f"a test tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(remote, "_connect", recording)
    return made


def fetch(value, tmp_path, limits=LIMITS, resolver=None) -> Path:
    return file_inputs.fetch_file_input(value, "image", tmp_path, limits, resolver)


def data_uri(payload: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(payload).decode()


def test_the_silent_listener_notices_a_connection(listener):
    # The refusal tests below rely on was_connected(); make sure it can see a connection at all.
    assert not listener.was_connected(wait=0)
    with socket.create_connection(("127.0.0.1", listener.port)):
        assert listener.was_connected()


@pytest.mark.parametrize(
    "value, message",
    [
        ("/etc/hostname", "image: a file path on the server is not accepted; give an https:// URL or a data: URI"),
        ("weights/model.safetensors", "image: a file path on the server is not accepted"),
        ("file:///etc/hostname", "image: the URL scheme file: is not allowed"),
        ("ftp://127.0.0.1/x.png", "image: the URL scheme ftp: is not allowed"),
        ("http://127.0.0.1/x.png", "image: plain http is not allowed; give an https:// URL"),
        ("data:image/png;base64", "image: the data: URI has no ',' after its media type"),
        ("data:image/png;base64,not base64!", "image: the data: URI is not valid base64"),
        (42, "image: expected a URL string, got int"),
    ],
)
def test_refused_values_name_the_field(value, message, tmp_path):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        fetch(value, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_server_path_is_refused_without_reading_it(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for clients")
    os.utime(secret, (1_000_000, 2_000_000))  # atime older than mtime: relatime records the next read
    with pytest.raises(InputError, match="^image: a file path on the server is not accepted"):
        fetch(str(secret), tmp_path / "work")
    assert secret.stat().st_atime == 1_000_000
    secret.read_bytes()
    assert secret.stat().st_atime != 1_000_000  # the check above could have failed


def test_a_pathlib_path_is_the_operators_own_file(tmp_path):
    photo = tmp_path / "photo.png"
    assert fetch(photo, tmp_path / "work") == photo  # the shell entry's `-i image=@photo.png`


def test_cogs_own_paths_are_refused(tmp_path):
    # Cog makes these from client strings; were it ever to convert our inputs again, they must not pass as trusted.
    from cog.types import Path as CogPath
    from cog.types import URLPath

    url_path = URLPath(source="https://example.com/x.png", filename="x.png", fileobj=None)
    for value in (CogPath("/etc/hostname"), url_path):
        with pytest.raises(InputError, match="^image: a file path on the server is not accepted"):
            fetch(value, tmp_path)


@pytest.mark.parametrize(
    "uri, expected",
    [
        (data_uri(b"\x89PNG\r\n" + bytes(range(256))), b"\x89PNG\r\n" + bytes(range(256))),
        ("data:text/plain;charset=utf-8;base64,aGVsbG8=", b"hello"),
        ("DATA:image/png;BASE64,aGVsbG8=", b"hello"),
        ("data:," + "a%20b%00", b"a b\x00"),  # percent-encoded, as RFC 2397 allows
        ("data:image/png;base64,aGVs\nbG8g\r\nd29y bGQ=", b"hello world"),  # line-wrapped base64
    ],
)
def test_data_uris_decode(uri, expected, tmp_path):
    assert fetch(uri, tmp_path).read_bytes() == expected


def test_a_large_data_uri_decodes_in_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(file_inputs, "DECODE_CHUNK", 64 << 10)  # 64 KiB slices of a 1.4 MB URI (default: 4 MiB)
    payload = os.urandom(CAP)
    uri = data_uri(payload)
    tracemalloc.start()
    path = fetch(uri, tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert path.read_bytes() == payload
    # Measured: 123 kB, one slice of the encoded text and its decoded bytes; a whole copy would be 1.4 MB.
    assert peak < 256 << 10


@pytest.mark.parametrize("extra", [1, 2, 3, 1000])  # each padding length
def test_an_oversized_data_uri_is_refused_before_decoding(tmp_path, extra):
    uri = data_uri(bytes(CAP + extra))
    tracemalloc.start()
    with pytest.raises(
        InputError, match=rf"^image: the data: URI holds {CAP + extra:,} bytes, more than the {CAP:,} allowed"
    ):
        fetch(uri, tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 10  # measured: 2 kB; decoding would have taken a megabyte
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [CAP - 2, CAP - 1, CAP])
def test_a_data_uri_at_the_cap_is_accepted(tmp_path, size):
    assert fetch(data_uri(bytes(size)), tmp_path).stat().st_size == size


def test_a_percent_encoded_data_uri_is_capped_by_its_length(tmp_path):
    with pytest.raises(
        InputError, match=r"^image: the data: URI holds up to 1,048,577 bytes, more than the 1,048,576 allowed"
    ):
        fetch("data:," + "a" * (CAP + 1), tmp_path)


def test_a_url_is_fetched_by_our_fetcher(files, loopback, connections, tmp_path):
    url = files.serve("/photo.png", b"png bytes")
    assert fetch(url, tmp_path).read_bytes() == b"png bytes"
    assert files.fetched == [("/photo.png", remote.USER_AGENT)]
    assert connections == ["127.0.0.1"]


def test_loopback_without_the_setting_makes_no_connection(listener, monkeypatch, tmp_path):
    monkeypatch.delenv(remote.ALLOW_LOOPBACK_ENV, raising=False)
    for url in (f"https://127.0.0.1:{listener.port}/x.png", f"https://localhost:{listener.port}/x.png"):
        with pytest.raises(InputError, match="^image: refused: .* a loopback address"):
            fetch(url, tmp_path)
    assert not listener.was_connected()


def test_a_redirect_to_an_internal_host_is_refused_before_connecting(files, loopback, connections, tmp_path):
    # files.test is the loopback server; internal.test is what an attacker's DNS would answer for a private host.
    names = {"files.test": ["127.0.0.1"], "internal.test": ["10.1.2.3"], "mixed.test": ["127.0.0.1", "169.254.169.254"]}

    def stub(host, port):
        return names.get(host, [host])  # a literal address resolves to itself

    port = files.httpd.server_port
    files.redirects["/to-internal"] = "http://internal.test/latest/meta-data/"
    files.redirects["/to-mixed"] = f"http://mixed.test:{port}/photo.png"
    files.redirects["/to-literal"] = "https://[::ffff:10.0.0.1]/x.png"
    for path, refused in (("/to-internal", "10.1.2.3"), ("/to-mixed", "169.254.169.254"), ("/to-literal", "10.0.0.1")):
        with pytest.raises(InputError, match=f"^image: refused: .*{refused}"):
            fetch(f"http://files.test:{port}{path}", tmp_path, resolver=stub)
    assert set(connections) == {"127.0.0.1"}  # only the loopback server was ever connected to
    assert [path for path, _ in files.fetched] == ["/to-internal", "/to-mixed", "/to-literal"]


def test_an_endless_body_is_cut_at_the_cap(files, loopback, tmp_path):
    for path, message in (
        ("/endless-announced", r"the file is 268\.4 MB, larger than the 1\.0 MB allowed"),
        ("/endless", r"the file is larger than the 1\.0 MB allowed"),
    ):
        files.finished.clear()
        with pytest.raises(InputError, match=f"^image: {message}"):
            fetch(files.url(path), tmp_path)
        assert files.finished.wait(10)
        # Measured: 2.4 MB (refused on Content-Length; the rest sat in socket buffers) and 5.8 MB of 256 MB.
        assert files.sent[path] < CAP + (16 << 20)
    assert list(tmp_path.iterdir()) == []


def test_local_files_removes_its_folder_in_every_case(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with file_inputs.local_files({"image": data_uri(b"a"), "mask": None}, LIMITS) as got:
        assert got["image"].read_bytes() == b"a" and got["mask"] is None
        assert got["image"].parent.name.startswith(file_inputs.WORK_PREFIX)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="^mask: a file path"):
        with file_inputs.local_files({"image": data_uri(b"a"), "mask": "/etc/hostname"}, LIMITS):
            pass
    assert list(tmp_path.iterdir()) == []
    with file_inputs.local_files({"image": tmp_path / "mine.png", "mask": ""}, LIMITS) as got:
        assert got == {"image": tmp_path / "mine.png", "mask": None}
    assert list(tmp_path.iterdir()) == []  # a local file needs no folder


def test_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv(file_inputs.MAX_IMAGE_ENV, "1000")
    monkeypatch.setenv(file_inputs.MAX_ARCHIVE_ENV, "2000")
    monkeypatch.setenv(remote.READ_TIMEOUT_ENV, "7")
    monkeypatch.setenv(remote.DEADLINE_ENV, "600")
    images, archives = file_inputs.FileInputLimits.for_images(), file_inputs.FileInputLimits.for_archives()
    assert (images.max_bytes, images.fetch.max_bytes, images.fetch.read_timeout) == (1000, 1000, 7.0)
    assert images.fetch.deadline == file_inputs.IMAGE_FETCH_DEADLINE  # an image never gets the archives' long deadline
    assert (archives.max_bytes, archives.fetch.max_bytes, archives.fetch.deadline) == (2000, 2000, 600.0)
    monkeypatch.setenv(remote.DEADLINE_ENV, "5")
    assert file_inputs.FileInputLimits.for_images().fetch.deadline == 5.0  # nor one longer than the operator's
    monkeypatch.setenv(file_inputs.MAX_IMAGE_ENV, "lots")
    with pytest.raises(ValueError, match="SDXL_MAX_IMAGE_BYTES='lots' is not allowed"):
        file_inputs.FileInputLimits.for_images()


# The egress guard: a fresh interpreter per case, since an audit hook stays for the process's life ------------------

GUARD_SCRIPT = textwrap.dedent(
    """
    import socket, sys, urllib.request
    import requests
    from sdxl.guard import egress_guard
    egress_guard.install()
    port = int(sys.argv[1])

    def attempt(name, action):
        try:
            action()
            print(name, "connected")
        except Exception as error:
            print(name, type(error).__name__, error)

    attempt("socket", lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
    attempt("socket6", lambda: socket.create_connection(("::1", port), timeout=2).close())
    attempt("name", lambda: socket.create_connection(("localhost", port), timeout=2).close())
    attempt("requests", lambda: requests.get(f"http://127.0.0.1:{port}/x", timeout=2))
    attempt("urllib", lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=2))
    attempt("private", lambda: socket.create_connection(("10.0.0.1", 80), timeout=2).close())
    attempt("metadata", lambda: socket.create_connection(("169.254.169.254", 80), timeout=2).close())
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("10.0.0.1", 53)))
    """
)


def _run_guarded(port: int, **env) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT, str(port)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def test_the_guard_refuses_every_connection_to_a_non_public_address(listener):
    outcome = _run_guarded(listener.port, **{remote.ALLOW_LOOPBACK_ENV: "0"})
    for name in ("socket", "requests", "urllib"):
        assert "refused: connection to 127.0.0.1" in outcome[name] and "a loopback address" in outcome[name], outcome
    assert "refused: connection to" in outcome["name"] and "a loopback address" in outcome["name"]  # localhost
    assert "refused: connection to ::1" in outcome["socket6"]
    assert "refused: connection to 10.0.0.1 port 80 (a private address)" in outcome["private"]
    assert "refused: connection to 169.254.169.254 port 80 (a link-local address)" in outcome["metadata"]
    assert "refused: connection to 10.0.0.1 port 53" in outcome["udp"]
    assert not listener.was_connected()  # nothing reached the loopback listener either


@pytest.mark.heavy
def test_the_guard_lets_loopback_through_with_the_setting(listener):
    outcome = _run_guarded(listener.port, **{remote.ALLOW_LOOPBACK_ENV: "1"})
    assert outcome["socket"] == "connected"
    assert listener.was_connected()
    assert "a private address" in outcome["private"]  # the setting is for loopback only


@pytest.mark.heavy
def test_the_guard_lets_loopback_through_to_the_listed_ports_only(listener):
    """The playground's setting: its own file server's port, not the predictor's or any other loopback port."""
    other = _run_guarded(listener.port, **{remote.ALLOW_LOOPBACK_ENV: "0", remote.ALLOW_LOOPBACK_PORTS_ENV: "1"})
    assert f"refused: connection to 127.0.0.1 port {listener.port} (a loopback address)" in other["socket"], other
    assert not listener.was_connected()
    listed = _run_guarded(
        listener.port, **{remote.ALLOW_LOOPBACK_ENV: "0", remote.ALLOW_LOOPBACK_PORTS_ENV: str(listener.port)}
    )
    assert listed["socket"] == "connected"
    assert listener.was_connected()


def test_the_shell_entry_hands_run_a_local_file_or_the_raw_url(tmp_path):
    spec = importlib.util.spec_from_file_location("cog_predict_script", ROOT / "scripts" / "cog_predict.py")
    shell = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shell)
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"png")
    kwargs = shell.resolve_inputs([f"image=@{photo}", "mask=https://example.com/mask.png", "seed=3"])
    assert kwargs["image"] == photo and isinstance(kwargs["image"], Path)  # the operator's own file, used as is
    assert kwargs["mask"] == "https://example.com/mask.png"  # not downloaded by cog: run() fetches it under the policy
    assert kwargs["seed"] == 3 and kwargs["num_inference_steps"] == 50  # the rest checked and defaulted by cog
