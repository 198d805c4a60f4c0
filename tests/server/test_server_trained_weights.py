"""Trained weights through the real Cog server: a LoRA tar served by a loopback HTTP server the test starts (also with a
ControlNet, and on the inpainting UNet, each equal to diffusers), the download cache, state left clean, and every hostile URL or archive answered with a clear error while the server
stays READY. Connections go only to 127.0.0.1: private and link-local addresses are refused before any connect."""

import io
import re
import tarfile

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save

from sdxl.model import weights
from sdxl.trained.weights_cache import url_key
from tools.testing.cog_server import decode_png, png_data_uri, ready_server
from tools.testing.file_server import FileServer
from tools.testing.trained import embeddings, lora_state, tar_bytes, trained_tar, write_lora

BASE = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 5}
BASE = {**BASE, "apply_watermark": False}
MAX_TRAINED_BYTES = 3_000_000


@pytest.fixture(scope="module")
def files():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(tiny_weights_dir, cache_dir, tmp_path_factory):
    env = {
        "SDXL_ALLOW_LOOPBACK_HTTP": "1",
        "SDXL_WEIGHTS_CACHE_DIR": str(cache_dir),
        "SDXL_MAX_TRAINED_BYTES": str(MAX_TRAINED_BYTES),
        "SDXL_FETCH_READ_TIMEOUT": "2",
    }
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("log") / "server.log", env) as cog:
        yield cog


@pytest.fixture(scope="module")
def reference(tiny_weights_dir):
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora(reference, tmp_path_factory):
    """A trained tar with a LoRA and two new token rows, and its LoRA state for the direct diffusers call."""
    state = lora_state(reference.unet, seed=3)
    widths = (reference.text_encoder.config.hidden_size, reference.text_encoder_2.config.hidden_size)
    rows = embeddings(widths, seed=4)
    return state, rows, trained_tar(tmp_path_factory.mktemp("tar"), lora=state, rows=rows)


def image_of(response) -> np.ndarray:
    body = response.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    return decode_png(body["output"][0])


def direct(pipe, prompt: str) -> np.ndarray:
    images = pipe(
        prompt=prompt,
        negative_prompt="",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images
    return np.asarray(images[0])


def test_a_trained_lora_equals_diffusers_and_is_cached(server, files, reference, lora, tmp_path):
    state, rows, tar = lora
    url = files.serve("/lora/trained_model.tar", tar)
    base = image_of(server.predict(BASE))

    trained = image_of(server.predict({**BASE, "replicate_weights": url, "lora_scale": 0.6}))
    assert not np.array_equal(trained, base)

    # Direct diffusers: load the same files, name the new tokens, scale the LoRA, same call.
    reference.load_lora_weights(write_lora(tmp_path, state), adapter_name="trained")
    reference.set_adapters(["trained"], adapter_weights=[0.6])
    tokens = ["<s0>", "<s1>"]
    reference.load_textual_inversion(
        rows["text_encoders_0"], token=tokens, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
    )
    reference.load_textual_inversion(
        rows["text_encoders_1"], token=tokens, text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
    )
    try:
        expected = direct(reference, "a photo of <s0><s1>")
    finally:
        reference.unload_lora_weights()
        reference.unload_textual_inversion(
            tokens=tokens, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
        )
        reference.unload_textual_inversion(
            tokens=tokens, text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
        )
    np.testing.assert_array_equal(trained, expected)

    # The same URL again is served from the cache: no new HTTP request.
    fetched = files.requests["/lora/trained_model.tar"]
    again = image_of(server.predict({**BASE, "replicate_weights": url, "lora_scale": 0.6}))
    assert files.requests["/lora/trained_model.tar"] == fetched
    np.testing.assert_array_equal(again, trained)

    # lora_scale 0 leaves the LoRA out (the tokens still stand for the trained word); and a request without trained
    # weights afterwards is the base image, bit for bit.
    assert not np.array_equal(image_of(server.predict({**BASE, "replicate_weights": url, "lora_scale": 0.0})), trained)
    np.testing.assert_array_equal(image_of(server.predict(BASE)), base)


def square_inpaint() -> dict:
    """An image and a white square to repaint, as the request's data: URIs and as the reference call's images."""
    rng = np.random.RandomState(2)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return {"image": image, "mask": mask}


def test_trained_weights_and_loras_on_the_inpainting_unet_equal_diffusers(
    server, files, reference, lora, tiny_weights_dir, tmp_path
):
    """A trained tar (LoRA and tokens) and a `loras` LoRA with inpaint_model=inpainting: diffusers' inpaint pipeline
    over the 9-channel UNet with load_lora_weights and load_textual_inversion draws the same pixels; the next plain
    inpainting request is the one before, bit for bit."""
    state, rows, tar = lora
    extra_state = lora_state(reference.unet, seed=8)
    trained_url = files.serve("/inpainting/trained_model.tar", tar)
    extra_url = files.serve("/inpainting/extra.safetensors", write_lora(tmp_path / "extra", extra_state).read_bytes())
    pictures = square_inpaint()
    inpaint = {**BASE, "image": png_data_uri(pictures["image"]), "mask": png_data_uri(pictures["mask"])}
    inpaint = {**inpaint, "prompt_strength": 0.9, "inpaint_model": "inpainting"}
    plain = image_of(server.predict(inpaint))
    weighted = {
        "replicate_weights": trained_url,
        "lora_scale": 0.6,
        "loras": f'[{{"url": "{extra_url}", "scale": 0.5}}]',
    }
    got = image_of(server.predict({**inpaint, **weighted}))

    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir / weights.INPAINTING_UNET.folder, subfolder="unet")
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, unet=unet, vae=reference.vae, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(write_lora(tmp_path / "trained", state), adapter_name="trained")
    pipe.load_lora_weights(write_lora(tmp_path / "extra", extra_state), adapter_name="extra")
    pipe.set_adapters(["trained", "extra"], adapter_weights=[0.6, 0.5])
    for i, (encoder, tokenizer) in enumerate(
        ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    ):
        pipe.load_textual_inversion(rows[f"text_encoders_{i}"], token=["<s0>", "<s1>"], text_encoder=encoder, tokenizer=tokenizer)  # fmt: skip
    expected = pipe(prompt="a photo of <s0><s1>", negative_prompt="", image=pictures["image"],
                    mask_image=pictures["mask"], strength=0.9, width=64, height=64, num_inference_steps=3,
                    guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert not np.array_equal(got, plain)
    np.testing.assert_array_equal(image_of(server.predict(inpaint)), plain)  # everything came off again


def test_a_lora_with_a_controlnet_equals_diffusers(server, files, reference, tiny_weights_dir, tmp_path):
    """`loras` and a ControlNet in one request: diffusers' SDXL ControlNet pipeline after load_lora_weights, the same
    map; the LoRA reaches the UNet the ControlNet steers."""
    state = lora_state(reference.unet, seed=12)
    path = write_lora(tmp_path, state)
    url = files.serve("/control/style.safetensors", path.read_bytes())
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (0, 0, 32, 64))
    control = {"controlnet": "canny", "control_image": png_data_uri(edges), "control_preprocess": False}
    got = image_of(server.predict({**BASE, **control, "loras": f'[{{"url": "{url}", "scale": 0.7}}]'}))
    controlnet = ControlNetModel.from_pretrained(tiny_weights_dir / weights.CONTROLNET_CANNY.folder)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=reference.vae, controlnet=controlnet, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    expected = pipe(prompt=BASE["prompt"], negative_prompt="", image=edges, controlnet_conditioning_scale=0.5,
                    width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected))
    assert not np.array_equal(got, image_of(server.predict({**BASE, **control})))


def _tar_with(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if kind == tarfile.REGTYPE:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
        else:
            tar.addfile(info)
    return buffer.getvalue()


def _wrong_shapes(reference) -> bytes:
    state = lora_state(reference.unet, seed=1)
    bad = {key: torch.zeros(value.shape[0] + 1, *value.shape[1:]) for key, value in state.items()}
    return tar_bytes({"lora.safetensors": save(bad)})


BAD_URLS = [
    ("file:///etc/passwd", "scheme file: is not allowed"),
    ("ftp://127.0.0.1/trained_model.tar", "scheme ftp: is not allowed"),
    ("data:application/x-tar;base64,AAAA", "scheme data: is not allowed"),
    ("https://10.1.2.3/trained_model.tar", "refused: 10.1.2.3"),
    ("https://169.254.169.254/latest/meta-data", "refused: 169.254.169.254"),
    ("https://[fd00::1]/trained_model.tar", "refused: fd00::1"),
]


@pytest.mark.parametrize(
    "url, words", BAD_URLS, ids=[url.split(":")[0] + str(i) for i, (url, _) in enumerate(BAD_URLS)]
)
def test_refused_urls(server, url, words):
    """Each is refused by the address/scheme check before any connection is made."""
    assert_fails(server, {"replicate_weights": url}, f"replicate_weights: .*{words}")


def test_hostile_downloads_and_archives(server, files, reference, cache_dir):
    cases = {
        "/missing.tar": (None, "HTTP 404"),
        "/too-big.tar": (b"x" * (MAX_TRAINED_BYTES + 1), "larger than"),
        "/not-a-tar.tar": (b"this is not a tar archive" * 100, "not a tar"),
        "/escape.tar": (_tar_with("../evil.safetensors"), "\\.\\."),
        "/absolute.tar": (_tar_with("/etc/lora.safetensors"), "absolute"),
        "/link.tar": (_tar_with("lora.safetensors", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        "/no-files.tar": (tar_bytes({"training_params.json": b"{}"}), "lora.safetensors"),
        "/wrong-shapes.tar": (_wrong_shapes(reference), "shape"),
    }
    for path, (body, _) in cases.items():
        if body is not None:
            files.serve(path, body)
    files.redirects["/redirect.tar"] = "https://10.9.8.7/trained_model.tar"
    cases["/redirect.tar"] = (None, "refused: 10.9.8.7")
    files.stalls.add("/stall.tar")
    cases["/stall.tar"] = (None, "timed out|took longer|failed")

    for path, (_, words) in cases.items():
        assert_fails(server, {"replicate_weights": files.url(path)}, f"replicate_weights: .*({words})")

    # Nothing half-fetched or half-extracted is left in the cache.
    leftovers = [p for p in cache_dir.rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []
    for path in cases:
        assert not (cache_dir / "trained" / url_key(files.url(path))).exists(), path


@pytest.mark.parametrize(
    "loras, words",
    [
        ("not json", "loras: "),
        ('[{"url": "ftp://127.0.0.1/a.safetensors", "scale": 1}]', "loras.*scheme ftp"),
        ('[{"url": "https://10.0.0.2/a.safetensors", "scale": 9}]', "loras.*scale"),
    ],
)
def test_bad_lora_lists(server, loras, words):
    assert_fails(server, {"loras": loras}, words)


def assert_fails(server, extra: dict, pattern: str) -> None:
    body = server.predict({**BASE, **extra}).json()
    assert body["status"] == "failed", body
    assert re.search(pattern, body["error"]), body["error"]
    assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"


def test_base_image_is_intact_after_the_failures(server, reference):
    np.testing.assert_array_equal(image_of(server.predict(BASE)), direct(reference, BASE["prompt"]))
