"""The trainer's preprocessing: each step is its own module, usable alone.

archive (safe zip/tar reading, caption.csv) -> upscale (Swin2SR x4) -> caption (BLIP) -> mask (CLIPSeg, faces or
uniform) -> crop (square, around the salient region or the faces). `pipeline.preprocess` runs them in order and
writes the training set. Nothing here imports cog.
"""

from sdxl.formats import CAPTIONS_COLUMNS, CAPTIONS_FILE
from sdxl.preprocess.pipeline import PreprocessConfig, preprocess

__all__ = ["CAPTIONS_COLUMNS", "CAPTIONS_FILE", "PreprocessConfig", "preprocess"]
