"""Each preprocessing step alone, on tiny seeded models and real photos."""

import numpy as np
import pytest
from PIL import Image

from sdxl.preprocess import crop, mask
from sdxl.preprocess.caption import Captioner, caption_images, with_prefix
from sdxl.preprocess.upscale import Upscaler, upscale_small
from tools.testing.archives import astronaut, cat, two_faces


@pytest.fixture(scope="module")
def upscaler(tiny_weights_dir):
    return Upscaler.load(tiny_weights_dir)


@pytest.fixture(scope="module")
def captioner(tiny_weights_dir):
    return Captioner.load(tiny_weights_dir)


@pytest.fixture(scope="module")
def segmenter(tiny_weights_dir):
    return mask.Segmenter.load(tiny_weights_dir)


def _covered(loss_mask: Image.Image, box: mask.Box) -> float:
    """The fraction of the box's pixels that the mask marks (>= 128)."""
    region = np.asarray(loss_mask)[box.top : box.top + box.height, box.left : box.left + box.width]
    return float((region >= 128).mean())


# --- upscale ----------------------------------------------------------------------------------------------------


def test_upscale_is_x4_whatever_the_window_padding(upscaler):
    image = astronaut().resize((21, 30))  # neither side a multiple of the window size (8)
    assert upscaler.upscale(image).size == (84, 120)


def test_only_small_images_are_upscaled_to_at_least_the_resolution(upscaler):
    big, small, tiny = astronaut().resize((80, 72)), astronaut().resize((40, 24)), astronaut().resize((10, 12))
    out = upscale_small([big, small, tiny], 64, upscaler)
    assert out[0] is big
    assert out[1].size == (160, 96)  # one Swin2SR pass is enough
    assert min(out[2].size) >= 64 and out[2].size == (64, 77)  # x4 is not: a resize finishes the job


def test_images_too_long_for_swin2sr_are_resized(upscaler, monkeypatch):
    from sdxl.preprocess import upscale

    monkeypatch.setattr(upscale, "MAX_OUTPUT_PIXELS", 100 * 100)
    monkeypatch.setattr(Upscaler, "upscale", lambda self, image: pytest.fail("Swin2SR ran on a too-long image"))
    assert upscale_small([astronaut().resize((90, 30))], 64, upscaler)[0].size == (192, 64)


# --- caption ----------------------------------------------------------------------------------------------------


def test_captions_are_deterministic_and_prefixed(captioner):
    image = astronaut().resize((64, 64))
    first = captioner.caption(image)
    assert first and first == captioner.caption(image)
    captions = caption_images([image, image], [None, "from csv"], "a photo of TOK,", lambda: captioner)
    assert captions == [f"a photo of TOK, {first}", "from csv"]


def test_captioner_is_not_loaded_when_caption_csv_covers_everything():
    def fail():
        raise AssertionError("BLIP loaded for nothing")

    assert caption_images([cat()], ["given"], "TOK", fail) == ["given"]


@pytest.mark.parametrize(
    "prefix, caption, expected",
    [("a photo of TOK, ", "a dog", "a photo of TOK, a dog"), ("TOK", "a dog", "TOK a dog"), ("TOK, ", "", "TOK,")],
)
def test_with_prefix(prefix, caption, expected):
    assert with_prefix(prefix, caption) == expected


# --- masks ------------------------------------------------------------------------------------------------------


def test_face_mask_covers_the_detected_face():
    image = astronaut()
    faces = mask.detect_faces(image)
    assert len(faces) == 1
    face = faces[0]
    assert 150 < face.center[0] < 300 and 50 < face.center[1] < 200  # the astronaut's face, upper middle
    loss_mask = mask.face_mask(image)
    assert loss_mask.mode == "L" and loss_mask.size == image.size
    assert _covered(loss_mask, face) == 1.0
    assert (np.asarray(loss_mask) >= 128).mean() < 0.2  # the face, not the whole picture


def test_two_faces_give_one_mask_and_later_masks_stay_aligned():
    images = [two_faces(), astronaut(), cat()]
    masks = mask.face_masks(images)
    assert len(masks) == len(images)
    assert [m.size for m in masks] == [i.size for i in images]
    faces = mask.detect_faces(images[0])
    assert len(faces) == 2
    assert all(_covered(masks[0], face) == 1.0 for face in faces)  # both faces in the one mask
    np.testing.assert_array_equal(np.asarray(masks[1]), np.asarray(mask.face_mask(images[1])))
    assert _covered(masks[1], mask.detect_faces(images[1])[0]) == 1.0
    assert np.asarray(masks[2]).min() == 255  # no face in the cat photo: a uniform mask


def test_clipseg_mask_has_the_image_size_and_temperature_softens_it(segmenter):
    image = astronaut().resize((96, 64))
    masks = [segmenter.mask(image, "a face", temperature) for temperature in (0.5, 1.0, 2.0)]
    assert all(m.mode == "L" and m.size == (96, 64) for m in masks)
    spreads = [np.asarray(m, dtype=float).std() for m in masks]
    assert spreads[0] > spreads[1] > spreads[2] > 0
    assert np.asarray(masks[1]).max() >= 250  # scaled so the most salient region counts fully
    again = segmenter.mask(image, "a face", 1.0)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(masks[1]))


# --- crop -------------------------------------------------------------------------------------------------------


def test_crop_follows_the_salient_region_and_crops_image_and_mask_alike():
    image = Image.new("RGB", (200, 100), "black")
    image.paste((255, 0, 0), (160, 40, 190, 70))  # a red square near the right edge
    salient = Image.new("L", (200, 100), 0)
    salient.paste(255, (160, 40, 190, 70))  # the mask marks the same square
    center = crop.center_of_mass(salient)
    assert center == pytest.approx((175, 55), abs=0.01)
    assert crop.square_box(image.size, center) == (100, 0, 200, 100)  # clamped to the right edge
    out_image, out_mask = crop.crop_square(image, salient, center, 64)
    assert out_image.size == out_mask.size == (64, 64)
    assert out_image.mode == "RGB" and out_mask.mode == "L"
    red = np.asarray(out_image)[..., 0] > 128
    white = np.asarray(out_mask) > 128
    assert (red == white).mean() > 0.98  # the square sits at the same place in both


def test_uniform_or_empty_mask_crops_the_center():
    image = Image.new("RGB", (120, 80))
    assert crop.square_box(image.size, crop.center_of_mass(mask.uniform_mask(image))) == (20, 0, 100, 80)
    assert crop.center_of_mass(Image.new("L", (120, 80), 0)) == (60, 40)


def test_crop_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="cropped together"):
        crop.crop_square(Image.new("RGB", (64, 64)), Image.new("L", (32, 32)), (32, 32), 64)
