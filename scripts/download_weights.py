"""Fetch the production weights into the weights folder (needs internet; 12.8 GB for prediction).

    python scripts/download_weights.py                 # prediction weights into ./weights (or $SDXL_WEIGHTS_DIR)
    python scripts/download_weights.py --training      # also the preprocessing models the trainer uses (BLIP,
                                                       # CLIPSeg, Swin2SR and the YuNet face detector)
    python scripts/download_weights.py --controlnet    # also the canny and depth ControlNets and the depth
                                                       # estimator (5.1 GB; requests with `controlnet` need them)
    python scripts/download_weights.py --inpainting    # also the SDXL inpainting UNet (inpaint_model=inpainting)
    python scripts/download_weights.py --ip-adapter    # also the IP-Adapter and its image encoder (ip_adapter_image)
    python scripts/download_weights.py --dry-run       # say what would be fetched

Each model comes from the revision pinned in sdxl/model/weights.py. Downloads resume where they stopped (huggingface_hub
keeps partial files), show progress, and every file is checked against the hub's checksums (sha256 for large files)
before setup may use it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sdxl.model import weights  # noqa: E402

log = logging.getLogger("download_weights")


def verify(spec: weights.WeightSpec, folder: Path, api=None) -> list[str]:
    """Files the spec fetches that differ from the hub's at the pinned revision, or that the folder lacks.

    huggingface_hub's own check (HfApi.verify_repo_checksums): LFS files against their sha256, the others against
    their git blob hash. Files in `folder` that the spec does not fetch (the hub's other files, model.safetensors
    converted from a pickle) are not judged."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    result = (api or HfApi()).verify_repo_checksums(spec.repo_id, revision=spec.revision, local_dir=folder)
    bad = {mismatch["path"] for mismatch in result.mismatches} | set(result.missing_paths)
    log.info("%s: %d file(s) checked against the hub's checksums", spec.name, result.checked_count)
    return sorted(path for path in bad if any(fnmatch(path, pattern) for pattern in spec.allow_patterns))


def pinned_mismatches(spec: weights.WeightSpec, folder: Path) -> list[str]:
    """Files whose sha256 differs from the one sdxl/model/weights.py pins for them (known apart from the hub), or missing."""
    import hashlib

    bad = []
    for relative, sha256 in spec.sha256:
        path = folder / relative
        if not path.is_file():
            bad.append(relative)
            continue
        with open(path, "rb") as file:
            if hashlib.file_digest(file, "sha256").hexdigest() != sha256:
                bad.append(relative)
    return bad


def convert_pickle_to_safetensors(folder: Path, name: str = "pytorch_model.bin") -> None:
    """Once, at download time: load a pickled checkpoint with weights_only (no code runs) and store safetensors,
    so setup only ever reads safetensors."""
    import torch
    from safetensors.torch import save_file

    source = folder / name
    if not source.exists():
        return
    state = torch.load(source, map_location="cpu", weights_only=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, folder / "model.safetensors")
    source.unlink()
    log.info("converted %s to model.safetensors", source)


def check_face_detector(path: Path) -> None:
    """The face detector must load in this OpenCV (cv2.FaceDetectorYN), or preprocessing would fall back silently."""
    from sdxl.preprocess.faces import YuNetDetector

    try:
        YuNetDetector(path)
    except Exception as error:
        raise SystemExit(f"yunet: {path} does not load in OpenCV ({error}); delete it and run this again") from None


def download(spec: weights.WeightSpec, root: Path) -> None:
    from huggingface_hub import snapshot_download

    folder = root / spec.folder
    if spec.revision is None:
        log.warning("%s: no pinned revision is known; fetching the repository's current main", spec.repo_id)
    log.info("%s: %s@%s -> %s", spec.name, spec.repo_id, spec.revision or "main", folder)
    snapshot_download(
        spec.repo_id, revision=spec.revision, allow_patterns=list(spec.allow_patterns), local_dir=folder, max_workers=8
    )
    bad = verify(spec, folder) + pinned_mismatches(spec, folder)
    if bad:
        raise SystemExit(f"{spec.name}: checksum mismatch for {', '.join(bad)}; delete them and run this again")
    if spec is weights.FACE_DETECTOR:
        check_face_detector(folder / spec.required_files[0])
    convert_pickle_to_safetensors(folder)
    missing = weights.missing_files(root, spec)
    if missing:
        raise SystemExit(f"{spec.name}: still missing {', '.join(missing)} after download")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=weights.weights_dir(), help="weights folder (default: %(default)s)")
    parser.add_argument("--training", action="store_true", help="also fetch the trainer's preprocessing models")
    parser.add_argument("--controlnet", action="store_true", help="also fetch the ControlNets and the depth estimator")
    for option, spec in weights.OPTIONAL_PREDICTION_WEIGHTS.items():
        parser.add_argument(option, action="store_true", help=f"also fetch {spec.purpose}")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    specs = weights.PREDICTION_WEIGHTS
    if args.training:
        specs += weights.TRAINING_WEIGHTS + weights.OPTIONAL_TRAINING_WEIGHTS
    if args.controlnet:
        specs += weights.CONTROLNET_WEIGHTS
    specs += tuple(
        spec
        for option, spec in weights.OPTIONAL_PREDICTION_WEIGHTS.items()
        if getattr(args, option[2:].replace("-", "_"))
    )
    for spec in specs:
        if args.dry_run:
            print(f"{spec.name:15s} {spec.repo_id}@{spec.revision or 'main'} -> {args.dir / spec.folder}")
            print(f"{'':15s} files: {', '.join(spec.allow_patterns)}")
            continue
        download(spec, args.dir)
    if not args.dry_run:
        weights.require(args.dir, specs)
        log.info("all weights present in %s", args.dir)


if __name__ == "__main__":
    main()
