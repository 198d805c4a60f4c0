"""BLIP captions for training images that caption.csv did not caption, prefixed with `caption_prefix`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from sdxl.model import weights
from sdxl.preprocess import models

log = logging.getLogger(__name__)

MAX_CAPTION_TOKENS = 40  # BLIP's captions are short; this bounds a runaway decode and keeps room in CLIP's 77 tokens


class Captioner(models.PreprocessModel):
    weights_spec = weights.CAPTIONER
    model_class = "BlipForConditionalGeneration"
    processor_class = "BlipProcessor"

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        """Greedy decoding: the same image always gets the same caption."""
        parameter = next(self.model.parameters())
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=MAX_CAPTION_TOKENS, num_beams=1, do_sample=False)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()


def with_prefix(prefix: str, caption: str) -> str:
    """`prefix` then the caption, with one space between them unless the prefix already ends in whitespace."""
    if not caption:
        return prefix.strip()
    return f"{prefix}{caption}" if not prefix or prefix[-1].isspace() else f"{prefix} {caption}"


def caption_images(
    images: list[Image.Image],
    given: list[str | None],
    prefix: str,
    load_captioner: Callable[[], Captioner],
) -> list[str]:
    """A caption for each image: the given one (from caption.csv) verbatim, else the prefixed BLIP caption. The
    captioner is loaded only if some image needs it."""
    missing = [index for index, caption in enumerate(given) if caption is None]
    captions = list(given)
    if missing:
        captioner = load_captioner()
        for index in missing:
            captions[index] = with_prefix(prefix, captioner.caption(images[index]))
            log.info("caption: image %d: %r", index, captions[index])
    log.info("caption: %d from caption.csv, %d by BLIP", len(images) - len(missing), len(missing))
    return captions
