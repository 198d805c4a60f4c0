"""Load base, refiner and safety checker once, sharing every component that can be shared."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from sdxl.model import weights
from sdxl.model.device import Placement, choose_placement
from sdxl.model.fastpath import FastPath, apply_fastpath
from sdxl.model.ip_adapter import ImagePrompt, load_image_prompt
from sdxl.model.lora_slots import LoraSlots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pipelines:
    """Every pipeline view a request can need, loaded once and never replaced (the modules' weights change in place
    for trained weights, and back). The views share modules: one copy of each weight in memory."""

    text2img: StableDiffusionXLPipeline
    img2img: StableDiffusionXLImg2ImgPipeline
    inpaint: StableDiffusionXLInpaintPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    refiner_inpaint: StableDiffusionXLInpaintPipeline
    safety_checker: torch.nn.Module
    safety_feature_extractor: object
    placement: Placement
    weights_dir: Path
    fastpath: FastPath
    random_weights: str | None  # "tiny"/"mid"/"full" for seeded random weights (they draw noise), None for real
    lora_slots: LoraSlots | None = None  # the compiled base UNet's fixed-shape LoRA slots (SDXL_COMPILE=1)
    # ControlNet views by (controlnet, view) over the base's modules and each loaded ControlNet (view: a mode, or
    # "inpainting" over the inpainting UNet, GenerationRequest.base_view); only those whose weight folders are there.
    # The depth estimator and its processor, when its folder is there.
    control_views: dict = field(default_factory=dict)
    depth_estimator: tuple | None = None
    # Optional models, None when their weights are not there: the inpainting UNet's view (the base's VAE, encoders and
    # scheduler) and the IP-Adapter, attached per request to the UNet that denoises (sdxl/model/ip_adapter.py).
    inpainting: StableDiffusionXLInpaintPipeline | None = None
    image_prompt: ImagePrompt | None = None

    @property
    def base_views(self):
        return (self.text2img, self.img2img, self.inpaint)

    @property
    def refiner_views(self):
        return (self.refiner, self.refiner_inpaint)


# Hand-built views, not from_pipe: from_pipe built these three views in 40.9 ms against 0.97 ms by hand (tiny
# weights, CPU, median of 30 builds; one generation per view gave the same pixels either way). Its per-module .to()
# pass made up a tenth of setup at full size; it also needs add_watermarker=False again and warns once per view.
def _view(cls, pipe, **extra):
    """`cls` over the same modules and config flags as `pipe` (what from_pipe does, minus its per-module .to() pass),
    plus `extra` modules (a ControlNet)."""
    params = inspect.signature(cls.__init__).parameters
    components = {name: module for name, module in pipe.components.items() if name in params} | extra
    flags = {k: v for k, v in pipe.config.items() if k in params and k not in components and not k.startswith("_")}
    view = cls(**components, **flags, add_watermarker=False)
    view.set_progress_bar_config(disable=True)
    return view


def _variant(folder: Path) -> str | None:
    """Production folders hold fp16 variant files (`*.fp16.safetensors`); the tiny set holds plain ones."""
    return "fp16" if any(folder.glob("unet/*.fp16.safetensors")) else None


def load_pipelines(
    root: Path | None = None, placement: Placement | None = None, fastpath: FastPath | None = None
) -> Pipelines:
    """Load everything a prediction needs from `root` (the weights folder), finished and frozen. Never downloads.
    Runs on the calling thread: the edge calls it on the compute thread (sdxl.model.compute), where generation runs.
    With SDXL_COMPILE=1 the edge runs sdxl.model.fastpath.warm_up(pipes) after it."""
    root = Path(root or weights.weights_dir())
    placement = placement or choose_placement()
    fastpath = fastpath or FastPath.from_env()
    weights.require(root, weights.PREDICTION_WEIGHTS)
    placement.use_cpu_threads()
    started = time.perf_counter()
    common = dict(dtype=placement.dtype, use_safetensors=True, local_files_only=True)
    if fastpath.direct_load:  # each tensor goes from the file to the device; nothing is staged in CPU memory
        common["device_map"] = placement.device.type

    # 1. The fp16-safe VAE, shared by base and refiner.
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder, **common)
    # 2. The base; 3. the refiner: its own UNet, the base's VAE and second text encoder.
    text2img = _load_base(root, vae, common)
    refiner = _load_refiner(root, text2img, common)
    # 4. The safety checker and its image processor; 5. the ControlNets and depth estimator that are there.
    safety_checker, feature_extractor = _load_safety_checker(root, common)
    controlnets, depth_estimator = _load_control(root, common)
    # 6. Everything on the device, in eval mode, without gradients.
    modules = (vae, text2img.text_encoder, text2img.text_encoder_2, text2img.unet, refiner.unet, safety_checker)
    _place(placement, (*modules, *controlnets.values(), *(depth_estimator or ())[:1]))
    # 6b. The optional models that are present: the inpainting UNet, the IP-Adapter.
    inpainting = _load_inpainting(root, text2img, placement, common)
    image_prompt = load_image_prompt(root, text2img)
    # 7. The views over the same modules, then the fast-path settings.
    pipes = Pipelines(
        text2img=text2img,
        img2img=_view(StableDiffusionXLImg2ImgPipeline, text2img),
        inpaint=_view(StableDiffusionXLInpaintPipeline, text2img),
        refiner=refiner,
        refiner_inpaint=_view(StableDiffusionXLInpaintPipeline, refiner),
        safety_checker=safety_checker,
        safety_feature_extractor=feature_extractor,
        placement=placement,
        weights_dir=root,
        fastpath=fastpath,
        random_weights=weights.random_architecture(root),
        control_views=control_views(text2img, controlnets, inpainting),
        depth_estimator=depth_estimator,
        inpainting=inpainting,
        image_prompt=image_prompt,
    )
    _log_loaded(pipes, time.perf_counter() - started)
    return apply_fastpath(pipes, fastpath)


def _load_base(root: Path, vae, common: dict) -> StableDiffusionXLPipeline:
    base_dir = root / weights.BASE.folder
    base = StableDiffusionXLPipeline.from_pretrained(
        base_dir, vae=vae, add_watermarker=False, variant=_variant(base_dir), **common
    )
    base.set_progress_bar_config(disable=True)
    return base


def _load_refiner(root: Path, base: StableDiffusionXLPipeline, common: dict) -> StableDiffusionXLImg2ImgPipeline:
    refiner_dir = root / weights.REFINER.folder
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_dir,
        vae=base.vae,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        add_watermarker=False,
        variant=_variant(refiner_dir),
        **common,
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _load_inpainting(root: Path, base, placement: Placement, common: dict) -> StableDiffusionXLInpaintPipeline | None:
    """The SDXL inpainting UNet in a view over the base's other modules (no second VAE or text encoder), if present."""
    spec = weights.INPAINTING_UNET
    if not weights.is_present(root, spec):
        log.info("no inpainting UNet in %s: inpaint_model=inpainting is refused", root / spec.folder)
        return None
    folder = root / spec.folder
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=_variant(folder), **common)
    _place(placement, (unet,))
    view = _view(StableDiffusionXLInpaintPipeline, base)
    view.register_modules(unet=unet)
    log.info("inpainting UNet loaded: %s, %d input channels", _count(unet), unet.config.in_channels)
    return view


def _load_safety_checker(root: Path, common: dict):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker_dir = root / weights.SAFETY_CHECKER.folder
    return StableDiffusionSafetyChecker.from_pretrained(checker_dir, **common), CLIPImageProcessor.from_pretrained(
        checker_dir
    )


CONTROL_VIEW_CLASSES = {
    "text2img": StableDiffusionXLControlNetPipeline,
    "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
    "inpaint": StableDiffusionXLControlNetInpaintPipeline,
}


def _load_control(root: Path, common: dict) -> tuple[dict, tuple | None]:
    """The ControlNets whose folders are complete (each optional), and the depth estimator if its folder is."""
    controlnets = {}
    for name, spec in weights.CONTROLNETS.items():
        if weights.missing_files(root, spec):
            continue
        folder = root / spec.folder
        variant = "fp16" if any(folder.glob("*.fp16.safetensors")) else None
        controlnets[name] = ControlNetModel.from_pretrained(folder, variant=variant, **common)
    depth_estimator = None
    if not weights.missing_files(root, weights.DEPTH_ESTIMATOR):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = root / weights.DEPTH_ESTIMATOR.folder
        model = AutoModelForDepthEstimation.from_pretrained(folder, **common)
        depth_estimator = (model, AutoImageProcessor.from_pretrained(folder))
    log.info(
        "ControlNets loaded: %s; depth estimator: %s (`%s` fetches the rest)",
        ", ".join(f"{name} ({_count(model)})" for name, model in controlnets.items()) or "none",
        _count(depth_estimator[0]) if depth_estimator else "none",
        weights.CONTROLNET_DOWNLOAD_COMMAND,
    )
    return controlnets, depth_estimator


def control_views(
    base: StableDiffusionXLPipeline, controlnets: dict, inpainting: StableDiffusionXLInpaintPipeline | None = None
) -> dict:
    """The ControlNet pipeline of each mode over the base's modules, for each ControlNet in `controlnets`; with the
    inpainting UNet's view, its inpaint pipeline over that UNet too, keyed "inpainting" (diffusers' SDXL ControlNet
    inpaint pipeline feeds a 9-channel UNet the mask and masked image, and the ControlNet the 4 latent channels)."""
    views = {
        (name, mode): _view(cls, base, controlnet=controlnet)
        for name, controlnet in controlnets.items()
        for mode, cls in CONTROL_VIEW_CLASSES.items()
    }
    if inpainting is not None:
        for name, controlnet in controlnets.items():
            views[(name, "inpainting")] = _view(
                StableDiffusionXLControlNetInpaintPipeline, inpainting, controlnet=controlnet
            )
    return views


def _place(placement: Placement, modules) -> None:
    for module in modules:
        if module.device != placement.device:
            module.to(placement.device)
        module.eval().requires_grad_(False)


def _log_loaded(pipes: Pipelines, seconds: float) -> None:
    base, placement = pipes.text2img, pipes.placement
    log.info(
        "loaded %s weights from %s in %.1fs on %s/%s (%d CPU threads): base unet %s, refiner unet %s, text encoders %s + %s, vae %s",
        f"RANDOM ({pipes.random_weights}, they draw noise)" if pipes.random_weights else "production",
        pipes.weights_dir,
        seconds,
        placement.device,
        str(placement.dtype).removeprefix("torch."),
        torch.get_num_threads(),
        *(_count(m) for m in (base.unet, pipes.refiner.unet, base.text_encoder, base.text_encoder_2, base.vae)),
    )


def _count(module) -> str:
    return f"{module.num_parameters() / 1e6:.1f}M params"
