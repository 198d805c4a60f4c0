"""Image prompts and the inpainting UNet with the rest of the model, in process: a LoRA and an image prompt together
equal diffusers (load_ip_adapter + load_lora_weights), so do a LoRA on the inpainting UNet and an image prompt with
weighted prompts; a server without the optional weights refuses a request that needs them before anything is
fetched, naming the field and the download command; what diffusers does with a base-UNet LoRA on the 9-channel
inpainting UNet, and what this server refuses of it (conv_in, a full fine-tune)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file

from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inputs import prompt_weighting
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights
from sdxl.model.fastpath import FastPath
from sdxl.model.loading import load_pipelines
from sdxl.serving import predict_once
from sdxl.trained import lora_undo
from sdxl.trained import weights_cache as wc
from sdxl.trained.lora_store import InpaintingUnetLoras, LoraStore, inpainting_lora_store_for, lora_store_for
from sdxl.trained.request import AdapterRequest, LoraInput
from sdxl.trained.trained_weights import TrainedWeights
from sdxl.trained.unet_swap import unet_tensors
from tools.testing.trained import lora_state, write_lora

SEED = 3
PROMPT = "a red fox"
IMAGE_PROMPT = Image.fromarray((np.random.RandomState(5).rand(40, 40, 3) * 255).astype("uint8"))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))
INIT = Image.fromarray((np.random.RandomState(6).rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def own_pipes(tiny_weights_dir):
    """Pipelines of this module's own: the LoRA loaded here stays out of the session's."""
    return load_pipelines(tiny_weights_dir)


@pytest.fixture(scope="module")
def lora_file(tiny_weights_dir, tmp_path_factory):
    base = StableDiffusionXLPipeline.from_pretrained(tiny_weights_dir / weights.BASE.folder, vae=None)
    return write_lora(tmp_path_factory.mktemp("lora"), lora_state(base.unet, seed=9))


def load_reference_ip_adapter(pipe, root):
    subfolder, weight_name = weights.IP_ADAPTER_FILE.split("/")
    pipe.load_ip_adapter(str(root / weights.IP_ADAPTER.folder), subfolder=subfolder, weight_name=weight_name,
                         image_encoder_folder=weights.IP_ADAPTER_ENCODER)  # fmt: skip


def image_prompt_reference(tiny_weights_dir) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline loaded apart from sdxl.model.loading, with load_ip_adapter at scale 0.8."""
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    reference = StableDiffusionXLPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, vae=vae, add_watermarker=False
    )
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    load_reference_ip_adapter(reference, tiny_weights_dir)
    reference.set_ip_adapter_scale(0.8)
    return reference


def test_a_lora_and_an_image_prompt_together_equal_diffusers(own_pipes, lora_file, tiny_weights_dir):
    store = LoraStore(own_pipes.text2img)
    store.activate([(store.ensure("style", lora_file, "loras[0]"), 0.8, "loras[0]")])
    try:
        request = GenerationRequest(prompt=PROMPT, seed=SEED, width=64, height=64, num_inference_steps=3,
                                    apply_watermark=False, disable_safety_checker=True, ip_adapter_image=IMAGE_PROMPT,
                                    ip_adapter_scale=0.8)  # fmt: skip
        got = np.asarray(generate(own_pipes, request).images[0])
    finally:
        store.deactivate()
    reference = image_prompt_reference(tiny_weights_dir)
    reference.load_lora_weights(lora_file, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.8])
    expected = reference(prompt=PROMPT, negative_prompt="", num_inference_steps=3, width=64, height=64, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(SEED), ip_adapter_image=IMAGE_PROMPT).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected))
    # The LoRA moved the image: without it the same request draws something else.
    assert not np.array_equal(got, np.asarray(generate(own_pipes, request).images[0]))


@pytest.mark.parametrize(
    "inputs, field, command",
    [
        ({"ip_adapter_image": IMAGE_PROMPT}, "ip_adapter_image", "download_weights.py --ip-adapter"),
        (
            {"image": INIT, "mask": MASK, "inpaint_model": "inpainting"},
            "inpaint_model",
            "download_weights.py --inpainting",
        ),
    ],
)
def test_without_the_weights_a_request_is_refused_before_any_fetch(own_pipes, listener, inputs, field, command):
    bare = dataclasses.replace(own_pipes, image_prompt=None, inpainting=None)
    lora = LoraInput(f"https://127.0.0.1:{listener.port}/style.safetensors", 1.0)
    request = GenerationRequest(prompt=PROMPT, seed=SEED, width=64, height=64, num_inference_steps=2, **inputs)
    with pytest.raises(InputError) as refused:
        predict_once(bare, TrainedWeights(bare), AdapterRequest(loras=(lora,)), request)
    assert refused.value.field == field and command in str(refused.value)
    assert not listener.was_connected()


def inpainting_reference(tiny_weights_dir) -> StableDiffusionXLInpaintPipeline:
    """diffusers' SDXL inpaint pipeline over the inpainting UNet, loaded apart from sdxl.model.loading."""
    unet = UNet2DConditionModel.from_pretrained(tiny_weights_dir / weights.INPAINTING_UNET.folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_weights_dir / weights.VAE.folder)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(
        tiny_weights_dir / weights.BASE.folder, unet=unet, vae=vae, add_watermarker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


INPAINTING = dict(prompt=PROMPT, seed=SEED, width=64, height=64, num_inference_steps=3, apply_watermark=False,
                  disable_safety_checker=True, image=INIT, mask=MASK, prompt_strength=0.9, inpaint_model="inpainting")  # fmt: skip


def reference_inpainting(pipe) -> np.ndarray:
    return np.asarray(
        pipe(prompt=PROMPT, negative_prompt="", image=INIT, mask_image=MASK, strength=0.9, width=64, height=64,
             num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    )  # fmt: skip


@pytest.fixture(scope="module")
def inpainting_with_lora(tiny_weights_dir, lora_file) -> np.ndarray:
    """What diffusers' inpaint pipeline over the inpainting UNet draws after load_lora_weights, at scale 0.8."""
    reference = inpainting_reference(tiny_weights_dir)
    reference.load_lora_weights(lora_file, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.8])
    return reference_inpainting(reference)


def lora_on_both_unets(pipes, lora_file, name: str) -> np.ndarray:
    """The inpainting request drawn with the LoRA on: the base's store (by the pipelines' fast-path backend) holds the
    text encoders' parts, the inpainting UNet's store its UNet part; both unloaded again afterwards."""
    base_store, inpainting_store = lora_store_for(pipes), inpainting_lora_store_for(pipes)
    assert isinstance(inpainting_store, InpaintingUnetLoras)
    active = [(base_store.ensure(name, lora_file, "loras[0]"), 0.8, "loras[0]")]
    inpainting_store.ensure(name, lora_file, "loras[0]")
    base_store.activate(active)
    inpainting_store.activate(active)
    try:
        return np.asarray(generate(pipes, GenerationRequest(**INPAINTING)).images[0])
    finally:
        base_store.deactivate()
        inpainting_store.deactivate()
        inpainting_store.unload_all()
        base_store.unload_all()


def test_a_lora_on_the_inpainting_unet_equals_diffusers_and_comes_off_bit_for_bit(
    own_pipes, lora_file, inpainting_with_lora
):
    """The base's LoRA store carries the text-encoder parts (the encoders are shared), the inpainting UNet's store its
    UNet part: together what diffusers' inpaint pipeline draws after load_lora_weights on that UNet."""
    plain = np.asarray(generate(own_pipes, GenerationRequest(**INPAINTING)).images[0])
    got = lora_on_both_unets(own_pipes, lora_file, "inpainting_style")
    np.testing.assert_array_equal(got, inpainting_with_lora)
    assert not np.array_equal(got, plain)
    np.testing.assert_array_equal(np.asarray(generate(own_pipes, GenerationRequest(**INPAINTING)).images[0]), plain)


@pytest.mark.heavy
def test_with_a_compiled_base_unet_the_inpainting_unet_takes_loras_as_peft(
    tiny_weights_dir, lora_file, inpainting_with_lora
):
    """SDXL_COMPILE=1: the base's LoRAs go into fixed slots, the (never compiled) inpainting UNet's stay peft adapters;
    the image is diffusers'. The base UNet is not called here, so nothing compiles."""
    compiled = load_pipelines(tiny_weights_dir, fastpath=FastPath(compile=True))
    assert compiled.lora_slots is not None
    np.testing.assert_array_equal(lora_on_both_unets(compiled, lora_file, "compiled_style"), inpainting_with_lora)


@pytest.mark.heavy
def test_the_models_own_lora_reaches_the_inpainting_unet(own_pipes, lora_file, inpainting_with_lora, tmp_path):
    """The model's own LoRA is part of every request, inpainting with the inpainting UNet too."""
    own = tmp_path / "own"
    own.mkdir()
    shutil.copyfile(lora_file, own / "lora.safetensors")
    trained_weights = TrainedWeights(own_pipes, wc.WeightsCache(tmp_path / "cache"))
    trained_weights.load_own_weights(own)
    try:
        got = predict_once(own_pipes, trained_weights, AdapterRequest(lora_scale=0.8), GenerationRequest(**INPAINTING))
    finally:
        trained_weights.inpainting_loras.unload_all()
        trained_weights.loras.unload_all()
    np.testing.assert_array_equal(np.asarray(got.images[0]), inpainting_with_lora)


def test_a_lora_on_conv_in_is_refused_for_the_inpainting_unet_and_leaves_it_as_it_was(own_pipes, lora_file, tmp_path):
    """conv_in is the one layer the two UNets do not share (4 input channels against 9): the base takes such a LoRA,
    the inpainting UNet refuses it naming the field and the way out, with its modules and parameters untouched and
    the base's LoRAs (the shared text encoders' adapters) left alone."""
    state = _file(lora_file)
    rank = state["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0]
    out_channels = own_pipes.text2img.unet.config.block_out_channels[0]
    generator = torch.Generator().manual_seed(1)
    state["unet.conv_in.lora_A.weight"] = torch.randn(rank, 4, 3, 3, generator=generator)
    state["unet.conv_in.lora_B.weight"] = torch.randn(out_channels, rank, 1, 1, generator=generator)
    path = tmp_path / "conv_in.safetensors"
    save_file(state, path)
    base_store, inpainting_store = LoraStore(own_pipes.text2img), InpaintingUnetLoras(own_pipes.inpainting)
    base_store.ensure("with_conv_in", path, "loras[0]")  # the base UNet takes it
    before = lora_undo.tree(inpainting_store.modules)
    with pytest.raises(InputError) as refused:
        inpainting_store.ensure("with_conv_in", path, "loras[0]")
    assert refused.value.field == "loras[0]"
    assert "the inpainting UNet" in str(refused.value) and "use inpaint_model 'base'" in str(refused.value)
    assert lora_undo.tree(inpainting_store.modules) == before and "with_conv_in" not in inpainting_store.resident
    assert "with_conv_in" in base_store.peft_adapter_names()  # the base's LoRA is whole
    base_store.unload_all()


@pytest.mark.heavy
def test_the_models_own_full_finetune_refuses_the_inpainting_unet_before_any_fetch(own_pipes, listener, tmp_path):
    """The model's own weights replaced the base UNet: an inpainting-UNet request would silently drop them."""
    own = tmp_path / "own"
    own.mkdir()
    save_file(unet_tensors(own_pipes.text2img.unet), own / "unet.safetensors")  # the base's own weights: no change
    trained_weights = TrainedWeights(own_pipes)
    trained_weights.load_own_weights(own)
    lora = LoraInput(f"https://127.0.0.1:{listener.port}/style.safetensors", 1.0)
    with pytest.raises(InputError, match="full fine-tune of the base UNet") as refused:
        predict_once(own_pipes, trained_weights, AdapterRequest(loras=(lora,)), GenerationRequest(**INPAINTING))
    assert refused.value.field == "inpaint_model"
    assert not listener.was_connected()


def test_an_image_prompt_with_weighted_prompts_equals_diffusers(own_pipes, tiny_weights_dir):
    """prompt_weighting's embeddings and the image prompt in one call: diffusers with the same embeddings and
    ip_adapter_image draws the same image."""
    prompt = "a (red)1.4 fox++"
    request = GenerationRequest(prompt=prompt, seed=SEED, width=64, height=64, num_inference_steps=3,
                                apply_watermark=False, disable_safety_checker=True, prompt_weighting=True,
                                ip_adapter_image=IMAGE_PROMPT, ip_adapter_scale=0.8)  # fmt: skip
    got = np.asarray(generate(own_pipes, request).images[0])
    reference = image_prompt_reference(tiny_weights_dir)
    embeds = prompt_weighting.encode_base(reference, prompt, "").as_kwargs()
    expected = reference(**embeds, num_inference_steps=3, width=64, height=64, guidance_scale=7.5,
                         generator=torch.Generator("cpu").manual_seed(SEED), ip_adapter_image=IMAGE_PROMPT).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(expected))
    plain = dataclasses.replace(request, ip_adapter_image=None)
    assert not np.array_equal(got, np.asarray(generate(own_pipes, plain).images[0]))


def test_what_diffusers_does_with_a_base_unet_lora_on_the_inpainting_unet(own_pipes, lora_file, tiny_weights_dir):
    """An attention LoRA trained on the base UNet loads into the 9-channel UNet (its attention layers have the base's
    names and shapes) and changes its images; a LoRA on conv_in does not fit its 9 input channels."""
    view = StableDiffusionXLInpaintPipeline(**{**own_pipes.inpainting.components, "image_encoder": None})
    unet = view.unet
    args = dict(prompt=PROMPT, image=INIT, mask_image=MASK, num_inference_steps=2, width=64, height=64)
    before = np.asarray(view(**args, generator=torch.Generator("cpu").manual_seed(SEED)).images[0])
    view.load_lora_into_unet(
        {k: v for k, v in _file(lora_file).items()}, network_alphas=None, unet=unet, adapter_name="base_lora"
    )
    try:
        after = np.asarray(view(**args, generator=torch.Generator("cpu").manual_seed(SEED)).images[0])
        assert not np.array_equal(before, after)
    finally:
        unet.delete_adapters("base_lora")
    conv_in = {
        "unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3),
        "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1),
    }
    with pytest.raises(Exception, match="size mismatch|shape"):
        view.load_lora_into_unet(conv_in, network_alphas=None, unet=unet, adapter_name="conv_lora")
    np.testing.assert_array_equal(
        np.asarray(view(**args, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]), before
    )


def _file(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("fastpath", [FastPath(fuse_qkv=True), FastPath(compile=True)], ids=["fuse_qkv", "compile"])
@pytest.mark.heavy
def test_the_fast_path_keeps_the_image_prompt_and_the_plain_image(own_pipes, tiny_weights_dir, fastpath):
    """Fused q/k/v or compiled transformer blocks: an image prompt draws what it draws without them (up to rounding),
    and the plain request after it is the plain request before it, bit for bit (the fused processors come back)."""
    fast = load_pipelines(tiny_weights_dir, fastpath=fastpath)
    plain = dict(prompt=PROMPT, seed=SEED, width=64, height=64, num_inference_steps=3, apply_watermark=False)
    steered = dict(plain, ip_adapter_image=IMAGE_PROMPT, ip_adapter_scale=0.8)

    def draw(pipes, inputs):
        return np.asarray(generate(pipes, GenerationRequest(**inputs)).images[0]).astype(int)

    before = draw(fast, plain)
    assert np.abs(draw(fast, steered) - draw(own_pipes, steered)).max() <= 2
    np.testing.assert_array_equal(draw(fast, plain), before)
