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
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
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
    # (file, sha256) pairs known independently of the hub's metadata; the download checks them too
    sha256: tuple[tuple[str, str], ...] = ()


REFINER_SHARED_COMPONENTS = ("vae", "text_encoder_2")

# How each kind of repository lays out its files: (allow_patterns, required_files). A required "*.safetensors"
# pattern accepts the fp16 variant the download fetches as well as the full-precision file a test may write.
Files = tuple[tuple[str, ...], tuple[str, ...]]


def _model_files(stem: str, variant: str = "") -> Files:
    """One model's config and safetensors weights; `stem` is the weights file's path without its extension."""
    folder, _, _ = stem.rpartition("/")
    config = f"{folder}/config.json" if folder else "config.json"
    return (config, f"{stem}{variant}.safetensors"), (config, f"{stem}*.safetensors")


def _pipeline_files(model_stems: tuple[str, ...], tokenizers: tuple[str, ...] = ()) -> Files:
    """A diffusers pipeline repository: its index, scheduler and tokenizers, and the fp16 variant of each model."""
    allow = ["model_index.json", "scheduler/*", *(f"{name}/*" for name in tokenizers)]
    required = ["model_index.json", "scheduler/scheduler_config.json", *(f"{name}/vocab.json" for name in tokenizers)]
    for stem in model_stems:
        fetched, present = _model_files(stem, ".fp16")
        allow += fetched
        required += present
    return tuple(allow), tuple(required)


def _transformers_files(tokenizer_files: tuple[str, ...] = (), pickled: bool = False) -> Files:
    """A transformers model with its processor. `pickled`: the pinned revision ships only pytorch_model.bin, which
    the download converts once to model.safetensors (loaded with weights_only), so setup never unpickles."""
    if pickled:
        allow = ("config.json", "preprocessor_config.json", "pytorch_model.bin")
    else:
        allow = ("*.json", "*.txt", "model.safetensors")
    return allow, ("config.json", "preprocessor_config.json", *tokenizer_files, "model.safetensors")


# Each entry: name, folder under the weights directory, Hugging Face repository, pinned commit, (files to fetch,
# files that prove it is there), purpose.
BASE = WeightSpec(
    "base",
    "sdxl-base-1.0",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "462165984030d82259a11f4367a4eed129e94a7b",
    *_pipeline_files(
        ("text_encoder/model", "text_encoder_2/model", "unet/diffusion_pytorch_model"), ("tokenizer", "tokenizer_2")
    ),
    "SDXL 1.0 base (UNet, both text encoders, tokenizers, scheduler)",
)
VAE = WeightSpec(
    "vae",
    "sdxl-vae-fp16-fix",
    "madebyollin/sdxl-vae-fp16-fix",
    "207b116dae70ace3637169f1ddd2434b91b3a8cd",
    *_model_files("diffusion_pytorch_model"),
    "SDXL VAE that decodes in fp16 without NaNs (shared by base and refiner)",
)
REFINER = WeightSpec(
    "refiner",
    "sdxl-refiner-1.0",
    "stabilityai/stable-diffusion-xl-refiner-1.0",
    "5d4cfe854c9a9a87939ff3653551c2b3c99a4356",
    *_pipeline_files(("unet/diffusion_pytorch_model",)),
    "SDXL 1.0 refiner UNet (shares the base's VAE and second text encoder)",
)
SAFETY_CHECKER = WeightSpec(
    "safety_checker",
    "safety-checker",
    "CompVis/stable-diffusion-safety-checker",
    "cb41f3a270d63d454d385fc2e4f571c487c253c5",
    *_transformers_files(pickled=True),
    "NSFW safety checker",
)
UPSCALER = WeightSpec(
    "swin2sr",
    "swin2sr-x4",
    "caidas/swin2SR-realworld-sr-x4-64-bsrgan-psnr",
    # "Upload processor" (2022-12-16): the last commit that changed a model file (later ones touch README.md only).
    "8162f62b3b8426135f19053e98250736b24faff5",
    *_transformers_files(pickled=True),
    "training preprocessing: x4 upscaling of small images",
)
CAPTIONER = WeightSpec(
    "blip",
    "blip-captioning-large",
    "Salesforce/blip-image-captioning-large",
    "353689b859fcf0523410b1806dace5fb46ecdf41",
    *_transformers_files(("tokenizer_config.json", "tokenizer.json")),
    "training preprocessing: image captions",
)
SEGMENTER = WeightSpec(
    "clipseg",
    "clipseg-rd64-refined",
    "CIDAS/clipseg-rd64-refined",
    "999e0328d9e10b484360c477313983f9afdd7050",
    *_transformers_files(("tokenizer_config.json", "vocab.json", "merges.txt")),
    "training preprocessing: text-prompted masks",
)

FACE_DETECTOR = WeightSpec(
    name="yunet",
    folder="face-detection-yunet",
    # OpenCV's model zoo model (MIT), as OpenCV publishes it on the hub. The commit is the hub repository's head
    # ("Added .gitattributes and .gitignore files"), whose tree holds the ONNX (older heads such as 71b890b lack it);
    # the sha256 and size (232589 bytes) are those in the LFS pointer of
    # models/face_detection_yunet/face_detection_yunet_2023mar.onnx in opencv/opencv_zoo on GitHub (at commit
    # 82b38c8f98e7b52aa171400f3e4c722352d0669f): the same file.
    repo_id="opencv/face_detection_yunet",
    revision="3cc26e7f1014a5ee5d74a42acee58bafc9d0a310",
    allow_patterns=("face_detection_yunet_2023mar.onnx",),
    required_files=("face_detection_yunet_2023mar.onnx",),
    purpose="training preprocessing: face detection (optional: OpenCV's Haar cascades are the offline fallback)",
    sha256=(("face_detection_yunet_2023mar.onnx", "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"),),
)

# ControlNets (optional: setup loads those whose folders are complete). The full-size diffusers SDXL ControlNets
# (1.25 B params, 2.5 GB in fp16 each), the ones diffusers' SDXL ControlNet examples use; the -mid (5x smaller) and
# -small (7x smaller) variants trade fidelity to the map for memory, with no published quality numbers to weigh.
CONTROLNET_CANNY = WeightSpec(
    "controlnet_canny",
    "controlnet-canny-sdxl-1.0",
    "diffusers/controlnet-canny-sdxl-1.0",
    # "Update README.md" (2023-08-09), right after "move the checkpoint to root"; later commits touch README.md only.
    "e04b87383a6ed517185cfa46b5b4f39a0b25c68f",
    *_model_files("diffusion_pytorch_model", ".fp16"),
    "ControlNet for SDXL steered by canny edge maps",
)
CONTROLNET_DEPTH = WeightSpec(
    "controlnet_depth",
    "controlnet-depth-sdxl-1.0",
    "diffusers/controlnet-depth-sdxl-1.0",
    "d409e4318358891d37974b9625c565e6cb8e9b2e",  # "add model" (2023-08-12): config and weights
    *_model_files("diffusion_pytorch_model", ".fp16"),
    "ControlNet for SDXL steered by depth maps",
)
# Depth Anything V2 Small (24.8 M params, 99 MB fp32, Apache-2.0) rather than Intel/dpt-hybrid-midas (123 M params,
# ~490 MB), which diffusers' SDXL depth example uses: the Depth Anything papers report their ViT-S model ahead of
# MiDaS v3.1's largest (BEiT-L) on zero-shot relative depth, and DPT-Hybrid is MiDaS v3.0, older and weaker than that.
DEPTH_ESTIMATOR = WeightSpec(
    "depth_estimator",
    "depth-anything-v2-small",
    "depth-anything/Depth-Anything-V2-Small-hf",
    "870a35c76c2bc1d82fbde922d95015496cb7dd6c",  # "Fix yaml": model files as first uploaded; later: README only
    *_transformers_files(),
    "depth maps for controlnet=depth (control_preprocess)",
)

# Optional prediction models: setup loads each one whose folder is complete, and a request that needs a missing one
# is refused naming the download option that fetches it.
INPAINTING_UNET = WeightSpec(
    "inpainting",
    "sdxl-inpainting-0.1",
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "115134f363124c53c7d878647567d04daf26e41e",
    *_model_files("unet/diffusion_pytorch_model", ".fp16"),
    "SDXL 1.0 inpainting UNet (9 input channels; shares the base's VAE, text encoders and scheduler)",
)
IP_ADAPTER_FILE = "sdxl_models/ip-adapter_sdxl_vit-h.safetensors"
IP_ADAPTER_ENCODER = "models/image_encoder"
IP_ADAPTER = WeightSpec(
    name="ip_adapter",
    folder="ip-adapter",
    # The SDXL IP-Adapter for OpenCLIP ViT-H/14 image embeddings (README, Weights: why ViT-H and not bigG). The
    # commit and the encoder's sha256 are those other projects pin for models/image_encoder/model.safetensors.
    repo_id="h94/IP-Adapter",
    revision="018e402774aeeddd60609b4ecdb7e298259dc729",
    allow_patterns=(IP_ADAPTER_FILE, f"{IP_ADAPTER_ENCODER}/config.json", f"{IP_ADAPTER_ENCODER}/model.safetensors"),
    required_files=(IP_ADAPTER_FILE, f"{IP_ADAPTER_ENCODER}/config.json", f"{IP_ADAPTER_ENCODER}/model.safetensors"),
    purpose="image prompts: the SDXL IP-Adapter (ViT-H) and its CLIP image encoder",
    sha256=(
        (f"{IP_ADAPTER_ENCODER}/model.safetensors", "6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030"),
    ),
)
# The download options that fetch them (scripts/download_weights.py), named in refusals.
OPTIONAL_PREDICTION_WEIGHTS = {"--inpainting": INPAINTING_UNET, "--ip-adapter": IP_ADAPTER}

PREDICTION_WEIGHTS = (BASE, VAE, REFINER, SAFETY_CHECKER)
CONTROLNETS = {"canny": CONTROLNET_CANNY, "depth": CONTROLNET_DEPTH}
CONTROLNET_WEIGHTS = (CONTROLNET_CANNY, CONTROLNET_DEPTH, DEPTH_ESTIMATOR)
CONTROLNET_DOWNLOAD_COMMAND = f"{DOWNLOAD_COMMAND} --controlnet"
TRAINING_WEIGHTS = (UPSCALER, CAPTIONER, SEGMENTER)  # required by the preprocessing steps that use them
OPTIONAL_TRAINING_WEIGHTS = (FACE_DETECTOR,)  # fetched with them; without it a fallback runs
ALL_WEIGHTS = (
    PREDICTION_WEIGHTS
    + TRAINING_WEIGHTS
    + OPTIONAL_TRAINING_WEIGHTS
    + CONTROLNET_WEIGHTS
    + tuple(OPTIONAL_PREDICTION_WEIGHTS.values())
)


def is_present(root: Path, spec: WeightSpec) -> bool:
    return not missing_files(root, spec)


def fetch_command(spec: WeightSpec) -> str:
    """The command that fetches an optional prediction model."""
    option = next(option for option, known in OPTIONAL_PREDICTION_WEIGHTS.items() if known is spec)
    return f"{DOWNLOAD_COMMAND} {option}"


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
            + f"\nFetch the production weights with `{DOWNLOAD_COMMAND}` (needs internet, about 13 GB), or write the"
            f" tiny test set with `python scripts/make_tiny_weights.py DIR` and set {WEIGHTS_DIR_ENV}=DIR."
        )
