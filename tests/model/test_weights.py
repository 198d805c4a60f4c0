"""The tiny weight set: same seed, same bytes; production layout; incomplete folders fail setup clearly."""

import hashlib
import re
import shutil
from fnmatch import fnmatch

import pytest

from sdxl.model import weights
from sdxl.model.loading import load_pipelines
from sdxl.model.random_weights import write_tiny_weights
from sdxl.model.random_weights.pipeline import clip_tokenizer


def digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_bytes(tiny_weights_dir, tmp_path):
    again = write_tiny_weights(tmp_path / "again")
    assert digest(again) == digest(tiny_weights_dir)


def test_layout_is_complete_and_marked_tiny(tiny_weights_dir):
    weights.require(tiny_weights_dir, weights.PREDICTION_WEIGHTS)
    assert weights.random_architecture(tiny_weights_dir) == "tiny"
    # The refiner shares the base's VAE and second text encoder, as production downloads it.
    refiner = tiny_weights_dir / weights.REFINER.folder
    assert not (refiner / "vae").exists() and not (refiner / "text_encoder_2").exists()


def test_text_encoders_keep_sdxl_structure(pipes):
    te1, te2 = pipes.text2img.text_encoder, pipes.text2img.text_encoder_2
    assert te1.config.hidden_size != te2.config.hidden_size
    assert pipes.text2img.unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert pipes.refiner.unet.config.cross_attention_dim == te2.config.hidden_size
    assert pipes.refiner.config.requires_aesthetics_score and pipes.refiner_inpaint.config.requires_aesthetics_score
    assert pipes.text2img.vae_scale_factor == 8
    # Shared, not loaded twice.
    assert pipes.refiner.vae is pipes.text2img.vae and pipes.refiner.text_encoder_2 is te2
    assert pipes.inpaint.unet is pipes.text2img.unet and pipes.refiner_inpaint.unet is pipes.refiner.unet


def test_tokenizer_is_the_real_clip_vocabulary(pipes):
    tokenizer = pipes.text2img.tokenizer
    assert tokenizer("a photo of an astronaut").input_ids == [49406, 320, 1125, 539, 550, 18376, 49407]
    assert pipes.text2img.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer pads with "!"
    assert clip_tokenizer("!").model_max_length == 77


@pytest.mark.parametrize(
    "spec, relative",
    [
        (weights.BASE, "unet/diffusion_pytorch_model.safetensors"),
        (weights.REFINER, "model_index.json"),
        (weights.VAE, "config.json"),
        (weights.SAFETY_CHECKER, "model.safetensors"),
    ],
)
def test_incomplete_folder_fails_naming_the_file_and_the_fix(tiny_weights_dir, tmp_path, spec, relative):
    broken = tmp_path / "w"
    shutil.copytree(tiny_weights_dir, broken)
    (broken / spec.folder / relative).unlink()
    with pytest.raises(weights.WeightsMissingError) as error:
        load_pipelines(broken)
    message = str(error.value)
    assert spec.repo_id in message and relative.split("/")[-1].split(".")[0] in message
    assert weights.DOWNLOAD_COMMAND in message


def test_missing_folder_fails_naming_every_model(tmp_path):
    with pytest.raises(weights.WeightsMissingError) as error:
        load_pipelines(tmp_path / "nothing-here")
    for spec in weights.PREDICTION_WEIGHTS:
        assert spec.repo_id in str(error.value)


def test_registry_pins_revisions_for_prediction_and_training_weights():
    for spec in weights.PREDICTION_WEIGHTS + weights.TRAINING_WEIGHTS + weights.CONTROLNET_WEIGHTS:
        assert re.fullmatch(r"[0-9a-f]{40}", spec.revision or ""), spec.name
    assert len({spec.folder for spec in weights.ALL_WEIGHTS}) == len(weights.ALL_WEIGHTS)


@pytest.mark.parametrize("spec", weights.ALL_WEIGHTS, ids=lambda spec: spec.name)
def test_download_fetches_every_required_file(spec):
    # A required file is fetched by an allow pattern (either side may be the glob), or is the model.safetensors
    # that the download converts from a fetched pytorch_model.bin.
    def fetched(required):
        if required == "model.safetensors" and "pytorch_model.bin" in spec.allow_patterns:
            return True
        return any(fnmatch(allowed, required) or fnmatch(required, allowed) for allowed in spec.allow_patterns)

    assert [required for required in spec.required_files if not fetched(required)] == []
