"""The one registry of production weights, and the check that a weight folder is complete.

Each entry says where the weights come from (repo, pinned revision, the files to fetch) and which folder under the
weights directory holds them. Setup reads from that folder only; nothing is downloaded at request time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR_ENV = "SDXL_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DOWNLOAD_COMMAND = "python scripts/download_weights.py"
RANDOM_MARKER = "RANDOM_WEIGHTS.json"  # written by the random-weight writers, never by a download


@dataclass(frozen=True)
class WeightSpec:
    """One model in the weight folder: where it comes from and which files prove it is there."""

    name: str
    folder: str
    repo_id: str
    revision: str | None  # a pinned commit; None only where no commit could be pinned (the download logs a warning)
    allow_patterns: tuple[str, ...]
    required_files: tuple[str, ...]  # relative to `folder`; a weight file may be any of the alternatives in a tuple
    purpose: str


REFINER_SHARED_COMPONENTS = ("vae", "text_encoder_2")

BASE = WeightSpec(
    name="base",
    folder="sdxl-base-1.0",
    repo_id="stabilityai/stable-diffusion-xl-base-1.0",
    revision="462165984030d82259a11f4367a4eed129e94a7b",
    allow_patterns=(
        "model_index.json",
        "scheduler/*",
        "tokenizer/*",
        "tokenizer_2/*",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ),
    required_files=(
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/vocab.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model*.safetensors",
        "text_encoder/model*.safetensors",
        "text_encoder_2/model*.safetensors",
    ),
    purpose="SDXL 1.0 base (UNet, both text encoders, tokenizers, scheduler)",
)

VAE = WeightSpec(
    name="vae",
    folder="sdxl-vae-fp16-fix",
    repo_id="madebyollin/sdxl-vae-fp16-fix",
    revision="207b116dae70ace3637169f1ddd2434b91b3a8cd",
    allow_patterns=("config.json", "diffusion_pytorch_model.safetensors"),
    required_files=("config.json", "diffusion_pytorch_model*.safetensors"),
    purpose="SDXL VAE that decodes in fp16 without NaNs (shared by base and refiner)",
)

REFINER = WeightSpec(
    name="refiner",
    folder="sdxl-refiner-1.0",
    repo_id="stabilityai/stable-diffusion-xl-refiner-1.0",
    revision="5d4cfe854c9a9a87939ff3653551c2b3c99a4356",
    allow_patterns=(
        "model_index.json",
        "scheduler/*",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ),
    required_files=(
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model*.safetensors",
    ),
    purpose="SDXL 1.0 refiner UNet (shares the base's VAE and second text encoder)",
)

SAFETY_CHECKER = WeightSpec(
    name="safety_checker",
    folder="safety-checker",
    repo_id="CompVis/stable-diffusion-safety-checker",
    revision="cb41f3a270d63d454d385fc2e4f571c487c253c5",
    # This revision ships only pytorch_model.bin: the download converts it once to model.safetensors (loaded with
    # weights_only), so setup never unpickles.
    allow_patterns=("config.json", "preprocessor_config.json", "pytorch_model.bin"),
    required_files=("config.json", "preprocessor_config.json", "model.safetensors"),
    purpose="NSFW safety checker",
)

UPSCALER = WeightSpec(
    name="swin2sr",
    folder="swin2sr-x4",
    repo_id="caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr",
    revision=None,
    allow_patterns=("config.json", "preprocessor_config.json", "*.safetensors", "pytorch_model.bin"),
    # As for the safety checker: where only pytorch_model.bin exists, the download converts it to model.safetensors.
    required_files=("config.json", "preprocessor_config.json", "model.safetensors"),
    purpose="training preprocessing: x4 upscaling of small images",
)

CAPTIONER = WeightSpec(
    name="blip",
    folder="blip-captioning-large",
    repo_id="Salesforce/blip-image-captioning-large",
    revision="353689b859fcf0523410b1806dace5fb46ecdf41",
    allow_patterns=("*.json", "*.txt", "model.safetensors"),
    required_files=(
        "config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "model.safetensors",
    ),
    purpose="training preprocessing: image captions",
)

SEGMENTER = WeightSpec(
    name="clipseg",
    folder="clipseg-rd64-refined",
    repo_id="CIDAS/clipseg-rd64-refined",
    revision="999e0328d9e10b484360c477313983f9afdd7050",
    allow_patterns=("*.json", "*.txt", "model.safetensors"),
    required_files=(
        "config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
    ),
    purpose="training preprocessing: text-prompted masks",
)

FACE_DETECTOR = WeightSpec(
    name="yunet",
    folder="face-detection-yunet",
    # OpenCV's model zoo model (MIT), as OpenCV publishes it on the hub. Repo and revision are not pinned yet: they
    # could not be checked from the offline machines this was written on (the download logs a warning and verifies
    # the file against the hub's sha256 like the others).
    repo_id="opencv/face_detection_yunet",
    revision=None,
    allow_patterns=("face_detection_yunet_2023mar.onnx",),
    required_files=("face_detection_yunet_2023mar.onnx",),
    purpose="training preprocessing: face detection (optional: OpenCV's Haar cascades are the offline fallback)",
)

PREDICTION_WEIGHTS = (BASE, VAE, REFINER, SAFETY_CHECKER)
TRAINING_WEIGHTS = (UPSCALER, CAPTIONER, SEGMENTER)  # required by the preprocessing steps that use them
OPTIONAL_TRAINING_WEIGHTS = (FACE_DETECTOR,)  # fetched with them; without it a fallback runs
ALL_WEIGHTS = PREDICTION_WEIGHTS + TRAINING_WEIGHTS + OPTIONAL_TRAINING_WEIGHTS


class WeightsMissingError(RuntimeError):
    pass


def weights_dir() -> Path:
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)


def random_architecture(root: Path) -> str | None:
    """ "tiny", "mid" or "full" for a folder of seeded random weights; None for real ones."""
    marker = Path(root) / RANDOM_MARKER
    return json.loads(marker.read_text())["architecture"] if marker.exists() else None


def missing_files(root: Path, spec: WeightSpec) -> list[str]:
    folder = Path(root) / spec.folder
    return [pattern for pattern in spec.required_files if not any(folder.glob(pattern))]


def require(root: Path, specs=PREDICTION_WEIGHTS) -> None:
    """Fail with one message naming every missing file and the command that fetches them."""
    problems = []
    for spec in specs:
        missing = missing_files(root, spec)
        if missing:
            problems.append(
                f"  {spec.name} ({spec.repo_id}) in {Path(root) / spec.folder}: missing {', '.join(missing)}"
            )
    if problems:
        raise WeightsMissingError(
            f"the weight folder {root} is incomplete:\n"
            + "\n".join(problems)
            + f"\nFetch the production weights with `{DOWNLOAD_COMMAND}` (needs internet, about 14 GB), or write the"
            f" tiny test set with `python scripts/make_tiny_weights.py DIR` and set {WEIGHTS_DIR_ENV}=DIR."
        )
