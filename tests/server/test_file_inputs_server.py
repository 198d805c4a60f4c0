"""File inputs over real HTTP: the Cog server (coglet) on 127.0.0.1, for predictions (image, mask) and trainings
(input_images). A path on the server is refused unread; URLs obey the network policy of sdxl.guard.remote (a loopback
listener without the test setting is never connected to, a redirect to a private address is refused before any
connection, a body is cut at the cap); data: URIs work and are capped; the server stays READY and leaves no files.
All traffic goes to 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import re
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sdxl.guard import remote
from tests.server.test_train_cog import TINY_INPUTS, _zip_of_images
from tools.testing.cog_server import ROOT, CogServer, child_pids, decode_png, png_data_uri
from tools.testing.file_input_servers import FolderPeak
from tools.testing.memory_probe import reset_peak
from tools.testing.proc import status_kb

IMAGE_CAP = 1_000_000  # SDXL_MAX_IMAGE_BYTES / SDXL_MAX_ARCHIVE_BYTES of the servers under test
LOOPBACK_CAP = 3_000_000  # the loopback server's: a few of remote's 1 MiB read chunks, to watch a download grow
IMG2IMG = {"prompt": "a lighthouse", "num_inference_steps": 2, "prompt_strength": 0.5, "seed": 7}
KEPT = ("sdxl-out-", "sdxl-trained-models")  # the latest request's outputs stay until the next one, by design


def _photo() -> Image.Image:
    return Image.radial_gradient("L").resize((128, 96)).convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _start(weights: Path, folder: Path, *args: str, **env: str) -> CogServer:
    (folder / "tmp").mkdir()
    settings = {"TMPDIR": str(folder / "tmp"), "SDXL_MAX_IMAGE_BYTES": str(IMAGE_CAP), **env}
    settings.setdefault(remote.ALLOW_LOOPBACK_ENV, "0")
    cog = CogServer(weights, folder / "server.log", env=settings, args=args)
    cog.tmp = folder / "tmp"
    if cog.wait_for("READY", "SETUP_FAILED", timeout=300)["status"] != "READY":
        cog.stop()
        raise RuntimeError(cog.log())
    cog.after_setup = set(os.listdir(cog.tmp))  # e.g. the (empty) trained-weights cache made at setup
    return cog


@pytest.fixture(scope="module")
def plain(tiny_weights_dir, tmp_path_factory):
    """A prediction server as in production: no loopback setting."""
    cog = _start(tiny_weights_dir, tmp_path_factory.mktemp("plain"))
    yield cog
    cog.stop()


@pytest.fixture(scope="module")
def loopback(tiny_weights_dir, tmp_path_factory):
    """A prediction server with SDXL_ALLOW_LOOPBACK_HTTP=1, so it may fetch from this test's loopback servers."""
    env = {remote.ALLOW_LOOPBACK_ENV: "1", "SDXL_MAX_IMAGE_BYTES": str(LOOPBACK_CAP)}
    cog = _start(tiny_weights_dir, tmp_path_factory.mktemp("loopback"), **env)
    yield cog
    cog.stop()


@pytest.fixture(scope="module")
def trainer(tiny_weights_dir, tmp_path_factory):
    """The training server (train mode), no loopback setting, the archive capped at IMAGE_CAP bytes."""
    env = {"COG_TRAIN_TYPE_STUB": "train.py:train", "SDXL_MAX_ARCHIVE_BYTES": str(IMAGE_CAP)}
    cog = _start(tiny_weights_dir, tmp_path_factory.mktemp("trainer"), "--x-mode", "train", **env)
    yield cog
    cog.stop()


@pytest.fixture(scope="module")
def trainer_loopback(tiny_weights_dir, tmp_path_factory):
    """The training server with SDXL_ALLOW_LOOPBACK_HTTP=1 and the archive capped at LOOPBACK_CAP bytes."""
    env = {
        "COG_TRAIN_TYPE_STUB": "train.py:train",
        "SDXL_MAX_ARCHIVE_BYTES": str(LOOPBACK_CAP),
        remote.ALLOW_LOOPBACK_ENV: "1",
    }
    cog = _start(tiny_weights_dir, tmp_path_factory.mktemp("trainer-loopback"), "--x-mode", "train", **env)
    yield cog
    cog.stop()


def _failed(cog: CogServer, body: dict, route: str = "predictions") -> str:
    response = requests.post(f"{cog.url}/{route}", json={"input": body}, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "failed", result
    _assert_ready_and_clean(cog)
    # coglet prefixes "Prediction failed: ... InputError: "; what follows is our message, which names the field.
    return re.match(r"(?:\w+ failed: )*(?:\w+Error: )?(.*)", result["error"], re.S).group(1)


def _assert_ready_and_clean(cog: CogServer) -> None:
    assert cog.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
    left = [name for name in os.listdir(cog.tmp) if name not in cog.after_setup and not name.startswith(KEPT)]
    assert left == [], left


def _untouched_secret(folder: Path) -> Path:
    """A real PNG on the server's disk whose atime would change if anything read it (relatime: atime < mtime)."""
    secret = folder / "secret.png"
    secret.write_bytes(_png_bytes(Image.new("RGB", (64, 64), "red")))
    os.utime(secret, (1_000_000, 2_000_000))
    return secret


def _assert_never_read(secret: Path) -> None:
    assert secret.stat().st_atime == 1_000_000
    secret.read_bytes()
    assert secret.stat().st_atime != 1_000_000  # the check can fail: reads do move atime on this filesystem


# Predictions -------------------------------------------------------------------------------------------------------


def test_a_path_on_the_server_is_refused_unread(plain, tmp_path):
    secret = _untouched_secret(tmp_path)
    error = _failed(plain, {**IMG2IMG, "image": str(secret)})
    assert error.startswith("image: a file path on the server is not accepted; give an https:// URL or a data: URI")
    error = _failed(plain, {**IMG2IMG, "image": png_data_uri(_photo()), "mask": str(secret)})
    assert error.startswith("mask: a file path on the server is not accepted")
    error = _failed(plain, {**IMG2IMG, "image": f"file://{secret}"})
    assert error.startswith("image: the URL scheme file: is not allowed")
    _assert_never_read(secret)


def test_a_loopback_url_without_the_setting_is_refused_unconnected(plain, listener):
    for field in ("image", "mask"):
        for url in (
            f"https://127.0.0.1:{listener.port}/photo.png",
            f"https://localhost:{listener.port}/photo.png",
            f"https://[::ffff:127.0.0.1]:{listener.port}/photo.png",
        ):
            error = _failed(plain, {**IMG2IMG, "image": png_data_uri(_photo()), field: url})
            assert error.startswith(f"{field}: refused: ") and "a loopback address" in error, error
        error = _failed(plain, {**IMG2IMG, field: f"http://127.0.0.1:{listener.port}/photo.png"})
        assert error.startswith(f"{field}: plain http is not allowed; give an https:// URL"), error
    assert not listener.was_connected()


def test_data_uris_work_and_an_oversized_one_is_refused(plain):
    response = plain.predict({**IMG2IMG, "image": png_data_uri(_photo())})
    assert response.json()["status"] == "succeeded", response.json()
    assert decode_png(response.json()["output"][0]).shape == (96, 128, 3)
    oversized = "data:image/png;base64," + base64.b64encode(bytes(IMAGE_CAP + 1)).decode()
    error = _failed(plain, {**IMG2IMG, "image": oversized})
    assert error.startswith("image: the data: URI holds 1,000,001 bytes, more than the 1,000,000 allowed"), error


def test_a_url_gives_the_same_image_as_a_data_uri_of_the_same_file(loopback, files):
    photo = _png_bytes(_photo())
    url = files.serve("/photo.png", photo)
    by_url = loopback.predict({**IMG2IMG, "image": url}).json()
    by_data = loopback.predict({**IMG2IMG, "image": "data:image/png;base64," + base64.b64encode(photo).decode()})
    assert by_url["status"] == "succeeded", by_url
    np.testing.assert_array_equal(decode_png(by_url["output"][0]), decode_png(by_data.json()["output"][0]))
    # Fetched by sdxl.guard.remote (its User-Agent), not by Cog's own downloader (python-requests): Cog left it to us.
    assert files.fetched == [("/photo.png", remote.USER_AGENT)]
    _assert_ready_and_clean(loopback)


@pytest.mark.parametrize(
    "location, refused",
    [
        ("https://10.0.0.1/photo.png", "private address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local address"),
        ("https://[fd00::1]/photo.png", "private address"),
        ("https://[::ffff:192.168.0.1]/photo.png", "private address"),
        ("http://0.0.0.0/photo.png", "unspecified address"),
    ],
)
def test_a_redirect_to_a_refused_address_is_refused_before_connecting(loopback, files, location, refused):
    files.redirects["/photo.png"] = location
    error = _failed(loopback, {**IMG2IMG, "image": files.url("/photo.png")})
    # "refused: HOST resolves to ..." is sdxl.guard.remote's check, made before any connection to HOST.
    assert error.startswith("image: refused: ") and refused in error, error
    assert files.fetched == [("/photo.png", remote.USER_AGENT)]


def test_an_oversized_body_is_cut_at_the_cap(loopback, files):
    (worker,) = child_pids(loopback.process.pid)
    files.pause = 0.01  # ~6 MB/s: the download takes long enough for the disk sampler to see it grow
    disk_peaks = {}
    for path, message in (
        ("/endless", "image: the file is larger than the 3.0 MB allowed"),
        ("/endless-announced", "image: the file is 268.4 MB, larger than the 3.0 MB allowed"),
    ):
        files.finished.clear()
        rss_before = status_kb(worker, "VmRSS")
        reset_peak(worker)
        with FolderPeak(loopback.tmp) as disk:
            error = _failed(loopback, {**IMG2IMG, "image": files.url(path)})
        assert error.startswith(message), error
        assert files.finished.wait(10)
        growth_kib = status_kb(worker, "VmHWM") - rss_before
        # Measured (endless / announced): the server got to send 3.2 MB / 64 kB of its 256 MB (the cap plus socket
        # buffers / the headers); the worker's peak memory grew 2.0 MiB / 48 KiB (one 1 MiB read chunk in flight);
        # the temporary folder peaked at 2.0 MiB (two chunks; the third would pass the cap) / 0 bytes.
        print(f"{path}: sent {files.sent[path]}, worker peak +{growth_kib} KiB, disk peak {disk.peak}")
        assert files.sent[path] < LOOPBACK_CAP + (16 << 20)
        assert growth_kib < 32 << 10
        assert disk.peak <= LOOPBACK_CAP  # a chunk that would pass the cap is never written
        disk_peaks[path] = disk.peak
    assert disk_peaks["/endless"] > 0  # the sampler did see the streamed download on disk


# Trainings ---------------------------------------------------------------------------------------------------------


def test_training_refuses_a_server_path_unread(trainer, tmp_path):
    secret = _untouched_secret(tmp_path)
    error = _failed(trainer, {"input_images": str(secret)}, route="trainings")
    assert error.startswith("input_images: a file path on the server is not accepted"), error
    _assert_never_read(secret)


def test_training_refuses_a_loopback_url_unconnected(trainer, listener):
    error = _failed(trainer, {"input_images": f"https://127.0.0.1:{listener.port}/photos.zip"}, route="trainings")
    assert error.startswith("input_images: refused: ") and "a loopback address" in error, error
    assert not listener.was_connected()


def test_training_caps_data_uris_and_passes_them_on(trainer):
    oversized = "data:application/zip;base64," + base64.b64encode(bytes(IMAGE_CAP + 1)).decode()
    error = _failed(trainer, {"input_images": oversized}, route="trainings")
    assert error.startswith("input_images: the data: URI holds 1,000,001 bytes, more than the 1,000,000 allowed"), error
    # Within the cap, the decoded bytes reach preprocessing (which says they are no archive; a real archive trains:
    # see test_train_cog.py).
    not_an_archive = "data:application/zip;base64," + base64.b64encode(b"hello").decode()
    error = _failed(trainer, {"input_images": not_an_archive}, route="trainings")
    assert error.startswith("input_images: is neither a zip nor a tar archive"), error


def _trained_files(cog: CogServer, archive: str) -> dict[str, bytes]:
    response = requests.post(
        f"{cog.url}/trainings", json={"input": {"input_images": archive, **TINY_INPUTS}}, timeout=600
    )
    result = response.json()
    assert result["status"] == "succeeded", result.get("error") or result.get("logs", "")[-2000:]
    tar = tarfile.open(fileobj=io.BytesIO(base64.b64decode(result["output"]["weights"].split(",", 1)[1])))
    return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_training_from_a_url_equals_training_from_a_data_uri(trainer_loopback, files):
    archive = _zip_of_images()
    by_url = _trained_files(trainer_loopback, files.serve("/photos.zip", archive))
    by_data = _trained_files(trainer_loopback, "data:application/zip;base64," + base64.b64encode(archive).decode())
    for name in ("lora.safetensors", "embeddings.pti", "special_params.json"):
        assert by_url[name] == by_data[name], name
    assert files.fetched == [("/photos.zip", remote.USER_AGENT)]  # fetched by sdxl.guard.remote, not by Cog
    _assert_ready_and_clean(trainer_loopback)


def test_training_refuses_a_redirect_to_a_private_address_and_cuts_a_long_body(trainer_loopback, files):
    files.redirects["/photos.zip"] = "https://[::ffff:10.0.0.1]/photos.zip"
    error = _failed(trainer_loopback, {"input_images": files.url("/photos.zip")}, route="trainings")
    assert error.startswith("input_images: refused: ") and "private address" in error, error
    error = _failed(trainer_loopback, {"input_images": files.url("/endless")}, route="trainings")
    assert error.startswith("input_images: the file is larger than the 3.0 MB allowed"), error
    assert files.finished.wait(10) and files.sent["/endless"] < LOOPBACK_CAP + (16 << 20)


# The second wall: Cog's own downloader in a worker with the egress guard ---------------------------------------------

GUARDED_PREDICTOR = textwrap.dedent(
    """
    from cog import BaseRunner, Path
    from cog_inputs import guard_worker_egress

    class Runner(BaseRunner):
        def setup(self) -> None:
            guard_worker_egress()

        def run(self, file: Path) -> str:  # a plain cog.Path: coglet downloads it itself before run()
            return open(file, "rb").read().decode()
    """
)


def test_the_egress_guard_stops_cogs_own_downloader(tmp_path, listener, files):
    # If a file input were ever declared as a plain cog.Path again (or Cog changed how it treats ours), coglet would
    # download it with requests, unchecked. The worker's egress guard still refuses the connection.
    (tmp_path / "guarded.py").write_text(GUARDED_PREDICTOR)
    env = {
        "COG_PREDICT_TYPE_STUB": "guarded.py:Runner",
        "PYTHONPATH": str(ROOT),
        remote.ALLOW_LOOPBACK_ENV: "0",
    }
    cog = CogServer(tmp_path, tmp_path / "server.log", env=env, cwd=tmp_path)  # no schema there: no validation
    try:
        assert cog.wait_for("READY", "SETUP_FAILED", timeout=120)["status"] == "READY", cog.log()
        result = cog.predict({"file": f"http://127.0.0.1:{listener.port}/secret"}).json()
        assert result["status"] == "failed", result
        assert not listener.was_connected()
        assert cog.wait_for("READY", timeout=10)["status"] == "READY"
    finally:
        cog.stop()
    assert "refused: connection to 127.0.0.1" in result["error"] + cog.log(), result
