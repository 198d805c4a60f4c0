"""The playground (tools/playground/) in a real browser: Debian's headless Chromium, driven over WebDriver, on the
Gradio page, which talks to the real Cog server on tiny weights, all on loopback.

The playground runs in its own environment (.venv-playground, tools/playground/requirements.txt), apart from the model's.
Screenshots of the page are saved under a folder this module prints.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tools.testing import webdriver
from tools.testing.cog_server import ROOT, CogServer, decode_png, free_port

PLAYGROUND_PYTHON = ROOT / ".venv-playground" / "bin" / "python"
TINY = {"prompt": "a red bicycle", "width": 64, "height": 64, "num_inference_steps": 2}


def _why_not_runnable() -> str | None:
    if not PLAYGROUND_PYTHON.exists():
        return f"{PLAYGROUND_PYTHON} missing: run `bash scripts/setup_playground.sh`"
    return webdriver.missing()


_REASON = _why_not_runnable()
if _REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI installs the playground and its browser (scripts/setup_env.sh), yet: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"browser test: {_REASON}")


@pytest.fixture(scope="module")
def servers(tiny_weights_dir, tmp_path_factory):
    """A predictions server and a trainings server (--x-mode train), started side by side, and the port the
    playground serves trained tars on: the one loopback port the predictions server may fetch plain http from (as
    scripts/playground.sh runs it)."""
    folder, files_port = tmp_path_factory.mktemp("cog"), free_port()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("SDXL_ALLOW_LOOPBACK_HTTP", raising=False)
        env.setenv("SDXL_ALLOW_LOOPBACK_HTTP_PORTS", str(files_port))
        env.setenv("TMPDIR", str(folder))  # the trainer's scratch files and tar stay in this test's folder
        predict = CogServer(tiny_weights_dir, folder / "predict.log")
        trainer = {"COG_TRAIN_TYPE_STUB": "train.py:train"}
        train = CogServer(tiny_weights_dir, folder / "train.log", env=trainer, args=("--x-mode", "train"))
    try:
        predict.wait_for("READY")
        train.wait_for("READY")
        yield predict, train, files_port
    finally:
        predict.stop()
        train.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def playground(servers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    with running_playground(folder, [servers[0].url], servers[1].url, files_port=servers[2]) as url:
        yield url


@contextlib.contextmanager
def running_playground(folder: Path, server_urls: list[str], train_url: str | None = None, files_port: int = 0):
    """tools/playground/ in its own environment on a free loopback port, its files in `folder`; yields its URL."""
    port = free_port()
    command = [PLAYGROUND_PYTHON, "-m", "tools.playground", "--port", str(port)]
    command += [arg for url in server_urls for arg in ("--server", url)]
    command += ["--train-server", train_url] if train_url else []
    command += ["--files-port", str(files_port)]
    command += ["--output-dir", str(folder / "out"), "--busy-wait", "300", "--schema-wait", "60"]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    with open(folder / "playground.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_until_served(url, process, folder / "playground.log")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=15)


def _wait_until_served(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the playground exited:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the playground did not serve {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    chosen = os.environ.get("PLAYGROUND_SCREENSHOTS")  # pytest keeps only its last few temporary folders
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("playground-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(playground, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chromium")
    chromium = webdriver.Browser(folder / "profile", folder / "chromedriver.log")
    yield chromium
    chromium.close()


@pytest.fixture
def page(browser, playground):
    """The page, freshly loaded: every input at its schema default."""
    browser.open(playground)
    browser.find("#generate")
    return browser


def _field(name: str) -> str:
    return f"#input-{name} textarea, #input-{name} input"


def _status_number(browser) -> str | None:
    text = browser.text("#status")
    return text.split(" ", 1)[0] if text.startswith("#") else None


def generate(browser, timeout: float = 90, **values) -> str:
    """Type `values` into the form, press Generate, and return the request's final status text."""
    for name, value in values.items():
        browser.type(_field(name), str(value))
    before = _status_number(browser)
    browser.click("#generate")

    def finished():
        text = browser.text("#status")
        number = text.split(" ", 1)[0] if text.startswith("#") else None
        return text if number not in (None, before) and "⏳" not in text and "Sending" not in text else None

    return browser.wait(finished, timeout, "a final status")


def gallery_images(browser, playground: str) -> list[np.ndarray]:
    """The gallery's images, fetched from the playground as the browser shows them (thumbnails, one per image)."""
    sources = browser.attribute_all("#gallery .thumbnail-item img, #gallery .grid-wrap img", "src")
    unique = list(dict.fromkeys(sources))
    assert unique, "the gallery shows no image"
    return [np.asarray(Image.open(io.BytesIO(requests.get(src, timeout=10).content)).convert("RGB")) for src in unique]


def direct(server, **inputs) -> list[np.ndarray]:
    """The same request over HTTP straight to the server, as curl would send it."""
    response = server.predict(inputs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body
    return [decode_png(uri) for uri in body["output"]]


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def test_form_shows_every_input_of_the_schema(server, page):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()["components"]["schemas"]
    properties = schema["Input"]["properties"]
    shown = page.script("return [...document.querySelectorAll('[id^=input-]')].map(e => e.id)")
    assert shown == [f"input-{name}" for name in sorted(properties, key=lambda n: properties[n]["x-order"])]
    for name, prop in properties.items():
        text = page.text(f"#input-{name}")
        assert name in text and prop["description"].rstrip(".") in text, (name, text)
        if "minimum" in prop and "maximum" in prop:
            assert f"{_plain(prop['minimum'])} to {_plain(prop['maximum'])}" in text, (name, text)
        if prop.get("type") == "boolean":
            assert page.script(f"return document.querySelector('#input-{name} input').checked") is prop["default"]
        elif prop.get("type") in ("integer", "number") and "default" in prop:
            assert page.value(_field(name)) == _plain(prop["default"]), name
        elif "default" in prop:  # strings and choices
            assert page.value(_field(name)) == prop["default"], name
    # Choices come from the enum behind allOf/$ref: open the scheduler's list and read it.
    page.click(_field("scheduler"))
    options = page.wait(lambda: page.attribute_all("ul[role=listbox] li", "innerText"), 10, "scheduler choices")
    assert [option.replace("✓", "").strip() for option in options] == schema["scheduler"]["enum"]  # ✓ marks the value
    assert page.value(_field("scheduler")) == "K_EULER"


def test_text_to_image_equals_the_same_request_over_http(server, playground, page, screenshots):
    status = generate(page, **TINY, seed=42)
    assert "Done" in status and "seed 42" in status, status
    (shown,) = gallery_images(page, playground)
    np.testing.assert_array_equal(shown, direct(server, **TINY, seed=42)[0])
    assert "Using seed: 42" in page.value("#logs textarea")
    assert "seed 42" in page.text("#gallery")
    assert '"seed": 42' in page.text("#params").replace("\n", "").replace(" ", "").replace('"seed":42', '"seed": 42')
    page.script("window.scrollTo(0, 0)")
    page.screenshot(screenshots / "after-text-to-image.png")


def test_result_buttons_reuse_the_seed_and_feed_the_init_image(server, playground, page):
    status = generate(page, **TINY)  # no seed: the server draws one and logs it
    seed = int(re.search(r"seed (\d+)", status).group(1))
    page.click("#reuse-seed")
    page.wait(lambda: page.value(_field("seed")) == str(seed), 10, f"seed {seed} in the form")
    (first,) = gallery_images(page, playground)

    page.click("#use-init")
    page.find("#input-image img", timeout=10)
    status = generate(page, prompt_strength=0.5)
    assert "Done" in status, status
    (second,) = gallery_images(page, playground)
    init = io.BytesIO()
    Image.fromarray(first).save(init, format="PNG")
    init_uri = "data:image/png;base64," + base64.b64encode(init.getvalue()).decode()
    expected = direct(server, **TINY, seed=seed, prompt_strength=0.5, image=init_uri)
    np.testing.assert_array_equal(second, expected[0])


def test_img2img_upload_equals_the_same_request_over_http(server, playground, page, tmp_path):
    rng = np.random.default_rng(7)
    upload = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(upload)
    page.upload("#input-image input[type=file]", upload)
    page.find("#input-image img", timeout=20)
    status = generate(page, **TINY, seed=7, prompt_strength=0.6)
    assert "Done" in status, status
    (shown,) = gallery_images(page, playground)
    uri = "data:image/png;base64," + base64.b64encode(upload.read_bytes()).decode()
    np.testing.assert_array_equal(shown, direct(server, **TINY, seed=7, prompt_strength=0.6, image=uri)[0])


def test_a_controlnet_request_equals_the_same_request_over_http(server, playground, page, tmp_path):
    control = tmp_path / "map.png"
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (0, 0, 32, 64))
    edges.save(control)
    page.upload("#input-control_image input[type=file]", control)
    page.find("#input-control_image img", timeout=20)
    page.click(_field("controlnet"))
    page.wait(lambda: "canny" in page.attribute_all("ul[role=listbox] li", "innerText")[1], 10, "controlnet choices")
    page.script(
        "[...document.querySelectorAll('ul[role=listbox] li')].find(li => li.innerText.includes('canny')).dispatchEvent("
        "new MouseEvent('mousedown', {bubbles: true}))"
    )
    page.wait(lambda: page.value(_field("controlnet")) == "canny", 10, "canny chosen")
    status = generate(page, **TINY, seed=11)
    assert "Done" in status, status
    (shown,) = gallery_images(page, playground)
    uri = "data:image/png;base64," + base64.b64encode(control.read_bytes()).decode()
    np.testing.assert_array_equal(shown, direct(server, **TINY, seed=11, controlnet="canny", control_image=uri)[0])


def test_an_image_prompt_request_equals_the_same_request_over_http(server, playground, page, tmp_path):
    prompt_image = tmp_path / "style.png"
    Image.fromarray((np.random.RandomState(4).rand(40, 48, 3) * 255).astype("uint8")).save(prompt_image)
    page.upload("#input-ip_adapter_image input[type=file]", prompt_image)
    page.find("#input-ip_adapter_image img", timeout=20)
    status = generate(page, **TINY, seed=13)
    assert "Done" in status, status
    (shown,) = gallery_images(page, playground)
    uri = "data:image/png;base64," + base64.b64encode(prompt_image.read_bytes()).decode()
    np.testing.assert_array_equal(shown, direct(server, **TINY, seed=13, ip_adapter_image=uri)[0])
    assert not np.array_equal(shown, direct(server, **TINY, seed=13)[0])  # the image prompt steered it


def test_a_bad_value_shows_the_422_naming_the_field(server, page):
    status = generate(page, **{**TINY, "width": 5000})
    assert "refused the input (422)" in status, status
    assert "width: 5000 is greater than the maximum of 2048" in status, status
    # coglet reports READY a moment after it answers; a server that stays BUSY still fails here.
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"


def test_a_busy_server_is_waited_out_and_said_so(server, playground, page):
    for name, value in {**TINY, "seed": 3}.items():
        page.type(_field(name), str(value))
    # 15 steps: ~1.5 s on an idle machine, several times the ~0.3 s from the click to the playground's first POST.
    held = []
    long = threading.Thread(target=lambda: held.append(server.predict({**TINY, "num_inference_steps": 15})))
    long.start()
    try:
        server.wait_for("BUSY", timeout=10)
        page.click("#generate")
        busy = page.wait(lambda: "busy" in page.text("#status") and page.text("#status"), 30, "the busy message")
        assert "(409): waiting and retrying" in busy, busy
        status = page.wait(lambda: "⏳" not in page.text("#status") and page.text("#status"), 90, "the result")
        assert "Done" in status and "seed 3" in status, status
    finally:
        long.join(timeout=60)
    assert held[0].json()["status"] == "succeeded"


TINY_TRAINING = {"resolution": 64, "max_train_steps": 1, "lora_rank": 2, "train_batch_size": 1, "seed": 1}
TRAINED_FILES = ["lora.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]


def _photos_zip(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
            archive.writestr(f"photos/{i}.png", png.getvalue())
    return path


def _open_tab(page, name: str) -> None:
    page.script(
        "[...document.querySelectorAll('button[role=tab]')].find(e => e.innerText.trim() == arguments[0]).click()", name
    )


def test_training_tab_trains_and_its_tar_feeds_the_next_prediction(server, playground, page, tmp_path):
    _open_tab(page, "Train")
    for name, value in TINY_TRAINING.items():
        page.type(f"#train-input-{name} input, #train-input-{name} textarea", str(value))
    page.upload("#train-input-input_images input[type=file]", _photos_zip(tmp_path / "photos.zip"))
    page.find("#train-input-input_images [aria-label='photos.zip']", timeout=30)  # uploaded and listed
    page.click("#train")
    final = page.wait(
        lambda: (
            (text := page.text("#train-status")).startswith("#")
            and "⏳" not in text
            and "Training" not in text
            and text
        ),
        240,
        "the training's end",
    )
    assert "Done" in final, final
    assert "step 1/1" in page.value("#train-logs textarea")
    url = page.value("#trained-url textarea, #trained-url input")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/trained_model.tar"), url
    tar_bytes = requests.get(url, timeout=10).content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert (
            tar.getnames()[: len(TRAINED_FILES)] == TRAINED_FILES
        )  # the contract's files first; then files for other tools
    (download,) = page.attribute_all("#trained-tar a", "href")
    assert requests.get(download, timeout=10).content == tar_bytes  # the download button gives the same tar

    page.click("#use-trained")
    _open_tab(page, "Predict")
    page.wait(lambda: page.value(_field("replicate_weights")) == url, 10, "the tar's URL in replicate_weights")
    trained = {**TINY, "prompt": "a photo of TOK", "seed": 5}
    status = generate(page, **trained)
    assert "Done" in status, status
    assert "loaded" in page.value("#logs textarea") and "trained tokens" in page.value("#logs textarea")
    (shown,) = gallery_images(page, playground)
    np.testing.assert_array_equal(shown, direct(server, **trained, replicate_weights=url)[0])


def test_a_server_that_is_not_ready_is_explained(server, browser, tmp_path):
    missing = tmp_path / "no-weights-here"
    failed = CogServer(missing, tmp_path / "server.log")
    try:
        failed.wait_for("SETUP_FAILED")
        # Alone, it has no schema to build a form from (coglet answers 503): the playground says why and stops.
        command = [PLAYGROUND_PYTHON, "-m", "tools.playground", "--server", failed.url, "--port", str(free_port())]
        alone = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert alone.returncode != 0
        assert f"{failed.url} is SETUP_FAILED, not READY" in alone.stderr, alone.stderr
        assert f"the weight folder {missing} is incomplete" in alone.stderr  # the end of its setup logs
        # Beside a READY server, requests pass it over and the page says so.
        (tmp_path / "pg").mkdir()
        with running_playground(tmp_path / "pg", [failed.url, server.url]) as url:
            browser.open(url)
            status = generate(browser, **TINY, seed=9)
    finally:
        failed.stop()
    assert f"Done on {server.url}" in status.replace("\n", " ").replace("  ", " "), status
    assert f"{failed.url} is SETUP_FAILED, not READY" in status, status
