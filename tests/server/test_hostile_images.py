"""Hostile prediction images (`image`, `mask`): only PNG, JPEG and WebP are decoded, told by content; bombs are
refused from the header before any pixel is decoded; every refusal names the field. In process for each case, then
over HTTP against the real Cog server, measuring the worker's peak memory and showing it READY and unchanged."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from sdxl.errors import InputError
from sdxl.inputs.images import load_image, load_mask
from tools.testing.archives import png_header_only
from tools.testing.cog_server import CogServer, decode_png
from tools.testing.memory_probe import MB, cog_worker, growth_during, peak, reset_peak


def zero_png(width: int, height: int) -> bytes:
    """A real greyscale PNG of zeros, compressed row by row: a few dozen KB that decode to width x height bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row, parts = zlib.compressobj(9), bytes(width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def encoded(fmt: str, size=(64, 64), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def scan_bomb(scans: int, size: int = 4096) -> bytes:
    """A flat progressive JPEG whose last scan is repeated until it has `scans` scans: ~130 KB at 600, each scan
    one more decoding pass over all the pixels (measured 6.7-7.3 s of CPU at 600, 1.0 s at 64)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 140, 60)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last, own = data.rfind(b"\xff\xda"), data.count(b"\xff\xda")
    return data[:last] + data[last:-2] * (scans - own + 1) + b"\xff\xd9"


def chunky_png(chunks: int) -> bytes:
    """A 64x64 PNG with `chunks` empty ancillary chunks before its pixels: Pillow reads each in Python."""
    image = encoded("PNG")
    empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    return image[:33] + empty * chunks + image[33:]


def truncated_png() -> bytes:
    data = encoded("PNG", (64, 64), compress_level=0)
    return data[: len(data) // 2]


# (case, bytes, message after "<field>: ")
HOSTILE = [
    ("gif", encoded("GIF"), "could not be read as an image: it is a GIF; send a PNG, JPEG or WebP file"),
    ("bmp", encoded("BMP"), "could not be read as an image: it is a BMP"),
    ("tiff", encoded("TIFF"), "could not be read as an image: it is a TIFF"),
    ("text", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "could not be read as an image: it is unrecognised data"),
    ("header bomb above Pillow's guard", png_header_only(30_000, 30_000), "is too large; at most 16,777,216 pixels"),
    ("header bomb under Pillow's guard", png_header_only(5_000, 5_000), "5000x5000 is too large"),
    ("zlib bomb 8192x8192", zero_png(8192, 8192), "8192x8192 is too large"),
    ("truncated png", truncated_png(), "could not be decoded: the image data is corrupt or truncated"),
    ("jpeg of 600 scans", scan_bomb(600), "is a JPEG of more than 64 scans (progressive passes)"),
    ("png of 20,000 chunks", chunky_png(20_000), "has more than 16,384 PNG chunks"),
]
IDS = [case[0] for case in HOSTILE]


@pytest.mark.parametrize("field", ["image", "mask"])
@pytest.mark.parametrize("case, data, message", HOSTILE, ids=IDS)
def test_hostile_file_is_refused_naming_the_field_without_decoding(tmp_path, field, case, data, message):
    path = tmp_path / "upload.png"  # the name claims PNG whatever the content: only the content counts
    path.write_bytes(data)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    loader = load_image if field == "image" else load_mask
    growth, result = growth_during(lambda: loader(path, field))
    assert isinstance(result, InputError), result
    assert result.field == field and str(result).startswith(f"{field}: {message}"), str(result)
    # Measured: < 1 MB for every case (the 8192x8192 bomb would decode to 64 MB, 192 MB as RGB).
    assert growth < 8 * MB, f"{case}: peak RSS rose {growth / MB:.1f} MB"
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's process-wide guard is left as it was


def test_decode_work_is_bounded_before_decoding(tmp_path):
    """At the caps (4096x4096, 64 scans) an image decodes in ~1 s here; past them it is refused from a walk over its
    markers in milliseconds, where decoding the 600-scan file would take ~7 s."""
    bomb, at_cap, chunks = tmp_path / "bomb.jpg", tmp_path / "cap.jpg", tmp_path / "chunks.png"
    bomb.write_bytes(scan_bomb(600))
    at_cap.write_bytes(scan_bomb(64))
    chunks.write_bytes(chunky_png(16_000))
    started = time.process_time()
    with pytest.raises(InputError, match="more than 64 scans"):
        load_image(bomb)
    refused = time.process_time() - started
    assert refused < 0.5, f"refusal took {refused:.2f} s of CPU"
    started = time.process_time()
    assert load_image(at_cap).size == (4096, 4096) and load_image(chunks).size == (64, 64)
    decoded = time.process_time() - started
    print(
        f"600 scans refused in {refused * 1000:.0f} ms; 64 scans at 4096 px + 16,000 chunks decoded in {decoded:.2f} s"
    )
    assert decoded < 15, f"decoding at the caps took {decoded:.1f} s of CPU"


@pytest.mark.parametrize("fmt, name", [("JPEG", "photo.png"), ("PNG", "photo.gif"), ("WEBP", "photo.bin")])
def test_accepted_formats_are_told_by_content_not_by_name(tmp_path, fmt, name):
    path = tmp_path / name
    path.write_bytes(encoded(fmt, (80, 64)))
    assert load_image(path).size == (80, 64)


# --- over HTTP ------------------------------------------------------------------------------------------------------

GOOD = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
REQUEST = {"prompt": "a red bicycle", "num_inference_steps": 2, "seed": 11, "prompt_strength": 0.6}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()  # the client may lie about the type


def good_png() -> bytes:
    buffer = io.BytesIO()
    GOOD.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_weights_dir, tmp_path_factory):
    cog = CogServer(tiny_weights_dir, tmp_path_factory.mktemp("cog-hostile-images") / "server.log")
    try:
        assert cog.wait_for("READY", "SETUP_FAILED")["status"] == "READY", cog.log()
        yield cog
    finally:
        cog.stop()


def _img2img(server: CogServer, image: bytes, mask: bytes | None = None) -> dict:
    inputs = {**REQUEST, "image": data_uri(image)}
    if mask is not None:
        inputs.update(mask=data_uri(mask), width=64, height=64)
    response = server.predict(inputs)
    assert response.status_code == 200, response.text
    return response.json()


def test_hostile_images_over_http_leave_the_server_ready_and_unchanged(server):
    before = _img2img(server, good_png())
    assert before["status"] == "succeeded", before.get("error")
    worker = cog_worker(server.process.pid)
    for field in ("image", "mask"):
        for case, data, message in HOSTILE:
            reset_peak(worker)
            resident = peak(worker)
            started = time.monotonic()
            body = _img2img(server, data) if field == "image" else _img2img(server, good_png(), data)
            seconds, growth = time.monotonic() - started, peak(worker) - resident
            assert body["status"] == "failed", (field, case, body.get("status"))
            assert f"{field}: {message}" in body["error"], (field, case, body["error"])
            # Measured: peak worker RSS rose < 2 MB per case, each answered in < 0.5 s (coglet's own download of
            # the data URI included). A decoded 8192x8192 bomb alone would add 64-192 MB.
            assert growth < 24 * MB, f"{field} {case}: worker peak rose {growth / MB:.1f} MB"
            print(f"{field} {case}: worker peak +{growth / MB:.1f} MB in {seconds:.2f}s")
            assert seconds < 20, f"{field} {case}: {seconds:.1f}s"
    # coglet reports READY a moment after it answers; a server that stays BUSY still fails here.
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
    after = _img2img(server, good_png())
    assert after["status"] == "succeeded", after.get("error")
    np.testing.assert_array_equal(decode_png(after["output"][0]), decode_png(before["output"][0]))


def test_the_memory_probe_sees_a_decoded_bomb(tmp_path):
    """The control for the bounds above: had the 8192x8192 bomb been decoded, the probe would have seen it."""
    path = tmp_path / "bomb.png"
    path.write_bytes(zero_png(8192, 8192))

    def decode_it():
        with Image.open(path) as image:
            image.load()
            return image.size

    growth, size = growth_during(decode_it)
    assert size == (8192, 8192)
    assert growth > 60 * MB  # measured: +64 MB (one byte per pixel)
