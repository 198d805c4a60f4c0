"""trained_model.tar also holds what other tools load: the UNet LoRA in the kohya layout (A1111 / Forge / ComfyUI)
and the learned tokens as an SDXL embedding file (clip_l / clip_g). The predictor's files stay exactly as they were,
and the predictor's tar reader skips the new files (size-capped from the header) without extracting them."""

import io
import tarfile

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from safetensors.torch import load_file

from sdxl.errors import InputError
from sdxl.formats import KOHYA_LORA_FILE, SDXL_EMBEDDING_FILE, SDXL_EMBEDDING_KEYS
from sdxl.model import weights
from sdxl.trained import weights_cache as wc
from sdxl.training.loop import train
from tools.testing.training_support import Recorder, make_dataset, small_config

PREDICTOR_FILES = ["lora.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]
PROMPT = "a photo of <s0><s1> on a beach"


@pytest.fixture(scope="module")
def trained(tiny_weights_dir, tmp_path_factory):
    dataset = make_dataset(tmp_path_factory.mktemp("data"), n=2, resolution=64)
    recorder = Recorder()
    config = small_config(max_train_steps=2, lora_rank=4)
    result = train(config, dataset, tiny_weights_dir, tmp_path_factory.mktemp("run"), on_step=recorder, report=None)
    rows = recorder.trainer.tokens.rows()
    folder = tmp_path_factory.mktemp("files")
    with tarfile.open(result.tar_path) as tar:
        names = tar.getnames()
        tar.extractall(folder, filter="data")
    return result.tar_path, folder, names, rows


def _pipe(root):
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / weights.BASE.folder, vae=vae, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(root, lora_file, rows: dict[str, torch.Tensor], keys: tuple[str, str]) -> np.ndarray:
    """A fresh pipeline with the LoRA file and the token rows loaded by diffusers' own loaders."""
    pipe = _pipe(root)
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name, adapter_name="trained", use_safetensors=True)
    for encoder, tokenizer, key in (
        (pipe.text_encoder, pipe.tokenizer, keys[0]),
        (pipe.text_encoder_2, pipe.tokenizer_2, keys[1]),
    ):
        pipe.load_textual_inversion(rows[key], token=["<s0>", "<s1>"], text_encoder=encoder, tokenizer=tokenizer)
    image = pipe(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_tar_keeps_the_predictor_files_and_adds_the_interop_ones(trained):
    _, _, names, _ = trained
    assert names == PREDICTOR_FILES + [KOHYA_LORA_FILE, SDXL_EMBEDDING_FILE]


def test_kohya_lora_draws_what_the_diffusers_lora_draws(tiny_weights_dir, trained):
    _, folder, _, _ = trained
    kohya = load_file(folder / KOHYA_LORA_FILE)
    down = [k for k in kohya if k.endswith(".lora_down.weight")]
    # kohya names: lora_unet_<module path with _>.lora_down/.lora_up/.alpha; alpha = the trained alpha (rank 4)
    assert down and all(k.startswith("lora_unet_") for k in kohya)
    assert len(kohya) == 3 * len(down) == 3 * len(load_file(folder / "lora.safetensors")) // 2
    assert {float(kohya[k.replace(".lora_down.weight", ".alpha")]) for k in down} == {4.0}
    diffusers_rows = load_file(folder / "embeddings.pti")
    sdxl_rows = load_file(folder / SDXL_EMBEDDING_FILE)
    base = _pipe(tiny_weights_dir)(
        prompt="a photo on a beach", width=64, height=64, num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    from_diffusers = _draw(tiny_weights_dir, folder / "lora.safetensors", diffusers_rows, tuple(SDXL_EMBEDDING_KEYS))
    from_kohya = _draw(tiny_weights_dir, folder / KOHYA_LORA_FILE, sdxl_rows, ("clip_l", "clip_g"))
    assert np.abs(from_kohya - from_diffusers).max() <= 1  # measured: 0 (the same matrices, renamed)
    assert np.abs(from_diffusers - np.asarray(base, dtype=np.int16)).max() > 10  # the LoRA and tokens do something


def test_sdxl_embedding_holds_the_trained_rows(trained):
    _, folder, _, rows = trained
    embedding = load_file(folder / SDXL_EMBEDDING_FILE)
    assert set(embedding) == {"clip_l", "clip_g"}
    assert torch.equal(embedding["clip_l"], rows["text_encoders_0"])
    assert torch.equal(embedding["clip_g"], rows["text_encoders_1"])
    assert embedding["clip_l"].shape[0] == embedding["clip_g"].shape[0] == 2


def test_predictor_extracts_only_its_own_files(trained, tmp_path):
    tar_path, _, _, _ = trained
    dest = tmp_path / "entry"
    dest.mkdir()
    wc.extract_trained_tar(tar_path, dest, "replicate_weights", max_bytes=1 << 30)
    assert sorted(p.name for p in dest.iterdir()) == sorted(PREDICTOR_FILES)


def _tar_with(path, extra: dict[str, bytes], source):
    with tarfile.open(source) as original, tarfile.open(path, "w") as tar:
        for member in original.getmembers():
            tar.addfile(member, original.extractfile(member))
        for name, body in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize(
    "name, cap",
    [("report/report.json", 4 << 20), (SDXL_EMBEDDING_FILE.replace("embeddings", "x"), None)],
    ids=["capped", "unknown"],
)
def test_skipped_files_are_capped_and_unknown_names_not_extracted(trained, tmp_path, name, cap):
    tar_path, _, _, _ = trained
    size = (cap or 1000) + 1
    hostile = _tar_with(tmp_path / "t.tar", {name: b"{" * size}, tar_path)
    dest = tmp_path / "entry"
    dest.mkdir()
    if cap is None:
        wc.extract_trained_tar(hostile, dest, "replicate_weights", max_bytes=1 << 30)
        assert sorted(p.name for p in dest.iterdir()) == sorted(PREDICTOR_FILES)
        return
    with pytest.raises(InputError, match=f"replicate_weights.*{name}.*{size:,} bytes; at most {cap:,}"):
        wc.extract_trained_tar(hostile, dest, "replicate_weights", max_bytes=1 << 30)


def test_full_fine_tune_tar_has_the_embedding_but_no_kohya_lora(tiny_weights_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data", n=2, resolution=64)
    result = train(
        small_config(max_train_steps=1, is_lora=False), dataset, tiny_weights_dir, tmp_path / "run", report=None
    )
    with tarfile.open(result.tar_path) as tar:
        assert tar.getnames() == [
            "unet.safetensors", "embeddings.pti", "special_params.json", "training_params.json",
            SDXL_EMBEDDING_FILE,
        ]  # fmt: skip
