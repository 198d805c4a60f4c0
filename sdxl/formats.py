"""File layouts shared by the trainer that writes them and the predictor that reads them: each fact defined once.

trained_model.tar (the hosted trainer's layout; old predictors keep loading it, so these names never change):
  lora.safetensors             the UNet LoRA as StableDiffusionXLPipeline.save_lora_weights writes it (keys `unet.`...)
  unet.safetensors             instead of the LoRA, for a full fine-tune: the whole UNet state dict (diffusers names)
  embeddings.pti               safetensors: text_encoders_0 [n_new_tokens, te1 width], text_encoders_1 [n, te2 width]
  special_params.json          the token map, e.g. {"TOK": "<s0><s1>"}: row i of each embedding table is token <s{i}>
  training_params.json         the inputs the run used
Added by this trainer, ignored by the hosted predictor:
  lora_kohya.safetensors       the UNet LoRA in the kohya layout A1111 / Forge / ComfyUI load (LoRA runs)
  embeddings_sdxl.safetensors  the learned tokens as an SDXL embedding file (clip_l, clip_g)
  report/                      loss.png, samples.png, report.json: how the run went (when a report was made)

The client's upload (input_images): a zip or tar of images, optionally with caption.csv (an image column and a
caption column, matched by file name). Preprocessing turns it into the training folder the training engine reads:
  NNNN.src.png  NNNN.mask.png  captions.csv (image_file,mask_file,caption; file names relative to the folder)
"""

from __future__ import annotations

import re

TRAINED_TAR = "trained_model.tar"
LORA_FILE = "lora.safetensors"
UNET_FILE = "unet.safetensors"
EMBEDDINGS_FILE = "embeddings.pti"
SPECIAL_PARAMS_FILE = "special_params.json"
TRAINING_PARAMS_FILE = "training_params.json"
TRAINED_FILES = (LORA_FILE, UNET_FILE, EMBEDDINGS_FILE, SPECIAL_PARAMS_FILE, TRAINING_PARAMS_FILE)
SAFETENSORS_FILES = (LORA_FILE, UNET_FILE, EMBEDDINGS_FILE)

KOHYA_LORA_FILE = "lora_kohya.safetensors"
SDXL_EMBEDDING_FILE = "embeddings_sdxl.safetensors"
REPORT_DIR = "report"
REPORT_JSON = f"{REPORT_DIR}/report.json"

# embeddings.pti's keys, one per text encoder: text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP bigG)
EMBEDDING_KEYS = ("text_encoders_0", "text_encoders_1")
# the same rows in the SDXL embedding file A1111 / ComfyUI read
SDXL_EMBEDDING_KEYS = dict(zip(EMBEDDING_KEYS, ("clip_l", "clip_g")))

NEW_TOKEN = re.compile(r"<s(\d+)>")  # the trainer's new tokens: <s0>, <s1>, ...

# The upload: its archive types (input_images_filetype; "infer" tells zip from tar by content) and caption.csv.
ARCHIVE_TYPES = ("infer", "zip", "tar")
UPLOAD_CAPTIONS_FILE = "caption.csv"
UPLOAD_IMAGE_COLUMNS = ("image_file", "image", "file_name", "filename", "file")  # the first one present is used
UPLOAD_CAPTION_COLUMNS = ("caption", "text")

# The training folder preprocessing writes and the training engine reads.
CAPTIONS_FILE = "captions.csv"
CAPTIONS_COLUMNS = ("image_file", "mask_file", "caption")


def training_image_names(index: int) -> tuple[str, str]:
    """The training folder's image and mask file names of example `index`."""
    return f"{index:04d}.src.png", f"{index:04d}.mask.png"


def new_token(index: int) -> str:
    return f"<s{index}>"


def whole_word(word: str) -> str:
    """A regex for `word` as a whole word: not inside a longer word ("TOK" matches "TOK," but not "TOKYO" or
    "my_TOK"). The trained word is replaced this way in captions (training) and prompts (prediction)."""
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def contains_word(text: str, word: str) -> bool:
    return re.search(whole_word(word), text) is not None


# Output images (the predictor's output_format and output_quality): declared here so the request checks them without
# reaching up into sdxl.output, which writes them.
FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}  # output_format -> Pillow's format
DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 80  # as Replicate's newer image models
QUALITY_RANGE = (1, 100)
