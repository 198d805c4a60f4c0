"""Output formats and the parameters each file carries: written where A1111 reads them, read back, and enough to
reproduce the image (seed, batch size and position)."""

from __future__ import annotations

import numpy as np
import pytest
from cog._inspector import check_input, create_predictor
from PIL import Image

import predict
from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inference.watermark import watermark_match
from sdxl.inputs.request import GenerationRequest
from sdxl.output import infotext
from sdxl.output.outputs import (
    ASCII_PREFIX,
    EXIF_IFD,
    UNICODE_PREFIX,
    USER_COMMENT,
    OutputOptions,
    read_parameters,
    save_image,
)
from sdxl.trained.request import AdapterRequest, LoraInput
from sdxl.trained.trained_weights import TrainedWeights

TINY = {"width": 64, "height": 64, "num_inference_steps": 2}
FORMAT_NAMES = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
TEXTS = ["a fox\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 1", "un renard — 狐, «neige»\nSteps: 2, Seed: 1"]


@pytest.fixture
def runner(pipes):
    runner = predict.Runner()
    runner.pipes, runner._outputs, runner.trained_weights = pipes, [], TrainedWeights(pipes)
    return runner


def run(runner, **inputs):
    """As the Cog server calls run(): inputs checked and completed with their defaults first."""
    return runner.run(**check_input(create_predictor("predict", "Runner").inputs, inputs))


def noise(size=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "unicode"])
@pytest.mark.parametrize("fmt", list(FORMAT_NAMES))
def test_each_format_carries_the_parameters_where_a1111_reads_them(tmp_path, fmt, text):
    path = save_image(noise(), tmp_path / f"out.{fmt}", OutputOptions(fmt), text)
    with Image.open(path) as image:
        assert image.format == FORMAT_NAMES[fmt]
        if fmt == "png":  # A1111: image.info["parameters"] (tEXt, or iTXt for text beyond Latin-1)
            assert image.info["parameters"] == text
        else:  # A1111: piexif.load(info["exif"]) -> Exif IFD UserComment -> piexif.helper.UserComment.load
            raw = image.info["exif"]
            assert raw[raw.index(b"MM") :][:4] == b"MM\x00\x2a"  # big-endian, as piexif writes it
            comment = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
            if text.isascii():
                assert comment == ASCII_PREFIX + text.encode("ascii")
            else:
                assert comment == UNICODE_PREFIX + text.encode("utf-16-be")  # piexif's "unicode": UTF-16BE
    assert read_parameters(path) == text


def test_png_pixels_are_the_images_and_quality_sets_the_lossy_size(tmp_path):
    image = noise()
    png = save_image(image, tmp_path / "a.png", OutputOptions(), "x")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(image))
    for fmt in ("webp", "jpg"):
        small = save_image(image, tmp_path / f"low.{fmt}", OutputOptions(fmt, 5), "x").stat().st_size
        large = save_image(image, tmp_path / f"high.{fmt}", OutputOptions(fmt, 100), "x").stat().st_size
        assert small < large / 2


@pytest.mark.parametrize(
    "kwargs, field",
    [({"format": "gif"}, "output_format"), ({"quality": 0}, "output_quality"), ({"quality": 101}, "output_quality")],
)
def test_bad_output_options_name_the_field(kwargs, field):
    with pytest.raises(InputError) as error:
        OutputOptions(**kwargs)
    assert error.value.field == field


def test_the_watermark_survives_png_only(pipes, tmp_path):
    """SDXL's DWT-DCT watermark (48 bits) read back with imwatermark's decoder from each format at the default
    quality, 256 px. Measured (tiny model, seed 5): png 1.00, webp q80 0.29, jpg q80 0.46 of the bits (chance is
    about 0.5); on photos (skimage's astronaut and cat, 256-1024 px) q80 read 0.44-0.65: JPEG and WebP lose it."""
    image = generate(pipes, GenerationRequest(**{**TINY, "width": 256, "height": 256}, seed=5)).images[0]
    matches = {}
    for fmt in FORMAT_NAMES:
        with Image.open(save_image(image, tmp_path / f"w.{fmt}", OutputOptions(fmt), "x")) as saved:
            matches[fmt] = watermark_match(saved)
    assert matches["png"] == 1.0
    assert matches["webp"] < 0.8 and matches["jpg"] < 0.8, matches


def test_parameters_text_layout_and_a1111_parse():
    request = GenerationRequest(
        prompt="a fox, in snow",
        negative_prompt="blurry",
        scheduler="KarrasDPM",
        num_inference_steps=30,
        guidance_scale=6.0,
        seed=42,
        width=768,
        height=512,
        num_outputs=3,
        refine="expert_ensemble_refiner",
        high_noise_frac=0.75,
        prompt_weighting=True,
    )
    text = infotext.parameters(request, infotext.Weights("stable-diffusion-xl-base-1.0"), position=2)
    lines = text.split("\n")
    assert lines[:2] == ["a fox, in snow", "Negative prompt: blurry"]
    assert lines[2].startswith("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 42, Size: 768x512, ")
    prompt, negative, pairs = infotext.parse(text)
    assert (prompt, negative) == ("a fox, in snow", "blurry")
    assert pairs["Model"] == "stable-diffusion-xl-base-1.0"
    assert (pairs["Batch size"], pairs["Batch pos"]) == ("3", "2")
    assert (pairs["Refine"], pairs["Refiner switch at"], pairs["Prompt weighting"]) == (
        "expert_ensemble_refiner",
        "0.75",
        "compel",
    )
    single = infotext.parameters(GenerationRequest(seed=1), infotext.Weights("m"))
    assert "Negative prompt" not in single and "Batch" not in single


def test_weights_appear_as_host_and_file_name_only():
    secret = "X-Amz-Signature=s3cr3t"
    used = infotext.Weights.of(
        None,
        None,
        AdapterRequest(
            replicate_weights=f"https://user:hunter2@models.example/u/1/trained_model.tar?{secret}",
            lora_scale=0.5,
            loras=(LoraInput(f"https://cdn.example:8443/a/b/style.safetensors?{secret}#frag", -0.8),),
        ),
    )
    text = infotext.parameters(GenerationRequest(seed=1, image=noise(), prompt_strength=0.6), used)
    _, _, pairs = infotext.parse(text)
    assert pairs["Replicate weights"] == "models.example/trained_model.tar" and pairs["LoRA scale"] == "0.5"
    assert pairs["LoRAs"] == "cdn.example/style.safetensors: -0.8"
    assert (pairs["Mode"], pairs["Denoising strength"]) == ("img2img", "0.6")
    for leak in ("s3cr3t", "hunter2", "user", "Amz", "frag", "?"):
        assert leak not in text


def test_outputs_dropped_by_the_safety_checker_keep_their_positions():
    request = GenerationRequest(seed=9, num_outputs=3)
    texts = infotext.for_outputs(request, infotext.Weights("m"), [False, True, False])
    assert [infotext.parse(t)[2]["Batch pos"] for t in texts] == ["0", "2"]


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_a_random_seed_is_in_each_file_and_reproduces_each_image(runner, fmt):
    """No seed given: each file's parameters hold the drawn seed and its place in the batch; the same inputs with
    that seed make the same images (PNG bit for bit; JPEG compared as decoded by the same encoder settings)."""
    first = run(runner, **TINY, num_outputs=2, output_format=fmt, prompt="a red fox")
    params = [infotext.parse(read_parameters(path))[2] for path in first]
    first_pixels = [np.asarray(Image.open(path)) for path in first]
    seeds = {int(p["Seed"]) for p in params}
    assert len(seeds) == 1 and [p["Batch pos"] for p in params] == ["0", "1"]
    assert all(p["Batch size"] == "2" and p["Size"] == "64x64" and p["Steps"] == "2" for p in params)
    again = run(runner, **TINY, num_outputs=int(params[0]["Batch size"]), output_format=fmt, prompt="a red fox",
                seed=seeds.pop())  # fmt: skip
    for pixels, path in zip(first_pixels, again):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels)
    assert [path.suffix for path in again] == [f".{fmt}", f".{fmt}"]
