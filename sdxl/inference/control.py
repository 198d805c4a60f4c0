"""The control map a ControlNet steers by, sized to the output: canny edges (OpenCV), a depth map (the pinned depth
estimator, on the model's device), or the client's own map (control_preprocess=false)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from sdxl.errors import InputError
from sdxl.model import weights

# diffusers' SDXL canny example: cv2.Canny(image, 100, 200) on the image as given, the edges as white on black RGB.
CANNY_LOW, CANNY_HIGH = 100, 200


def require_loaded(views: dict, depth_estimator, controlnet: str, preprocess: bool) -> None:
    """Fail at once, before anything is fetched or computed, when the request needs weights that are not loaded."""
    if controlnet not in weights.CONTROLNETS:  # "none", or a value the request's own check names
        return
    if not any(name == controlnet for name, _ in views):
        spec = weights.CONTROLNETS[controlnet]
        raise InputError(
            "controlnet",
            f"the {controlnet} ControlNet ({spec.repo_id}) is not installed on this server; the operator fetches it "
            f"with `{weights.CONTROLNET_DOWNLOAD_COMMAND}`",
        )
    if controlnet == "depth" and preprocess and depth_estimator is None:
        raise InputError(
            "control_preprocess",
            f"the depth estimator ({weights.DEPTH_ESTIMATOR.repo_id}) is not installed on this server; send a depth "
            f"map with control_preprocess=false, or the operator fetches it with `{weights.CONTROLNET_DOWNLOAD_COMMAND}`",
        )


def canny_map(image: Image.Image) -> Image.Image:
    edges = cv2.Canny(np.asarray(image.convert("RGB")), CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def depth_map(image: Image.Image, depth_estimator) -> Image.Image:
    """Relative depth scaled to 0-255 per image, as diffusers' SDXL depth example does (near is bright)."""
    model, processor = depth_estimator
    pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    with torch.inference_mode():
        depth = model(pixel_values=pixels.to(model.device, model.dtype)).predicted_depth.float()
    depth = torch.nn.functional.interpolate(depth[:, None], size=image.size[::-1], mode="bicubic", align_corners=False)
    low, high = depth.amin(), depth.amax()
    depth = (depth - low) / (high - low).clamp_min(1e-6)
    array = (depth[0, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.repeat(array[:, :, None], 3, axis=2))


def control_map(request, size: tuple[int, int], depth_estimator) -> Image.Image:
    """The map for `request` at the output's (width, height): the control image is resized first, so edges are one
    output pixel wide and depth is estimated from what the output will cover."""
    image = request.control_image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    if not request.control_preprocess:
        return image
    if request.controlnet == "canny":
        return canny_map(image)
    return depth_map(image, depth_estimator)
