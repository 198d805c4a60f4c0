"""The SDXL pipeline's parts as seeded random models, saved in the production weight layout: base (UNet, both text
encoders and their CLIP tokenizers, scheduler), the fp16-fix VAE's folder, the refiner and the safety checker.

Any size in `architectures` keeps SDXL's structure (two text encoders of different widths, size/crop conditioning,
the refiner's aesthetic-score conditioning, an 8x VAE), so every production code path runs. They draw noise: only
the shapes and the code paths are real.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.model import weights
from sdxl.model.random_weights.architectures import CLIP_VOCAB_SIZE, TINY, Architecture

log = logging.getLogger(__name__)

SEED = 0

# SDXL 1.0's scheduler_config.json, verbatim in substance.
SDXL_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary, derived from the copy that open-clip-torch's wheel carries."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is needed for the CLIP vocabulary: pip install --no-deps open-clip-torch")
    bpe_path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())  # GPT-2/CLIP's reversible byte -> printable character table
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def write_clip_tokenizer_files(folder: Path) -> None:
    """Store a tokenizer as production's SDXL repos do (vocab.json + merges.txt, no tokenizer.json), so loading
    takes the same path as in production."""
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer.json").unlink()


def _text_encoders(arch: Architecture):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModel(CLIPTextConfig(**arch.te1)), CLIPTextModelWithProjection(CLIPTextConfig(**arch.te2))


def _unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _vae(arch: Architecture, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**arch.vae, "force_upcast": force_upcast})


def _safety_checker(arch: Architecture):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1),
        vision_config=arch.safety_vision,
        projection_dim=arch.safety_projection,
    )
    checker = StableDiffusionSafetyChecker(config)
    # The real checker's thresholds are learned; 1.0 is above any cosine similarity, so a random checker flags
    # nothing unless a test lowers it.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    side = arch.safety_vision["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True, do_resize=True
    )
    return checker, processor


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class _Writer:
    """Saves models as production's repos hold them: fp16 variant files for the full-size set, plain otherwise."""

    arch: Architecture
    dtype: torch.dtype = torch.float32

    @property
    def variant(self):
        return "fp16" if self.dtype == torch.float16 else None

    def save(self, pipe_or_model, folder: Path) -> None:
        pipe_or_model.to(self.dtype).save_pretrained(folder, variant=self.variant)


def write_base(root: Path, writer: _Writer) -> None:
    from diffusers import StableDiffusionXLPipeline

    te1, te2 = _text_encoders(writer.arch)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(writer.arch, force_upcast=True),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=_unet(writer.arch.base_unet),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    writer.save(pipe, root / weights.BASE.folder)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer_files(root / weights.BASE.folder / name)
    # Production takes the base's VAE from the fp16-fix repo instead: mirror that layout.
    shutil.rmtree(root / weights.BASE.folder / "vae")
    _vae(writer.arch, force_upcast=False).to(writer.dtype).save_pretrained(root / weights.VAE.folder)


def write_refiner(root: Path, writer: _Writer) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(writer.arch, force_upcast=True),
        text_encoder=None,
        text_encoder_2=_text_encoders(writer.arch)[1],
        tokenizer=None,
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=_unet(writer.arch.refiner_unet),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    folder = root / weights.REFINER.folder
    writer.save(pipe, folder)
    write_clip_tokenizer_files(folder / "tokenizer_2")
    # The refiner shares the base's VAE and second text encoder: production downloads neither.
    for shared in weights.REFINER_SHARED_COMPONENTS:
        shutil.rmtree(folder / shared)


def write_safety_checker(root: Path, writer: _Writer) -> None:
    checker, processor = _safety_checker(writer.arch)
    checker.to(writer.dtype).save_pretrained(root / weights.SAFETY_CHECKER.folder)
    processor.save_pretrained(root / weights.SAFETY_CHECKER.folder)


def write_random_weights(
    root: Path, arch: Architecture = TINY, seed: int = SEED, dtype: torch.dtype = torch.float32
) -> Path:
    """Write seeded random base, refiner and safety checker of `arch` under `root` in the production layout."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(arch, dtype)
    for step in (write_base, write_refiner, write_safety_checker):
        torch.manual_seed(seed)
        step(root, writer)
    (root / weights.RANDOM_MARKER).write_text(
        json.dumps({"random": True, "architecture": arch.name, "seed": seed}) + "\n"
    )
    log.info("random %s SDXL weights (seed %d) written to %s", arch.name, seed, root)
    return root
