"""Training runs on the tiny weights (CPU, 64-128 px, 1-3 steps): the tar, loading it with diffusers, what changes
and what must not, the lr schedule, the resolution, resuming, determinism and failures."""

import json
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdxl.model import weights
from sdxl.training import checkpoints, export
from sdxl.training.dataset import DatasetError
from sdxl.training.loop import train
from sdxl.training.models import load_components
from tools.testing.training_support import Recorder, assert_same_tensors, files_under, make_dataset, small_config

CONTRACT_FILES_LORA = ["lora.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]
EXTRA_FILES_LORA = [
    "lora_kohya.safetensors",
    "embeddings_sdxl.safetensors",
    "report/loss.png",
    "report/report.json",
    "report/samples.png",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=3, resolution=64)


@pytest.fixture(scope="module")
def lora_run(tiny_weights_dir, dataset, tmp_path_factory):
    """One uninterrupted LoRA + textual inversion run: 3 steps, linear warmup over 2, a checkpoint at step 2."""
    output = tmp_path_factory.mktemp("lora_run")
    recorder = Recorder()
    result = train(small_config(), dataset, tiny_weights_dir, output, on_step=recorder)
    return result, recorder, output


def _unpack(tar_path, folder):
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        assert all(m.isreg() for m in members)
        tar.extractall(folder, filter="data")
    return [m.name for m in members]


def _fresh_pipeline(root):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / weights.BASE.folder, vae=vae, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt="a photo of <s0><s1>"):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np", generator=generator).images


@pytest.mark.heavy
def test_lora_tar_has_the_contract_files_and_shapes(lora_run, tmp_path):
    result, _, output = lora_run
    assert result.tar_path == output / "trained_model.tar" and result.steps == 3
    assert files_under(output) == ["trained_model.tar"]  # checkpoints removed after success, nothing else
    # the contract's files first and unchanged; then the files for other tools and the report (their own tests)
    assert _unpack(result.tar_path, tmp_path) == CONTRACT_FILES_LORA + EXTRA_FILES_LORA
    embeddings = load_file(tmp_path / "embeddings.pti")
    assert {k: tuple(v.shape) for k, v in embeddings.items()} == {
        "text_encoders_0": (2, 32),
        "text_encoders_1": (2, 48),
    }
    assert json.loads((tmp_path / "special_params.json").read_text()) == {"TOK": "<s0><s1>"}
    assert json.loads((tmp_path / "training_params.json").read_text()) == small_config().to_dict()
    lora = load_file(tmp_path / "lora.safetensors")
    assert lora and all(k.startswith("unet.") and ".lora." in k for k in lora)
    targets = {k.split(".lora.")[0].rsplit(".", 2 if ".to_out.0." in k else 1)[-1] for k in lora}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0 ends in "0"
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for v in lora.values())  # lora_rank


def test_tar_loads_with_diffusers_and_changes_the_image(lora_run, tiny_weights_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    result, recorder, _ = lora_run
    _unpack(result.tar_path, tmp_path)
    pipe = _fresh_pipeline(tiny_weights_dir)
    base = _generate(pipe)

    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors", use_safetensors=True)
    embeddings = load_file(tmp_path / "embeddings.pti")
    tokens = ["<s0>", "<s1>"]
    pipe.load_textual_inversion(
        embeddings["text_encoders_0"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        embeddings["text_encoders_1"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    trained = _generate(pipe)
    assert np.abs(trained - base).max() > 1e-4

    # What diffusers loaded is exactly what was trained.
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=next(iter(pipe.unet.peft_config)))
    ours = get_peft_model_state_dict(recorder.trainer.unet)
    assert loaded.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(loaded[key], ours[key], rtol=0, atol=0)
    for encoder, key in ((pipe.text_encoder, "text_encoders_0"), (pipe.text_encoder_2, "text_encoders_1")):
        assert torch.equal(encoder.get_input_embeddings().weight[-2:], embeddings[key])


def test_lora_leaves_the_base_unet_and_other_token_rows_untouched(lora_run, tiny_weights_dir):
    _, recorder, _ = lora_run
    fresh = load_components(tiny_weights_dir)
    trained_unet = recorder.trainer.unet.state_dict()
    base_part = {k.replace(".base_layer.", "."): v for k, v in trained_unet.items() if ".lora_" not in k}
    assert_same_tensors(base_part, fresh.unet.state_dict())
    for trained, original, ids in zip(recorder.trainer.text_encoders, fresh.text_encoders, recorder.trainer.tokens.ids):
        weight = trained.get_input_embeddings().weight.detach()
        old_rows = original.get_input_embeddings().weight.shape[0]
        assert torch.equal(weight[:old_rows], original.get_input_embeddings().weight)  # bit-identical
        assert ids.tolist() == [old_rows, old_rows + 1]
    # ...while the LoRA and the new rows did learn.
    first, last = recorder.states[0], recorder.states[-1]
    assert any(not torch.equal(first[k], last[k]) for k in first if ".lora_B." in k)
    assert not torch.equal(first["tokens.text_encoders_0"], last["tokens.text_encoders_0"])


def test_linear_warmup_drives_the_optimizer_in_use(lora_run):
    _, recorder, _ = lora_run
    # diffusers' linear schedule with 2 warmup steps of 3: factor 0, 1/2, then 1 (and decaying after).
    assert recorder.lrs == [[0.0, 0.0], [5e-3, 5e-3], [1e-2, 1e-2]]
    optimizer = recorder.trainer.optimizer
    assert recorder.trainer.lr_scheduler.scheduler.optimizer is optimizer.optimizer
    # The step at lr 0 left the LoRA's B matrices at their initial zeros; the next step, at lr > 0, moved them.
    lora_b = [k for k in recorder.states[0] if ".lora_B." in k]
    assert lora_b and all(not recorder.states[0][k].any() for k in lora_b)
    assert any(recorder.states[1][k].any() for k in lora_b)


def test_constant_schedule_keeps_the_learning_rates(tiny_weights_dir, dataset, tmp_path):
    recorder = Recorder()
    config = small_config(lr_scheduler="constant", lr_warmup_steps=5, max_train_steps=2, lora_lr=3e-3, ti_lr=2e-3)
    train(config, dataset, tiny_weights_dir, tmp_path, on_step=recorder)
    assert recorder.lrs == [[3e-3, 2e-3], [3e-3, 2e-3]]


@pytest.mark.heavy
def test_full_fine_tune_updates_the_unet_at_the_real_resolution(tiny_weights_dir, tmp_path):
    data = make_dataset(tmp_path / "data128", n=2, resolution=128)
    recorder = Recorder()
    config = small_config(is_lora=False, resolution=128, max_train_steps=2, lr_scheduler="constant", ti_lr=0.0)
    result = train(config, data, tiny_weights_dir, tmp_path / "out", on_step=recorder)

    trainer = recorder.trainer
    assert tuple(trainer.latent_mean.shape) == (2, 4, 16, 16)  # 128 px / 8, not 512 or 64
    assert trainer.time_ids.tolist() == [[128, 128, 0, 0, 128, 128]]
    assert trainer.cached_text is not None  # ti_lr 0: frozen text encoders, embeddings cached

    files = _unpack(result.tar_path, tmp_path / "tar")
    assert files[:4] == ["unet.safetensors", "embeddings.pti", "special_params.json", "training_params.json"]
    assert files[4:] == ["embeddings_sdxl.safetensors", "report/loss.png", "report/report.json", "report/samples.png"]
    trained = load_file(tmp_path / "tar" / "unet.safetensors")
    base = load_components(tiny_weights_dir).unet.state_dict()
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} UNet tensors changed"


@pytest.mark.heavy
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(
    lora_run, tiny_weights_dir, dataset, tmp_path
):
    _, uninterrupted, _ = lora_run
    killed = Recorder(fail_at=3)  # after the checkpoint at step 2
    with pytest.raises(RuntimeError, match="injected failure after step 3"):
        train(small_config(), dataset, tiny_weights_dir, tmp_path, on_step=killed)
    assert not (tmp_path / "trained_model.tar").exists()
    saved = checkpoints.latest(tmp_path)
    assert saved.name == "checkpoint-2" and checkpoints.read_state(saved)["step"] == 2
    stored = {p.name for p in saved.iterdir()}
    assert "trainable.safetensors" in stored and not any(n.startswith("model") for n in stored)  # no frozen base
    assert not any(p.name.endswith(".partial") or p.name.startswith(".") for p in tmp_path.rglob("*"))
    # Same seed, same inputs: the first steps are identical to the other run's.
    assert_same_tensors(killed.states[1], uninterrupted.states[1])

    resumed = Recorder()
    result = train(small_config(seed=None), dataset, tiny_weights_dir, tmp_path, on_step=resumed)  # adopts seed 7
    assert result.resumed_from == 2 and resumed.steps == [3]
    assert resumed.lrs == [[1e-2, 1e-2]]  # the scheduler resumed too
    assert_same_tensors(resumed.states[-1], uninterrupted.states[-1])
    assert files_under(tmp_path) == ["trained_model.tar"]


def test_resume_refuses_a_checkpoint_from_other_inputs(tiny_weights_dir, dataset, tmp_path):
    with pytest.raises(RuntimeError):
        train(small_config(), dataset, tiny_weights_dir, tmp_path, on_step=Recorder(fail_at=2))
    never = Recorder()
    with pytest.raises(ValueError, match="lora_rank: 4 in the checkpoint, 8 now"):
        train(small_config(lora_rank=8), dataset, tiny_weights_dir, tmp_path, on_step=never)
    assert never.steps == []


def test_bad_dataset_fails_before_training_and_writes_nothing(tiny_weights_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=1, resolution=64)
    (data / "captions.csv").write_text("image_file,mask_file,caption\n")
    recorder = Recorder()
    with pytest.raises(DatasetError, match="holds 0 training image"):
        train(small_config(), data, tiny_weights_dir, tmp_path / "out", on_step=recorder)
    wrong_size = make_dataset(tmp_path / "data2", n=2, resolution=64)
    with pytest.raises(DatasetError, match="needs 128x128"):
        train(small_config(resolution=128), wrong_size, tiny_weights_dir, tmp_path / "out", on_step=recorder)
    assert recorder.steps == [] and not (tmp_path / "out").exists()


def test_failed_export_leaves_no_partial_tar_and_no_stray_files(tiny_weights_dir, dataset, tmp_path, monkeypatch):
    def broken_tar(staging, names, destination):
        destination.write_bytes(b"half a tar")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_tar", broken_tar)
    with pytest.raises(OSError, match="disk full"):
        train(small_config(max_train_steps=1), dataset, tiny_weights_dir, tmp_path)
    assert files_under(tmp_path) == []  # no tar, no .partial, no staging folder, no checkpoint (none was due)
