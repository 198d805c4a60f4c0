"""LoRAs through the compiled UNet's fixed-shape slots (SDXL_COMPILE=1): the image of a normal peft load, the base
image back bit for bit afterwards, and no LoRA switch recompiles."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model.fastpath import PEFT, REFUSED, SLOTS, FastPath, warm_up
from sdxl.model.loading import load_pipelines
from sdxl.model.lora_slots import LoraSlots, SlotLinear
from sdxl.trained import weights_cache as wc
from sdxl.trained.lora_store import SlotLoras
from sdxl.trained.request import AdapterRequest, LoraInput, parse_loras
from sdxl.trained.trained_weights import TrainedWeights
from tools.testing import file_server
from tools.testing import trained as wh

SLOT_RANK = 8


def request(size: int = 64) -> GenerationRequest:
    return GenerationRequest(
        prompt="a photo", width=size, height=size, num_inference_steps=2, seed=7, apply_watermark=False
    )


def image(pipes, size: int = 64) -> np.ndarray:
    return np.asarray(generate(pipes, request(size)).images[0]).astype(int)


@pytest.fixture(scope="module")
def server():
    with file_server.loopback_file_server() as server:
        yield server


@pytest.fixture(scope="module")
def base_image(tiny_weights_dir):
    return image(load_pipelines(tiny_weights_dir))


@pytest.fixture(scope="module")
def slotted(tiny_weights_dir, tmp_path_factory):
    """Eager pipelines with slots installed as SDXL_COMPILE=1 installs them (the slot arithmetic, minus compile), and
    the slot LoRA store SDXL_COMPILE=1 picks, given to them by hand."""
    pipes = load_pipelines(tiny_weights_dir)
    pipes = replace(pipes, lora_slots=LoraSlots.install(pipes.text2img.unet, SLOT_RANK))
    cache = wc.WeightsCache(tmp_path_factory.mktemp("cache"))
    return pipes, TrainedWeights(pipes, cache, loras=SlotLoras(pipes.text2img, pipes.lora_slots))


def serve_lora(server, tmp_path, name: str, state: dict) -> str:
    return server.serve(f"/{name}.safetensors", wh.save_safetensors(tmp_path / f"{name}.safetensors", state))


def peft_reference(tiny_weights_dir, loras) -> np.ndarray:
    """The same LoRAs loaded by diffusers as peft adapters on a fresh model."""
    fresh = load_pipelines(tiny_weights_dir)
    names = []
    for i, (state, _) in enumerate(loras):
        fresh.text2img.load_lora_weights(dict(state), adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    fresh.text2img.set_adapters(names, [scale for _, scale in loras])
    return image(fresh)


def assert_slots_empty(pipes):
    slots = pipes.lora_slots
    assert not slots.active
    for layer in slots.layers.values():
        assert not layer.active and not layer.slot_down.any() and not layer.slot_up.any()


def lora_sets(unet, text_encoder, lpb):
    """name -> [(state, scale), ...]: peft with alpha != rank, kohya with text-encoder layers, two mixed ranks."""
    alpha = wh.lora_state(unet, seed=1, rank=4, alpha=8)
    kohya_source = {**wh.lora_state(unet, seed=2), **wh.te_lora_state(text_encoder, seed=3)}
    return {
        "peft_alpha": ([(alpha, 0.6)], [(alpha, 0.6)]),
        "kohya_with_text_encoder": ([(wh.to_kohya(kohya_source, lpb), 0.8)], [(kohya_source, 0.8)]),
        "two_loras": (
            [(wh.lora_state(unet, seed=4, rank=2), 0.7), (wh.lora_state(unet, seed=5, rank=6), -0.5)],
            [(wh.lora_state(unet, seed=4, rank=2), 0.7), (wh.lora_state(unet, seed=5, rank=6), -0.5)],
        ),
    }


@pytest.mark.parametrize("case", ["peft_alpha", "kohya_with_text_encoder", "two_loras"])
@pytest.mark.heavy
def test_slots_give_the_peft_image_then_the_base_bit_for_bit(
    case, slotted, server, tmp_path, tiny_weights_dir, base_image
):
    pipes, adapters = slotted
    pipe = pipes.text2img
    sent, same_in_diffusers_format = lora_sets(pipe.unet, pipe.text_encoder, pipe.unet.config.layers_per_block)[case]
    urls = [serve_lora(server, tmp_path, f"{case}{i}", state) for i, (state, _) in enumerate(sent)]
    loras = parse_loras(json.dumps([{"url": url, "scale": scale} for url, (_, scale) in zip(urls, sent)]))

    with adapters.applied(AdapterRequest(loras=loras)):
        got = image(pipes)
    reference = peft_reference(tiny_weights_dir, same_in_diffusers_format)

    assert np.abs(reference - base_image).max() > 5  # the LoRA visibly changes the image ...
    assert np.abs(got - reference).max() <= 1  # ... and the slots change it as peft does, to rounding
    assert np.array_equal(image(pipes), base_image)  # afterwards: the base model, bit for bit
    assert_slots_empty(pipes)
    assert not [n for n in pipe.get_list_adapters().get("unet", [])]  # the UNet never got a peft adapter


def test_rank_limits_name_the_field(slotted, server, tmp_path, base_image):
    pipes, adapters = slotted
    unet = pipes.text2img.unet
    too_big = serve_lora(server, tmp_path, "rank16", wh.lora_state(unet, seed=6, rank=16))
    with pytest.raises(InputError, match=r"loras\[0\]: .*rank 16 .*up to 8 \(SDXL_LORA_SLOT_RANK\)"):
        with adapters.applied(AdapterRequest(loras=(LoraInput(too_big),))):
            pass

    four, six = (serve_lora(server, tmp_path, f"r{r}", wh.lora_state(unet, seed=r, rank=r)) for r in (4, 6))
    with pytest.raises(InputError, match=r"loras\[1\]: together the request's LoRAs need rank 10 .*hold rank 8"):
        with adapters.applied(AdapterRequest(loras=(LoraInput(four), LoraInput(six)))):
            pass
    assert np.array_equal(image(pipes), base_image)
    assert_slots_empty(pipes)


def test_lora_outside_the_transformer_blocks_is_refused(slotted, server, tmp_path, base_image):
    """A LoCon-style LoRA on the resnets' convolutions has no slot: refused by name, not silently dropped."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    pipes, adapters = slotted
    unet = UNet2DConditionModel.from_config(pipes.text2img.unet.config)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "conv1"], init_lora_weights=False))
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    url = serve_lora(server, tmp_path, "locon", state)
    with pytest.raises(InputError, match=r"loras\[0\]: .*outside the transformer blocks \(e\.g\. .*conv1\)"):
        with adapters.applied(AdapterRequest(loras=(LoraInput(url),))):
            pass
    assert not adapters.cache.path_for("lora", url).exists()  # a LoRA that does not fit leaves nothing on disk
    assert np.array_equal(image(pipes), base_image)


def test_slot_layer_keeps_the_linear_interface():
    linear = torch.nn.Linear(6, 5)
    slot = SlotLinear(linear, rank=3)
    x = torch.randn(2, 6)
    assert torch.equal(slot(x), linear(x))  # empty and off: exactly the Linear
    assert slot.weight is linear.weight and slot.bias is linear.bias
    assert (slot.in_features, slot.out_features) == (6, 5)
    assert "slot_down" not in slot.state_dict() and "base_layer.weight" in slot.state_dict()


@pytest.mark.parametrize(
    "value, message", [("abc", "use a whole number"), ("-1", "allowed 0 to"), ("4096", "allowed 0 to")]
)
def test_bad_slot_rank_setting_is_named(monkeypatch, value, message):
    monkeypatch.setenv("SDXL_LORA_SLOT_RANK", value)
    with pytest.raises(ValueError, match=f"SDXL_LORA_SLOT_RANK.*{message}"):
        FastPath.from_env()


def test_slots_only_with_compile():
    assert FastPath(compile=True).lora_backend.kind == SLOTS
    assert FastPath().lora_backend.kind == PEFT  # eager: peft adapters cost nothing when no LoRA is active
    assert FastPath(compile=True, fuse_qkv=True).lora_backend.kind == REFUSED
    assert FastPath(compile=True, lora_slot_rank=0).lora_backend.kind == REFUSED


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.heavy  # 20-25 s: dynamo compiles the UNet
def test_compiled_lora_switches_never_recompile(tiny_weights_dir, server, tmp_path, slotted):
    """Compiled with slots: no LoRA, A, B, A+B, no LoRA again. dynamo compiles no new graph for any of them, the
    images equal the eager slots' images to rounding, and the last is the first bit for bit.

    The requests use the warm-up's size (the model's default, 128 px here): a new size may compile once whatever
    the LoRAs (on the tiny model the token count 64 equals a channel count, so dynamo pins it)."""
    torch._dynamo.reset()  # compiled code from other tests must not count, nor fill dynamo's variant limit
    compiled = load_pipelines(tiny_weights_dir, fastpath=FastPath(compile=True, lora_slot_rank=SLOT_RANK))
    warm_up(compiled)  # the setup step that follows loading
    eager, eager_adapters = slotted
    adapters = TrainedWeights(compiled, wc.WeightsCache(tmp_path / "cache"))
    assert isinstance(adapters.loras, SlotLoras)  # chosen from the fast-path settings
    unet = compiled.text2img.unet
    urls = [serve_lora(server, tmp_path, f"c{i}", wh.lora_state(unet, seed=40 + i, rank=4)) for i in range(2)]
    requests = [(), ((urls[0], 0.6),), ((urls[1], 1.0),), ((urls[0], 0.6), (urls[1], -0.4)), ()]
    size = unet.config.sample_size * compiled.text2img.vae_scale_factor

    graphs = unique_graphs()
    got, expected = [], []
    for loras in requests:
        adapter_request = AdapterRequest(loras=tuple(LoraInput(url, scale) for url, scale in loras))
        with adapters.applied(adapter_request):
            got.append(image(compiled, size))
        with eager_adapters.applied(adapter_request):
            expected.append(image(eager, size))
    assert unique_graphs() == graphs, "a LoRA switch made torch.compile build a new graph"
    for ours, eager_image in zip(got, expected):
        assert np.abs(ours - eager_image).max() <= 2
    assert np.abs(got[1] - got[0]).max() > 5  # the LoRAs do change the compiled model's image
    assert np.array_equal(got[-1], got[0])

    # The same counter sees the recompile a peft adapter causes in a compiled UNet without slots.
    torch._dynamo.reset()
    plain = load_pipelines(tiny_weights_dir, fastpath=FastPath(compile=True, lora_slot_rank=0))
    with pytest.raises(InputError, match=r"loras\[0\]: .*without LoRA slots"):
        with TrainedWeights(plain, wc.WeightsCache(tmp_path / "cache2")).applied(
            AdapterRequest(loras=((LoraInput(urls[0]),)))
        ):
            pass
    graphs = unique_graphs()
    state = wh.lora_state(unet, seed=40, rank=4)
    plain.text2img.load_lora_weights(state, adapter_name="direct")
    image(plain, size)
    assert unique_graphs() > graphs


def test_full_finetune_and_lora_together_through_slots(slotted, server, tmp_path, tiny_weights_dir, base_image):
    """A full fine-tune tar plus a LoRA in `loras`: the slot-wrapped layers take the fine-tune's weights under their
    usual names, the LoRA goes into the slots, and afterwards the base UNet is back bit for bit."""
    pipes, adapters = slotted
    fresh = load_pipelines(tiny_weights_dir)
    base_state = {k: v.clone() for k, v in fresh.text2img.unet.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base_state.items()}
    lora = wh.lora_state(fresh.text2img.unet, seed=9)
    url = server.serve("/full.tar", wh.trained_tar(tmp_path, unet=tuned))
    lora_url = serve_lora(server, tmp_path, "with_full", lora)

    with adapters.applied(AdapterRequest(url, loras=(LoraInput(lora_url, 0.5),))):
        got = image(pipes)
    fresh.text2img.unet.load_state_dict(tuned)
    fresh.text2img.load_lora_weights(dict(lora), adapter_name="ref")
    fresh.text2img.set_adapters(["ref"], [0.5])
    assert np.abs(got - image(fresh)).max() <= 1
    assert np.abs(got - base_image).max() > 5
    unet_state = {k.replace(".base_layer.", "."): v for k, v in pipes.text2img.unet.state_dict().items()}
    assert unet_state.keys() == base_state.keys()
    assert all(torch.equal(unet_state[k], base_state[k]) for k in base_state)
    assert np.array_equal(image(pipes), base_image)
    assert_slots_empty(pipes)
