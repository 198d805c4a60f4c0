"""The whole preprocessing: inputs validated first, the contract's files written, nothing left behind on failure."""

import csv
import tempfile

import numpy as np
import pytest
from PIL import Image

from sdxl.errors import InputError
from sdxl.preprocess import CAPTIONS_COLUMNS, PreprocessConfig, preprocess
from tools.testing.archives import astronaut, cat, encode, exif_rotated_jpeg, make_tar, make_zip, two_faces

RESOLUTION = 64


@pytest.fixture
def upload(tmp_path):
    """A realistic upload: nested folders, png/jpg/webp, a face photo, a small image, a caption.csv, a stray file."""
    return make_tar(
        tmp_path / "input_images",
        {
            "me/astronaut.png": encode(astronaut(), "PNG"),
            "me/more/two.jpg": encode(two_faces().resize((256, 128)), "JPEG"),
            "small.webp": encode(cat().resize((45, 30)), "WEBP"),
            "rotated.jpeg": exif_rotated_jpeg((96, 72)),
            "notes.txt": b"ignored",
            "caption.csv": b'image_file,caption\nsmall.webp,"a photo of TOK, my cat"\n',
        },
        mode="w:gz",
    )


def _read(out_dir):
    with open(out_dir / "captions.csv", newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        return next(reader), list(reader)


@pytest.mark.parametrize(
    "options",
    [
        dict(mask_target_prompts="a photo of a face", clipseg_temperature=0.7),
        dict(use_face_detection_instead=True),
        dict(crop_based_on_salience=False),
    ],
    ids=["clipseg", "faces", "face-crop"],
)
def test_preprocess_writes_the_contract_files(tiny_weights_dir, upload, tmp_path, options):
    out_dir = preprocess(upload, tmp_path / "out", resolution=RESOLUTION, models_dir=tiny_weights_dir, **options)
    header, rows = _read(out_dir)
    assert tuple(header) == CAPTIONS_COLUMNS == ("image_file", "mask_file", "caption")
    assert [row[:2] for row in rows] == [[f"{i:04d}.src.png", f"{i:04d}.mask.png"] for i in range(4)]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*(name for row in rows for name in row[:2]), "captions.csv", "provenance.json"]  # provenance: the report's
    )
    for image_file, mask_file, _ in rows:
        with Image.open(out_dir / image_file) as image, Image.open(out_dir / mask_file) as loss_mask:
            assert (image.mode, image.size) == ("RGB", (RESOLUTION, RESOLUTION))
            assert (loss_mask.mode, loss_mask.size) == ("L", (RESOLUTION, RESOLUTION))
    # Sorted archive order: me/astronaut.png, me/more/two.jpg, rotated.jpeg, small.webp (captioned by caption.csv).
    captions = [row[2] for row in rows]
    assert captions[3] == "a photo of TOK, my cat"
    assert all(
        caption.startswith("a photo of TOK, ") and len(caption) > len("a photo of TOK, ") for caption in captions
    )
    assert not list(tmp_path.glob(".out.partial-*"))


def test_face_masks_in_the_training_set_follow_their_images(tiny_weights_dir, upload, tmp_path):
    out_dir = preprocess(
        upload, tmp_path / "out", resolution=RESOLUTION, use_face_detection_instead=True, models_dir=tiny_weights_dir
    )
    masks = [np.asarray(Image.open(out_dir / f"{i:04d}.mask.png")) for i in range(4)]
    assert masks[0].min() < 128 < masks[0].max()  # astronaut: the face only
    assert masks[1].min() < 128 < masks[1].max()  # two faces: still one mask, still faces only
    assert masks[2].min() == masks[3].min() == 255  # no face: uniform


def test_same_inputs_same_training_set(tiny_weights_dir, upload, tmp_path):
    runs = [
        preprocess(
            upload, tmp_path / name, resolution=RESOLUTION, mask_target_prompts="a face", models_dir=tiny_weights_dir
        )
        for name in ("one", "two")
    ]
    assert {p.name: p.read_bytes() for p in runs[0].iterdir()} == {p.name: p.read_bytes() for p in runs[1].iterdir()}


@pytest.mark.parametrize(
    "options, field, message",
    [
        (dict(resolution=500), "resolution", "500 is not allowed; use a multiple of 8 from 64 to 2048"),
        (dict(resolution=4096), "resolution", "4096 is not allowed"),
        (dict(resolution=32), "resolution", "32 is not allowed"),
        (dict(caption_prefix="a photo of a dog, "), "caption_prefix", "does not contain token_string 'TOK'"),
        (dict(caption_prefix="a photo of TOKyo, "), "caption_prefix", "does not contain token_string 'TOK' as a word"),
        (dict(token_string="two words"), "token_string", "'two words' is not one word"),
        (dict(clipseg_temperature=0), "clipseg_temperature", "0 is out of range; allowed: above 0.0 up to 10.0"),
        (dict(clipseg_temperature=float("nan")), "clipseg_temperature", "nan is not a finite number"),
        (dict(filetype="rar"), "input_images_filetype", "'rar' is not one of infer, zip, tar"),
        (dict(caption_prefix=""), "caption_prefix", "'' does not contain token_string 'TOK' as a word"),
        (
            dict(use_face_detection_instead="yes"),
            "use_face_detection_instead",
            "'yes' is not true or false",
        ),
    ],
)
def test_bad_inputs_fail_before_anything_is_read(tmp_path, options, field, message):
    with pytest.raises(InputError, match=message) as error:
        preprocess(tmp_path / "does-not-exist.zip", tmp_path / "out", **{"resolution": RESOLUTION, **options})
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


def test_token_string_other_than_tok():
    config = PreprocessConfig(resolution=RESOLUTION, token_string="sks", caption_prefix="a photo of sks ")
    assert config.target_prompt is None
    with pytest.raises(InputError, match="token_string: '<sks>' is not one word"):  # <...> is for the new tokens
        PreprocessConfig(resolution=RESOLUTION, token_string="<sks>", caption_prefix="a photo of <sks> ")


@pytest.mark.parametrize(
    "files, message",
    [
        ({"notes.txt": b"no images here"}, "input_images: holds no usable image"),
        ({"../escape.png": encode(cat(), "PNG")}, "input_images: entry '../escape.png' escapes"),
    ],
)
def test_failed_preprocessing_leaves_nothing(tiny_weights_dir, tmp_path, monkeypatch, files, message):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the archive would be extracted
    path = make_zip(tmp_path / "upload.zip", files)
    with pytest.raises(InputError, match=message):
        preprocess(path, tmp_path / "out", resolution=RESOLUTION, models_dir=tiny_weights_dir)
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_too_few_images(tiny_weights_dir, tmp_path):
    from sdxl.preprocess.pipeline import run

    path = make_zip(tmp_path / "upload.zip", {"a.png": encode(cat(), "PNG")})
    config = PreprocessConfig(resolution=RESOLUTION, min_images=2)
    with pytest.raises(InputError, match="input_images: holds 1 usable images; at least 2 are needed"):
        run(config, path, tmp_path / "out", models_dir=tiny_weights_dir)


def test_refuses_to_write_into_a_folder_with_files(tiny_weights_dir, upload, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        preprocess(upload, tmp_path / "out", resolution=RESOLUTION, models_dir=tiny_weights_dir)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_missing_models_name_the_fix(upload, tmp_path):
    from sdxl.model.weights import WeightsMissingError

    with pytest.raises(WeightsMissingError, match="(?s)(swin2sr|blip)[^ ]* .* missing .*download_weights"):
        preprocess(upload, tmp_path / "out", resolution=RESOLUTION, models_dir=tmp_path / "no-weights")


@pytest.mark.parametrize("salience, expected_x", [(True, 512), (False, 735)])
def test_crop_centre_follows_the_mask_or_the_faces(salience, expected_x):
    from sdxl.preprocess import mask
    from sdxl.preprocess.pipeline import _crop_centers

    image = Image.new("RGB", (1024, 512))
    image.paste(astronaut(), (512, 0))  # the face sits right of centre, near x = 512 + 223
    config = PreprocessConfig(resolution=RESOLUTION, crop_based_on_salience=salience)
    (center,) = _crop_centers(config, [image], [mask.uniform_mask(image)])
    assert center[0] == pytest.approx(expected_x, abs=15)
