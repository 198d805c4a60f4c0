"""Faces in real photographs: frontal, in profile facing either way, heads tilted by 15 degrees; no faces in
face-free photos; the log says how many images had none; YuNet when its file is there, the cascades otherwise.

The photos ship offline: scikit-image's astronaut (Eileen Collins, frontal) and cameraman (a real profile, facing
right), matplotlib's Grace Hopper (frontal); no real left-facing profile or tilted portrait ships, so those are the
cameraman mirrored and Grace Hopper rotated by +-15 degrees (real photos, transformed). Face-free: scikit-image's cat,
coffee cup and rocket.
"""

import logging
import math
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
from PIL import Image
from skimage import data

from sdxl.model import weights
from sdxl.preprocess import faces, mask

# Where the face is in the upright photos (measured once with the frontal cascade / mirrored profile cascade).
UPRIGHT = {"astronaut": (223.5, 113.5), "hopper": (264.5, 215.5), "camera": (226.0, 152.0)}


def _photo(name: str) -> Image.Image:
    if name == "hopper":
        return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _rotated_point(point, size, degrees):
    """Where PIL's rotate(degrees, expand=True) moves a point (counter-clockwise about the centre)."""
    w, h = size
    a = math.radians(degrees)
    new_w = abs(w * math.cos(a)) + abs(h * math.sin(a))
    new_h = abs(w * math.sin(a)) + abs(h * math.cos(a))
    x, y = point[0] - w / 2, point[1] - h / 2
    return x * math.cos(a) + y * math.sin(a) + new_w / 2, -x * math.sin(a) + y * math.cos(a) + new_h / 2


def _portrait(kind: str):
    """(image, where its face is) for each view of the portrait set."""
    if kind in ("astronaut", "hopper", "camera"):
        return _photo(kind), UPRIGHT[kind]
    if kind == "camera mirrored":
        photo = _photo("camera")
        return photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (
            photo.width - UPRIGHT["camera"][0],
            UPRIGHT["camera"][1],
        )
    degrees = 15 if kind == "hopper +15" else -15
    photo = _photo("hopper")
    rotated = photo.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    return rotated, _rotated_point(UPRIGHT["hopper"], photo.size, degrees)


PORTRAITS = ["astronaut", "hopper", "hopper +15", "hopper -15", "camera", "camera mirrored"]


def _old_detector_finds(image: Image.Image) -> bool:
    """What face masks used before: the one frontal cascade, minNeighbors 5."""
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))
    gray = cv2.equalizeHist(np.asarray(image.convert("L")))
    return len(cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20))) > 0


@pytest.mark.heavy
def test_a_face_is_found_in_every_portrait_where_it_is():
    detector = faces.CascadeDetector()
    old_found = 0
    for kind in PORTRAITS:
        image, (x, y) = _portrait(kind)
        found = faces.find_faces(image, detector)
        assert len(found) == 1, kind  # the largest plausible face, one person
        cx, cy = found[0].center
        assert math.hypot(cx - x, cy - y) < 0.25 * found[0].width, (kind, found[0], (x, y))
        old_found += _old_detector_finds(image)
    assert old_found == 3  # the single frontal cascade: astronaut, hopper, hopper -15 only


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket"])
@pytest.mark.heavy
def test_no_face_in_face_free_photos(name):
    assert faces.find_faces(_photo(name), faces.CascadeDetector()) == []


def test_log_says_how_many_images_had_no_face(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdxl.preprocess")
    images = [_portrait("camera")[0], _photo("chelsea"), _portrait("hopper +15")[0]]
    masks = mask.face_masks(images, models_dir=tmp_path)  # no YuNet file there: the cascades
    assert [np.asarray(m).min() for m in masks] == [0, 255, 0]  # faces masked; the cat's mask uniform
    text = caplog.text
    assert f"{tmp_path / weights.FACE_DETECTOR.folder / 'face_detection_yunet_2023mar.onnx'} not found" in text
    assert "no face found in 1 of 3 images (image 1)" in text


def test_group_photos_keep_every_face_and_stray_small_boxes_go():
    big, twin, small, same = (
        faces.Box(0, 0, 100, 100),
        faces.Box(300, 0, 90, 90),
        faces.Box(500, 0, 30, 30),
        faces.Box(5, 5, 95, 95),
    )
    assert faces.plausible_faces([small, same, twin, big], min_side=20) == [big, twin]


def test_a_broken_yunet_file_falls_back_to_the_cascades(tmp_path, caplog):
    folder = tmp_path / weights.FACE_DETECTOR.folder
    folder.mkdir()
    (folder / weights.FACE_DETECTOR.required_files[0]).write_bytes(b"not an onnx network")
    detector = faces.load_detector(tmp_path)
    assert isinstance(detector, faces.CascadeDetector)
    assert "did not load" in caplog.text
    assert len(faces.find_faces(_photo("astronaut"), detector)) == 1


def test_yunet_is_fetched_with_the_training_models_but_not_required():
    assert weights.FACE_DETECTOR in weights.ALL_WEIGHTS
    assert weights.FACE_DETECTOR not in weights.TRAINING_WEIGHTS  # absent: the cascades run, nothing fails
    assert hasattr(cv2, "FaceDetectorYN")  # the pinned OpenCV runs YuNet
