"""Tiny, seeded, randomly initialised stand-ins for the trainer's preprocessing models.

Each writer saves a model and its processor the way the production repo lays them out (config.json,
preprocessor_config.json, model.safetensors, tokenizer files), so the preprocessing code loads them through the same
from_pretrained(local_files_only=True) calls. `sdxl.model.random_weights.write_tiny_weights` runs every writer in
`WRITERS` after seeding torch. The models draw noise: only shapes and code paths are real.
"""

from __future__ import annotations

from pathlib import Path

from sdxl.model import weights
from sdxl.model.random_weights.pipeline import clip_tokenizer, write_clip_tokenizer_files

# CLIP's normalisation constants (BLIP's processor uses them too) and ImageNet's (CLIPSeg's ViT processor).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# A BERT-style WordPiece vocabulary for the tiny BLIP: BERT's special tokens, BLIP's [DEC] (the decoder's start token)
# and [ENC], and a few caption words so decoded captions read as words.
BLIP_WORDS = (
    "a photo of the an and with in on at man woman person dog cat face astronaut flag suit white red blue green "
    "standing sitting smiling holding wearing next to front background close up picture portrait"
).split()
BLIP_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _save_processor_parts(folder: Path, image_processor, tokenizer) -> None:
    """Save as the production repos do: preprocessor_config.json + tokenizer files (transformers 5's
    processor_config.json would hide the image processor from a production-layout completeness check)."""
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def blip_vocab() -> dict[str, int]:
    tokens = list(BLIP_SPECIAL) + BLIP_WORDS + [",", ".", "##s", "[DEC]", "[ENC]"]
    return {token: index for index, token in enumerate(tokens)}


def write_upscaler(root: Path) -> None:
    """Swin2SR x4 with the real-world model's "nearest+conv" upsampler and window size."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    config = Swin2SRConfig(
        image_size=64,
        embed_dim=12,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=8,
        mlp_ratio=2.0,
        upscale=4,
        upsampler="nearest+conv",
        resi_connection="1conv",
    )
    folder = root / weights.UPSCALER.folder
    Swin2SRForImageSuperResolution(config).save_pretrained(folder)
    # The production preprocessor_config: rescale to [0, 1] and pad to a multiple of the window size.
    Swin2SRImageProcessor(do_rescale=True, rescale_factor=1 / 255, do_pad=True, size_divisor=8).save_pretrained(folder)


def write_captioner(root: Path) -> None:
    """BLIP captioning: a tiny ViT encoder and BERT-style decoder over a small WordPiece vocabulary."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = blip_vocab()
    text_config = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        encoder_hidden_size=16,
        intermediate_size=37,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=vocab["[DEC]"],
        eos_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
        sep_token_id=vocab["[SEP]"],
    )
    vision_config = dict(
        hidden_size=16, intermediate_size=37, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    tokenizer = BertTokenizer(
        vocab=vocab, do_lower_case=True, bos_token="[DEC]", extra_special_tokens=["[ENC]"], model_max_length=64
    )
    image_processor = BlipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True
    )
    folder = root / weights.CAPTIONER.folder
    BlipForConditionalGeneration(config).save_pretrained(folder)
    _save_processor_parts(folder, image_processor, tokenizer)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)  # fails here, not at load, if they mismatch


def write_segmenter(root: Path) -> None:
    """CLIPSeg: a tiny CLIP (real CLIP BPE tokenizer) with the reduce-dim decoder; logits at the processor's size."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    config = CLIPSegConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=3),
        vision_config=dict(
            hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        extract_layers=[1, 2, 3],  # as production's (3, 6, 9) of 12: each below the layer count
        reduce_dim=8,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=37,
    )  # fmt: skip
    image_processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, do_resize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    folder = root / weights.SEGMENTER.folder
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    _save_processor_parts(folder, image_processor, tokenizer)
    write_clip_tokenizer_files(folder)  # vocab.json + merges.txt, as the production repo stores them
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


WRITERS = [write_upscaler, write_captioner, write_segmenter]
