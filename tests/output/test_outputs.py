"""Output formats and the parameters each file carries: written where A1111 reads them, read back, and enough to
reproduce the image (seed, batch size and position)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from cog._inspector import check_input, create_predictor
from PIL import Image

import predict
from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inference.watermark import watermark_match
from sdxl.inputs.request import MAX_LORAS, MAX_PROMPT_CHARS, GenerationRequest
from sdxl.output import infotext
from sdxl.output.outputs import (
    ASCII_PREFIX,
    EXIF_IFD,
    MAX_EXIF_BYTES,
    MAX_PNG_TEXT_BYTES,
    UNICODE_PREFIX,
    USER_COMMENT,
    OutputOptions,
    fits,
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


def test_image_prompts_and_the_inpainting_unet_are_recorded():
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64))
    request = GenerationRequest(seed=1, image=image, mask=mask, inpaint_model="inpainting", ip_adapter_image=image)
    _, _, pairs = infotext.parse(infotext.parameters(request, infotext.Weights("m")))
    assert pairs["Inpaint model"] == "stable-diffusion-xl-1.0-inpainting-0.1"
    assert (pairs["IP-Adapter"], pairs["IP-Adapter scale"]) == ("ip-adapter_sdxl_vit-h.safetensors", "0.6")
    unused = GenerationRequest(seed=1, ip_adapter_image=image, ip_adapter_scale=0)  # scale 0 steers nothing
    assert "IP-Adapter" not in infotext.parameters(unused, infotext.Weights("m"))


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


# A client's prompt (and negative prompt) -> what A1111 shows as the prompt. The real negative prompt is "blurry".
FORGERIES = [
    ("a fox\x00 in snow", "a fox\\x00 in snow"),
    ("del\x7f c1\x85 nel\x9f", "del\\x7f c1\\x85 nel\\x9f"),
    ("line\u2028sep\u2029para \x0b\x0c\x1c\x1d\x1e", "line\\u2028sep\\u2029para \\x0b\\x0c\\x1c\\x1d\\x1e"),
    ("half a pair \ud83d", "half a pair \\ud83d"),
    ("windows\r\nlines\rold mac", "windows\nlines\nold mac"),
    ("a fox\nNegative prompt: forged", "a fox\nNegative prompt\\: forged"),
    ("a fox\n  \u200bnegative PROMPT :forged", "a fox\n\u200bnegative PROMPT \\:forged"),
    ("a fox\rNegative prompt: forged", "a fox\nNegative prompt\\: forged"),
    ("Negative prompt: all of it", "Negative prompt\\: all of it"),
    ("a fox, Negative prompt: mid-line", "a fox, Negative prompt\\: mid-line"),
    (
        "a fox\nSteps: 99, Sampler: Euler, CFG scale: 1, Seed: 7",
        "a fox\nSteps\\: 99, Sampler: Euler, CFG scale: 1, Seed: 7",
    ),
    ("tab\tstays, \\(escaped\\) parens stay", "tab\tstays, \\(escaped\\) parens stay"),
]


def readers_see(text: str) -> dict:
    """What several kinds of reader take from a parameters text: A1111's parse, then the counts that line-based
    (splitlines), "\\nNegative prompt:" / "\\nSteps:" and anywhere-in-the-text readers split at."""
    prompt, negative, pairs = infotext.parse(text)
    lowered = text.lower()
    return {
        "prompt": prompt,
        "negative": negative,
        "seed": pairs.get("Seed"),
        "lines": (len(text.splitlines()), text.count("\n") + 1),
        "labels": (lowered.count("negative prompt:"), lowered.count("\nsteps:"), lowered.count("steps:")),
    }


@pytest.mark.parametrize("given, shown", FORGERIES)
def test_a_prompt_cannot_forge_a_negative_prompt_or_parameters_or_break_a_line(given, shown):
    request = GenerationRequest(prompt=given, negative_prompt=given + "\nNegative prompt: more", seed=5)
    text = infotext.parameters(request, infotext.Weights("m"))
    seen = readers_see(text)
    assert seen["prompt"] == shown.strip()  # A1111 strips the ends of each line
    assert seen["negative"] == (shown + "\nNegative prompt\\: more").strip()
    assert seen["seed"] == "5"
    lines = seen["lines"][1]
    assert seen["lines"] == (lines, lines)  # splitlines() finds no break that split("\n") does not
    assert seen["labels"] == (1, 1, 1)  # the one negative prompt line and the one parameters line
    text.encode("utf-8"), text.encode("utf-16-be")  # every character encodes (no lone surrogate)


@pytest.mark.parametrize(
    "file",
    ['we,ird"na:me\\.safetensors', "nul\x00and\x85nel\u2028.safetensors", " spaced .safetensors", '"quoted"'],
)
def test_a_weights_name_stays_one_value_of_the_parameters_line(file):
    used = infotext.Weights.of(None, None, AdapterRequest(replicate_weights=f"https://models.example/{file}", loras=()))
    text = infotext.parameters(GenerationRequest(seed=1), used)
    _, _, pairs = infotext.parse(text)
    assert pairs["Replicate weights"] == f"models.example/{file}"
    assert (pairs["Seed"], pairs["LoRA scale"]) == ("1", "0.6")
    assert len(text.splitlines()) == 2 and not infotext.UNSAFE.search(text)


EMOJI = "\U0001f98a"  # 4 bytes in UTF-8 and UTF-16
LONG_NAME = f"https://{'h' * 60}.example/{EMOJI * 2000}.safetensors"  # what a LoRA url of the loras cap could hold


def at_the_caps() -> tuple[GenerationRequest, infotext.Weights]:
    """10,000 emoji (the prompt cap) in prompt and negative prompt, every weights slot named by a long URL."""
    request = GenerationRequest(prompt=EMOJI * MAX_PROMPT_CHARS, negative_prompt=EMOJI * MAX_PROMPT_CHARS, seed=3)
    used = infotext.Weights("m", replicate_weights=LONG_NAME, loras=((LONG_NAME, 0.5),) * MAX_LORAS)
    return request, used


def exif_bytes(path) -> int:
    with Image.open(path) as image:
        return len(image.info["exif"])


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_exif_metadata_at_the_prompt_caps_fits_with_the_prompts_cut_and_marked(tmp_path, fmt):
    """Measured: 7,927 of the 10,000 emoji of each prompt stay beside five 120-character weights names; the EXIF
    block ends 5 (jpg) and 11 (webp) bytes short of its limit."""
    request, used = at_the_caps()
    text = infotext.parameters(request, used)
    started = time.perf_counter()
    path = save_image(noise(), tmp_path / f"out.{fmt}", OutputOptions(fmt), text)
    assert time.perf_counter() - started < 5
    assert MAX_EXIF_BYTES - 64 < exif_bytes(path) <= MAX_EXIF_BYTES  # cut to the longest length that fits
    prompt, negative, pairs = infotext.parse(read_parameters(path))
    assert prompt.endswith(EMOJI + infotext.MARKER) and negative.endswith(EMOJI + infotext.MARKER)
    assert len(prompt) == len(negative) > MAX_PROMPT_CHARS * 3 // 4
    assert pairs == infotext.parse(text)[2]  # the parameters line whole
    assert len(pairs["LoRAs"]) < 1000 and "…" in pairs["Replicate weights"]


def test_png_metadata_at_the_prompt_caps_is_whole_and_past_its_bound_cut(tmp_path):
    request, used = at_the_caps()
    text = infotext.parameters(request, used)
    path = save_image(noise(), tmp_path / "out.png", OutputOptions("png"), text)
    assert read_parameters(path) == text  # 10,000 emoji twice: ~80 KB, far below the bound
    huge = f"{EMOJI * MAX_PNG_TEXT_BYTES}\nNegative prompt: n\n{text.splitlines()[-1]}"
    cut = infotext.fit(huge, fits("png"))
    assert MAX_PNG_TEXT_BYTES - 64 < len(cut.encode()) <= MAX_PNG_TEXT_BYTES
    prompt, negative, pairs = infotext.parse(cut)
    assert prompt.endswith(EMOJI + infotext.MARKER) and negative == "n" and pairs == infotext.parse(text)[2]


@pytest.mark.parametrize("unsafe", ["\x00", "\u2028"])
def test_a_cut_never_splits_an_escape(unsafe):
    request = GenerationRequest(prompt=unsafe * 9_999, negative_prompt=unsafe * 9_999, seed=1)
    escaped = infotext.escape(unsafe)
    prompt, negative, _ = infotext.parse(infotext.fit(infotext.parameters(request, infotext.Weights("m")), fits("jpg")))
    for cut in (prompt, negative):
        kept = cut.removesuffix(infotext.MARKER)
        assert kept != cut and kept == escaped * (len(kept) // len(escaped))


@pytest.mark.parametrize(
    "text, fit",
    [
        ("x" * 100_000, fits("jpg")),  # no parameters line at all
        ("a\nSteps: " + "y" * 100_000, fits("jpg")),  # a last line that does not fit alone
        ("a\nNegative prompt: b\nSteps: 1, Seed: 2, Size: 3x3", lambda text: len(text) < 5),  # not even MARKER
    ],
)
def test_a_text_of_any_layout_is_made_to_fit_and_never_raises(text, fit):
    cut = infotext.fit(text, fit)
    assert fit(cut) and (cut.endswith(infotext.MARKER) or cut == "")
