"""Face detection for face masks and face crops, on real photographs: frontal faces, profiles facing either way and
heads tilted by about 15 degrees.

Two detectors, the learned one preferred:
- YuNet (OpenCV's face detector network, cv2.FaceDetectorYN), from the weight folder (sdxl/model/weights.py: FACE_DETECTOR,
  fetched with the preprocessing models by scripts/download_weights.py --training);
- OpenCV's Haar cascades, which ship inside opencv-python: the offline fallback when YuNet's file is absent or does
  not load. Two frontal cascades, then the profile cascade on the image and on its mirror (it only knows faces turned
  one way); when nothing is found upright, copies rotated by +-15 degrees, where both frontal cascades must agree.

Detections of the same face by several passes are merged, implausible ones dropped, and the largest face kept together
with any face at least FACE_KEEP_FRACTION its size (a group photo keeps everyone; a stray small detection goes).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl.model import weights

log = logging.getLogger(__name__)

DETECTION_SIDE = 1024  # faces are found on a copy at most this large: fast and scale-stable
MIN_FRACTION = 0.04  # smallest face looked for, as a fraction of the short side
FRONTAL_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
PROFILE_CASCADE = "haarcascade_profileface.xml"  # faces turned to one side only: run it on the mirror as well
TILTS = (15.0, -15.0)  # degrees; tried only when nothing is found upright
FACE_KEEP_FRACTION = 0.6  # other faces are kept when their side is at least this share of the largest one's
SAME_FACE_OVERLAP = 0.3  # intersection over union above which two boxes are the same face
YUNET_SCORE = 0.7
# Neighbours a cascade detection needs: OpenCV's usual 5 for the frontal cascades upright (small faces in group photos
# stay found); 8 for the profile cascade and, with both frontal cascades agreeing, on the tilted copies, which at 5
# find faces in cats, coffee cups and shoulders (scikit-image's photos: 4 false faces in 3 face-free photos at 5).
MIN_NEIGHBORS = 5
STRICT_NEIGHBORS = 8


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int

    @property
    def center(self) -> tuple[float, float]:
        return self.left + self.width / 2, self.top + self.height / 2

    @property
    def area(self) -> int:
        return self.width * self.height

    def overlap(self, other: Box) -> float:
        """Intersection over union."""
        w = min(self.left + self.width, other.left + other.width) - max(self.left, other.left)
        h = min(self.top + self.height, other.top + other.height) - max(self.top, other.top)
        inter = max(0, w) * max(0, h)
        return inter / max(1, self.area + other.area - inter)


# --- the detectors ----------------------------------------------------------------------------------------------


@functools.cache
def _cascade(name: str):
    import cv2

    path = Path(cv2.data.haarcascades) / name
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load its face cascade {path}; install opencv-python (not 5.x)")
    return cascade


def _detect(name: str, gray: np.ndarray, min_side: int, neighbors: int) -> list[Box]:
    options = dict(scaleFactor=1.1, minNeighbors=neighbors, minSize=(min_side, min_side))
    return [Box(*map(int, b)) for b in _cascade(name).detectMultiScale(gray, **options)]


def _agreed_frontal(gray: np.ndarray, min_side: int, neighbors: int) -> list[Box]:
    """Faces both frontal cascades find."""
    first, second = (_detect(name, gray, min_side, neighbors) for name in FRONTAL_CASCADES)
    return [box for box in first if any(box.overlap(other) >= SAME_FACE_OVERLAP for other in second)]


def _without_enclosing(boxes: list[Box]) -> list[Box]:
    """Drop boxes that enclose the centre of a much smaller detection: a face does not hold a face, so such a box is a
    false detection around a real one."""

    def encloses(big: Box, small: Box) -> bool:
        x, y = small.center
        inside = big.left <= x <= big.left + big.width and big.top <= y <= big.top + big.height
        return inside and small.width < 0.5 * big.width

    return [box for box in boxes if not any(encloses(box, other) for other in boxes)]


def _cascade_boxes(gray: np.ndarray, min_side: int) -> list[Box]:
    """The upright passes in order of trust; the first that finds a face decides (the later, less specific passes add
    false faces, not missed ones): each frontal cascade, then the profile cascade on the image and on its mirror."""
    found: list[Box] = []
    for name in FRONTAL_CASCADES:
        found = found or _without_enclosing(_detect(name, gray, min_side, MIN_NEIGHBORS))
    found = found or _detect(PROFILE_CASCADE, gray, min_side, STRICT_NEIGHBORS)
    if found:
        return found
    width = gray.shape[1]
    mirrored = np.ascontiguousarray(gray[:, ::-1])
    mirrored_boxes = _detect(PROFILE_CASCADE, mirrored, min_side, STRICT_NEIGHBORS)
    return [Box(width - b.left - b.width, b.top, b.width, b.height) for b in mirrored_boxes]


def _rotated(gray: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The image rotated about its centre on a canvas that holds all of it, and the affine map back."""
    import cv2

    height, width = gray.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    new_w, new_h = int(height * sin + width * cos), int(height * cos + width * sin)
    matrix[0, 2] += new_w / 2 - width / 2
    matrix[1, 2] += new_h / 2 - height / 2
    return cv2.warpAffine(gray, matrix, (new_w, new_h), borderMode=cv2.BORDER_REPLICATE), cv2.invertAffineTransform(
        matrix
    )


class CascadeDetector:
    name = "OpenCV Haar cascades (frontal, profile both ways, +-15 degree tilts)"

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        min_side = max(20, round(MIN_FRACTION * min(gray.shape)))
        found = _cascade_boxes(gray, min_side)
        for degrees in TILTS:
            if found:
                break
            rotated, back = _rotated(gray, degrees)
            for box in _agreed_frontal(rotated, min_side, STRICT_NEIGHBORS):
                cx, cy = back @ np.array([*box.center, 1.0])
                found.append(Box(round(cx - box.width / 2), round(cy - box.height / 2), box.width, box.height))
        return found


class YuNetDetector:
    name = "YuNet (cv2.FaceDetectorYN)"

    def __init__(self, model_path: Path):
        import cv2

        self.model = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320), YUNET_SCORE)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        import cv2

        height, width = rgb.shape[:2]
        self.model.setInputSize((width, height))
        _, faces = self.model.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return [] if faces is None else [Box(*(round(float(v)) for v in face[:4])) for face in faces]


def load_detector(models_dir: Path | None = None):
    """YuNet from the weight folder when it is there and loads; otherwise the cascades (said in the log)."""
    root = Path(models_dir or weights.weights_dir())
    model_path = root / weights.FACE_DETECTOR.folder / weights.FACE_DETECTOR.required_files[0]
    if not model_path.is_file():
        log.info("faces: %s not found; using %s", model_path, CascadeDetector.name)
        return CascadeDetector()
    try:
        detector = YuNetDetector(model_path)
    except Exception as error:  # cv2.error for a file that is not a loadable network
        log.warning("faces: %s did not load (%s); using %s", model_path, str(error)[:200], CascadeDetector.name)
        return CascadeDetector()
    log.info("faces: using %s from %s", YuNetDetector.name, model_path)
    return detector


# --- choosing the faces ---------------------------------------------------------------------------------------


def plausible_faces(boxes: list[Box], min_side: int) -> list[Box]:
    """Merge boxes of the same face (keep the larger), drop too-small ones, keep the largest face and those near its
    size, largest first."""
    kept: list[Box] = []
    for box in sorted((b for b in boxes if min(b.width, b.height) >= min_side), key=lambda b: -b.area):
        if all(box.overlap(other) < SAME_FACE_OVERLAP for other in kept):
            kept.append(box)
    if not kept:
        return []
    largest = max(kept[0].width, kept[0].height)
    return [b for b in kept if max(b.width, b.height) >= FACE_KEEP_FRACTION * largest]


def find_faces(image: Image.Image, detector) -> list[Box]:
    """Face boxes in the image's pixel coordinates, largest first (empty if none)."""
    scale = min(1.0, DETECTION_SIDE / max(image.size))
    small = image.convert("RGB")
    if scale < 1.0:
        small = small.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    rgb = np.asarray(small)
    boxes = plausible_faces(detector.detect(rgb), max(20, round(MIN_FRACTION * min(rgb.shape[:2]))))
    return [Box(*(round(v / scale) for v in (b.left, b.top, b.width, b.height))) for b in boxes]
