"""Seeded, randomly initialised tiny models saved in the production weight layout.

They keep SDXL's structure (two text encoders of different widths, size/crop conditioning, the refiner's
aesthetic-score conditioning, an 8x VAE) so every production code path runs on CPU in seconds. They draw noise:
only the shapes and the code paths are real.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch

from sdxl import weights

log = logging.getLogger(__name__)

SEED = 0
TE1_WIDTH = 32  # CLIP ViT-L stand-in
TE2_WIDTH = 48  # OpenCLIP bigG stand-in: a different width so the two can never be mixed up
TE2_PROJECTION = 32
TIME_EMBED_DIM = 8
CLIP_VOCAB_SIZE = 49408

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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary, derived from the copy that open-clip-torch's wheel carries."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is needed for the CLIP vocabulary: pip install --no-deps open-clip-torch")
    bpe_path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
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


def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
    )
    te1 = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TE1_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, **common
        )
    )
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=TE2_WIDTH,
            intermediate_size=53,
            num_attention_heads=4,
            num_hidden_layers=3,
            projection_dim=TE2_PROJECTION,
            **common,
        )
    )
    return te1, te2


def _unet(cross_attention_dim: int, time_ids: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + TE2_PROJECTION,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=1,
    )


def _vae(force_upcast: bool):
    from diffusers import AutoencoderKL

    # Four blocks give SDXL's 8x spatial factor, so widths and heights behave as in production.
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


def _safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    # The real checker's thresholds are learned; 1.0 is above any cosine similarity, so the tiny one flags nothing
    # unless a test lowers it.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, do_resize=True
    )
    return checker, processor


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def write_base(root: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    te1, te2 = _text_encoders()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(force_upcast=True),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=_unet(cross_attention_dim=TE1_WIDTH + TE2_WIDTH, time_ids=6),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.save_pretrained(root / weights.BASE.folder)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer_files(root / weights.BASE.folder / name)
    # Production takes the base's VAE from the fp16-fix repo instead: mirror that layout.
    shutil.rmtree(root / weights.BASE.folder / "vae")
    _vae(force_upcast=False).save_pretrained(root / weights.VAE.folder)


def write_refiner(root: Path) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(force_upcast=True),
        text_encoder=None,
        text_encoder_2=_text_encoders()[1],
        tokenizer=None,
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=_unet(cross_attention_dim=TE2_WIDTH, time_ids=5),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    folder = root / weights.REFINER.folder
    pipe.save_pretrained(folder)
    write_clip_tokenizer_files(folder / "tokenizer_2")
    # The refiner shares the base's VAE and second text encoder: production downloads neither.
    for shared in weights.REFINER_SHARED_COMPONENTS:
        shutil.rmtree(folder / shared)


def write_safety_checker(root: Path) -> None:
    checker, processor = _safety_checker()
    checker.save_pretrained(root / weights.SAFETY_CHECKER.folder)
    processor.save_pretrained(root / weights.SAFETY_CHECKER.folder)


def write_tiny_weights(root: Path, seed: int = SEED) -> Path:
    """Write the whole tiny set under `root`; the same seed writes the same bytes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = [write_base, write_refiner, write_safety_checker]
    try:
        from sdxl import tiny_preprocess_weights

        steps += tiny_preprocess_weights.WRITERS
    except ImportError:  # the preprocessing models come with the trainer
        pass
    for step in steps:
        torch.manual_seed(seed)
        step(root)
    (root / weights.TINY_MARKER).write_text(json.dumps({"tiny": True, "seed": seed}) + "\n")
    log.info("tiny weights written to %s", root)
    return root
