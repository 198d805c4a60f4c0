"""Image prompts (IP-Adapter) and the dedicated inpainting UNet in one request: what a request may ask of the
optional models this server has, checked before any work, and the image prompt attached around the base's call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sdxl.errors import InputError
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights
from sdxl.model.loading import Pipelines


def check_weights(pipes: Pipelines, image_prompt_given: bool, inpaint_model: str) -> None:
    """Refuse, naming the field, a request for an optional model whose weights this server does not have: the edge
    calls it before it fetches anything."""
    if image_prompt_given and pipes.image_prompt is None:
        raise InputError(
            "ip_adapter_image",
            "this server has no IP-Adapter weights; its operator fetches them with "
            f"`{weights.fetch_command(weights.IP_ADAPTER)}`",
        )
    if inpaint_model == "inpainting" and pipes.inpainting is None:
        raise InputError(
            "inpaint_model",
            "this server has no inpainting UNet; its operator fetches it with "
            f"`{weights.fetch_command(weights.INPAINTING_UNET)}`, or use 'base'",
        )


def check_request(pipes: Pipelines, request: GenerationRequest, trained_weights: bool = False) -> None:
    """check_weights, and the combinations the inpainting UNet does not take. `trained_weights`: the request runs
    with LoRAs or a fine-tune."""
    check_weights(pipes, request.ip_adapter_image is not None, request.inpaint_model)
    if request.inpaint_model != "inpainting":
        return
    if getattr(request, "controlnet", "none") != "none":
        raise InputError("inpaint_model", "a ControlNet steers the base UNet; use inpaint_model 'base' with controlnet")
    if request.uses_image_prompt:
        raise InputError(
            "ip_adapter_image",
            "the IP-Adapter steers the base UNet only; use inpaint_model 'base' with an image prompt",
        )
    if trained_weights:
        raise InputError(
            "inpaint_model",
            "'inpainting' runs without trained weights and loras (they were trained for the base UNet); "
            "use 'base' with them",
        )


@contextlib.contextmanager
def applied(pipes: Pipelines, request: GenerationRequest, view) -> Iterator[dict]:
    """The base call's image-prompt arguments, with the IP-Adapter on `view`'s UNet for the with-block."""
    if not request.uses_image_prompt:
        yield {}
        return
    with pipes.image_prompt.attached(view, request.ip_adapter_scale):
        yield {"ip_adapter_image": request.ip_adapter_image}
