"""Image prompts (IP-Adapter) and the dedicated inpainting UNet in one request: what a request may ask of the
optional models this server has, checked before any work, and the image prompt attached around the first call."""

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


def check_request(pipes: Pipelines, request: GenerationRequest, own_full_finetune: bool = False) -> None:
    """check_weights, and the one combination the inpainting UNet does not take: this model's own full fine-tune (it
    replaces the base UNet's weights; the inpainting UNet has its own). `own_full_finetune`: the server runs one."""
    check_weights(pipes, request.ip_adapter_image is not None, request.inpaint_model)
    if request.base_view == "inpainting" and own_full_finetune:
        raise InputError(
            "inpaint_model",
            "this model's own weights are a full fine-tune of the base UNet, which the inpainting UNet cannot take; "
            "use 'base'",
        )


@contextlib.contextmanager
def applied(pipes: Pipelines, request: GenerationRequest, view) -> Iterator[dict]:
    """The first call's image-prompt arguments, with the IP-Adapter on `view`'s UNet (base or inpainting) for the
    with-block."""
    if not request.uses_image_prompt:
        yield {}
        return
    with pipes.image_prompt.attached(view, request.ip_adapter_scale):
        yield {"ip_adapter_image": request.ip_adapter_image}
