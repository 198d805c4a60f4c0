"""Bad input gets a clear error naming the field, the value and what is allowed; awkward images are handled."""

import io

import numpy as np
import pytest
from PIL import Image

from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inputs.images import MAX_SIDE, img2img_size, load_image, load_mask
from sdxl.inputs.request import GenerationRequest

RGB = Image.new("RGB", (64, 64), (10, 20, 30))


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        (dict(width=100), "width", "multiple of 8"),
        (dict(width=1000 + 4), "width", "64 to 2048"),
        (dict(height=4096), "height", "64 to 2048"),
        (dict(height=32), "height", "64 to 2048"),
        (dict(width="512"), "width", "not an integer"),
        (dict(num_outputs=0), "num_outputs", "1 to 4"),
        (dict(num_outputs=5), "num_outputs", "1 to 4"),
        (dict(num_inference_steps=0), "num_inference_steps", "1 to 500"),
        (dict(num_inference_steps=501), "num_inference_steps", "1 to 500"),
        (dict(guidance_scale=0.5), "guidance_scale", "1 to 50"),
        (dict(guidance_scale=float("nan")), "guidance_scale", "nan is not a finite number"),
        (dict(prompt_strength=1.5), "prompt_strength", "0 to 1"),
        (dict(high_noise_frac=-0.1), "high_noise_frac", "0 to 1"),
        (dict(seed=-1), "seed", "0 to 4294967295"),
        (dict(seed=2**40), "seed", "0 to 4294967295"),
        (dict(refine_steps=0), "refine_steps", "1 to 500"),
        (dict(scheduler="euler"), "scheduler", "K_EULER"),
        (dict(refine="both"), "refine", "expert_ensemble_refiner"),
        (dict(prompt=None), "prompt", "not a string"),
        (dict(mask=Image.new("L", (64, 64))), "mask", "needs an image"),
        (dict(image=RGB, mask=Image.new("L", (64, 32))), "mask", "64x32 differs from the image's 64x64"),
        (dict(image=RGB, prompt_strength=0.01, num_inference_steps=10), "prompt_strength", "no denoising step"),
        (dict(refine="base_image_refiner", refine_steps=3), "refine_steps", "at least 4"),
    ],
)
def test_bad_request_names_the_field(kwargs, field, words):
    with pytest.raises(InputError) as error:
        GenerationRequest(**kwargs)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")
    assert words in str(error.value)


def test_defaults_match_the_contract():
    request = GenerationRequest()
    assert (request.prompt, request.negative_prompt) == ("An astronaut riding a rainbow unicorn", "")
    assert (request.width, request.height, request.num_outputs) == (1024, 1024, 1)
    assert (request.scheduler, request.num_inference_steps, request.guidance_scale) == ("K_EULER", 50, 7.5)
    assert (request.prompt_strength, request.refine, request.high_noise_frac) == (0.8, "no_refiner", 0.8)
    assert request.apply_watermark is True and request.disable_safety_checker is False


def save(image, tmp_path, name, **params):
    path = tmp_path / name
    image.save(path, **params)
    return path


def test_not_an_image_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(InputError, match="image: could not be read as an image"):
        load_image(path, "image")


def test_truncated_image_is_refused(tmp_path):
    data = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(data, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(InputError, match="mask: .*corrupt or truncated"):
        load_mask(path, "mask")


def test_alpha_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    image = load_image(save(rgba, tmp_path, "a.png"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_palette_images_become_rgb(tmp_path):
    palette = Image.new("RGB", (64, 64), (0, 128, 255)).convert("P")
    image = load_image(save(palette, tmp_path, "p.png"))
    assert image.mode == "RGB" and image.size == (64, 64)


def test_exif_rotation_is_applied(tmp_path):
    wide = Image.new("RGB", (96, 64), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 8, 8))  # a white corner to follow
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = load_image(save(wide, tmp_path, "r.jpg", exif=exif, quality=95))
    assert image.size == (64, 96)
    assert image.getpixel((60, 2))[0] > 200  # the top-left corner went to the top-right


def test_masks_are_greyscale_and_keep_size(tmp_path):
    mask = load_mask(save(Image.new("RGB", (80, 48), (255, 255, 255)), tmp_path, "m.png"))
    assert mask.mode == "L" and mask.size == (80, 48) and mask.getpixel((0, 0)) == 255


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr("sdxl.inputs.images.MAX_INPUT_PIXELS", 100 * 100)
    path = save(Image.new("RGB", (200, 200)), tmp_path, "big.png")
    with pytest.raises(InputError, match="image: 200x200 is too large"):
        load_image(path)


def test_img2img_size_rounds_down_and_fits(tmp_path):
    assert img2img_size(Image.new("RGB", (100, 77))) == (96, 72)
    assert img2img_size(Image.new("RGB", (4032, 3024))) == (MAX_SIDE, 1536)
    with pytest.raises(InputError, match="image: 40x400 is too small"):
        img2img_size(Image.new("RGB", (40, 400)))


def test_img2img_with_an_odd_sized_image_runs(pipes):
    odd = Image.fromarray(np.random.RandomState(1).randint(0, 255, (70, 101, 3), dtype=np.uint8))
    result = generate(pipes, GenerationRequest(image=odd, num_inference_steps=4, seed=1, apply_watermark=False))
    assert result.images[0].size == (96, 64)
