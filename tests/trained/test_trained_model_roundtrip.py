"""What the trainer writes, the predictor serves: a trained_model.tar through `replicate_weights` (downloaded from a
loopback server) and as the model's own weights (setup(weights)), equal to a direct diffusers load of its files."""

import tarfile

import numpy as np
import pytest
import torch
from cog._inspector import check_input, create_predictor
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

import predict
from sdxl.model import weights
from sdxl.training.loop import train
from tools.testing.file_server import FileServer
from tools.testing.training_support import make_dataset, small_config

INPUTS = {"prompt": "a photo of TOK on a beach", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 8}
INPUTS = {**INPUTS, "apply_watermark": False, "lora_scale": 0.6}


@pytest.fixture(scope="module")
def trained_tar(tiny_weights_dir, tmp_path_factory):
    dataset = make_dataset(tmp_path_factory.mktemp("data"), n=2, resolution=64)
    return train(small_config(max_train_steps=2), dataset, tiny_weights_dir, tmp_path_factory.mktemp("run")).tar_path


@pytest.fixture
def runner_env(tiny_weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tiny_weights_dir))
    monkeypatch.setenv("SDXL_WEIGHTS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDXL_ALLOW_LOOPBACK_HTTP", "1")


def run(runner, **inputs):
    info = create_predictor("predict", "Runner")
    paths = runner.run(**check_input(info.inputs, {**INPUTS, **inputs}))
    return np.asarray(Image.open(paths[0]).convert("RGB"))


def direct_diffusers(root, tar_path, folder) -> np.ndarray:
    """The trained files loaded with diffusers' own loaders, the trained word written as its tokens."""
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / weights.BASE.folder, vae=vae, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, weight_name="lora.safetensors", adapter_name="trained", use_safetensors=True)
    pipe.set_adapters(["trained"], adapter_weights=[INPUTS["lora_scale"]])
    rows = load_file(folder / "embeddings.pti")
    for encoder, tokenizer, key in (
        (pipe.text_encoder, pipe.tokenizer, "text_encoders_0"),
        (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoders_1"),
    ):
        pipe.load_textual_inversion(rows[key], token=["<s0>", "<s1>"], text_encoder=encoder, tokenizer=tokenizer)
    image = pipe(
        prompt="a photo of <s0><s1> on a beach",
        negative_prompt="",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(INPUTS["seed"]),
    ).images[0]
    return np.asarray(image)


@pytest.mark.heavy
def test_replicate_weights_serve_the_trained_model(runner_env, tiny_weights_dir, trained_tar, tmp_path):
    server = FileServer()
    try:
        url = server.serve("/trained_model.tar", trained_tar.read_bytes())
        runner = predict.Runner()
        runner.setup()
        base = run(runner)
        trained = run(runner, replicate_weights=url)
        after = run(runner)
    finally:
        server.close()
    assert not np.array_equal(trained, base)
    np.testing.assert_array_equal(trained, direct_diffusers(tiny_weights_dir, trained_tar, tmp_path / "files"))
    np.testing.assert_array_equal(after, base)


def test_own_weights_at_setup_serve_the_trained_model(runner_env, tiny_weights_dir, trained_tar, tmp_path):
    runner = predict.Runner()
    runner.setup(weights=str(trained_tar))
    np.testing.assert_array_equal(run(runner), direct_diffusers(tiny_weights_dir, trained_tar, tmp_path / "files"))
