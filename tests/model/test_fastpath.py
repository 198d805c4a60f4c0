"""Each fast-path setting leaves images unchanged beyond floating-point noise; impossible settings are refused."""

import numpy as np
import pytest

from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model.fastpath import FastPath
from sdxl.model.loading import load_pipelines

REQUEST = GenerationRequest(
    width=64, height=64, num_inference_steps=4, seed=21, refine="expert_ensemble_refiner", apply_watermark=False
)


def image(pipes):
    return np.asarray(generate(pipes, REQUEST).images[0]).astype(int)


@pytest.mark.parametrize(
    "fastpath",
    [FastPath(channels_last=True), FastPath(fuse_qkv=True)],
    ids=["channels_last", "fuse_qkv"],
)
def test_setting_keeps_the_image(pipes, tiny_weights_dir, fastpath):
    fast = load_pipelines(tiny_weights_dir, fastpath=fastpath)
    difference = np.abs(image(fast) - image(pipes))
    assert difference.max() <= 2  # uint8 levels: rounding of reordered float sums, nothing more


def test_direct_load_gives_the_same_model(pipes, tiny_weights_dir):
    direct = load_pipelines(tiny_weights_dir, fastpath=FastPath(direct_load=True))
    assert direct.text2img.unet.device == pipes.placement.device
    assert np.array_equal(image(direct), image(pipes))  # the same numbers, only read another way


def test_vae_upcast_setting_reaches_the_shared_vae(tiny_weights_dir):
    upcast = load_pipelines(tiny_weights_dir, fastpath=FastPath(vae_upcast=True))
    assert all(view.vae.config.force_upcast for view in (*upcast.base_views, *upcast.refiner_views))
    assert not load_pipelines(tiny_weights_dir).text2img.vae.config.force_upcast


def test_xformers_is_refused_without_cuda(tiny_weights_dir):
    with pytest.raises(ValueError, match="xformers needs a CUDA device"):
        load_pipelines(tiny_weights_dir, fastpath=FastPath(attention="xformers"))


@pytest.mark.parametrize(
    "env, message", [({"SDXL_ATTENTION": "flash"}, "not one of"), ({"SDXL_COMPILE": "yes"}, "use 1 or 0")]
)
def test_bad_settings_are_named(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        FastPath.from_env()


@pytest.mark.heavy
def test_regional_compile_keeps_the_image(pipes, tiny_weights_dir):
    fast = load_pipelines(tiny_weights_dir, fastpath=FastPath(compile=True))
    assert np.abs(image(fast) - image(pipes)).max() <= 2


def test_fused_qkv_refuses_loras_clearly(tiny_weights_dir, tmp_path):
    from sdxl.errors import InputError
    from sdxl.trained.trained_weights import TrainedWeights
    from tools.testing.trained import lora_state, write_lora

    fused = load_pipelines(tiny_weights_dir, fastpath=FastPath(fuse_qkv=True))
    path = write_lora(tmp_path, lora_state(fused.text2img.unet, seed=1))
    with pytest.raises(InputError, match="loras\\[0\\]: .*SDXL_FUSE_QKV=1"):
        TrainedWeights(fused).loras.ensure("x", path, "loras[0]")


def test_compile_cache_folder_is_private_and_a_planted_one_is_refused(tmp_path, monkeypatch):
    import stat

    from sdxl.guard.private_dirs import UnsafeFolderError
    from sdxl.model.fastpath import INDUCTOR_CACHE_ENV, _private_compile_cache

    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "inductor"))
    _private_compile_cache()
    assert stat.S_IMODE((tmp_path / "inductor").stat().st_mode) == 0o700

    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    (tmp_path / "planted").symlink_to(elsewhere)
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "planted"))
    with pytest.raises(UnsafeFolderError, match=INDUCTOR_CACHE_ENV):
        _private_compile_cache()
