"""Trained weights per request on the tiny model: images equal a direct diffusers load, and nothing stays behind."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.errors import InputError
from sdxl.guard import remote
from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model.loading import load_pipelines
from sdxl.model.random_weights.architectures import CLIP_VOCAB_SIZE, TINY
from sdxl.trained import weights_cache as wc
from sdxl.trained.request import AdapterRequest, LoraInput, parse_loras
from sdxl.trained.tokens import Applied
from sdxl.trained.trained_weights import TrainedWeights
from sdxl.trained.unet_swap import unet_tensors
from tools.testing import file_server
from tools.testing import trained as wh

TE1_WIDTH, TE2_WIDTH = TINY.te1["hidden_size"], TINY.te2["hidden_size"]

PROMPT = "a photo of TOK in tokyo"
WIDTHS = (TE1_WIDTH, TE2_WIDTH)


def request(**overrides) -> GenerationRequest:
    args = dict(prompt="a photo", width=64, height=64, num_inference_steps=2, seed=7, apply_watermark=False)
    return GenerationRequest(**{**args, **overrides})


def image(pipes, generation: GenerationRequest) -> np.ndarray:
    return np.asarray(generate(pipes, generation).images[0])


@pytest.fixture(scope="module")
def server():
    with file_server.loopback_file_server() as server:
        yield server


@pytest.fixture(scope="module")
def model(tiny_weights_dir):
    """This module's own pipelines: every test here must leave them as a fresh load."""
    return load_pipelines(tiny_weights_dir)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    return TrainedWeights(model, wc.WeightsCache(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def fresh(tiny_weights_dir):
    """A freshly loaded model, for references made with diffusers directly."""
    return load_pipelines(tiny_weights_dir)


@pytest.fixture(scope="module")
def base_images(tiny_weights_dir):
    """Images of a fresh base model, by prompt."""
    pipes = load_pipelines(tiny_weights_dir)
    return {prompt: image(pipes, request(prompt=prompt)) for prompt in ("a photo", PROMPT)}


@pytest.fixture(scope="module")
def trained(model, server, tmp_path_factory):
    """LoRA + tokens tar (the trainer's usual output), served on loopback."""
    folder = tmp_path_factory.mktemp("trained")
    # alpha = 2 x rank, stated in the file's header (LoraConfig metadata): the LoRA acts at twice its matrices' product
    lora, rows = wh.lora_state(model.text2img.unet, seed=1, alpha=8), wh.embeddings(WIDTHS, seed=1)
    tar = wh.trained_tar(folder, lora=lora, rows=rows, config=wh.lora_config(rank=4, alpha=8))
    url = server.serve("/trained.tar", tar)
    return dict(url=url, lora=folder / "lora.safetensors", rows=rows)


def reference(fresh, lora=None, scale=1.0, rows=None, prompt="a photo", loras=(), **fields):
    """The same call made with diffusers' own loaders on a fresh model."""
    pipe = fresh.text2img
    names, weights = [], []
    for i, (source, weight) in enumerate(([(lora, scale)] if lora else []) + list(loras)):
        source = dict(source) if isinstance(source, dict) else str(source)  # a file: diffusers reads its header too
        pipe.load_lora_weights(source, adapter_name=f"ref{i}", use_safetensors=True)
        names.append(f"ref{i}")
        weights.append(weight)
    if names:
        pipe.set_adapters(names, weights)
    if rows is not None:
        tokens = [f"<s{i}>" for i in range(rows["text_encoders_0"].shape[0])]
        pipe.load_textual_inversion(
            rows["text_encoders_0"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            rows["text_encoders_1"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    return image(fresh, request(prompt=prompt, **fields))


def assert_clean(model, fresh_unet_state=None):
    """Structurally a base model: no active adapter layers, no added tokens, the base embedding tables."""
    pipe = model.text2img
    for encoder, tokenizer, width in (
        (pipe.text_encoder, pipe.tokenizer, TE1_WIDTH),
        (pipe.text_encoder_2, pipe.tokenizer_2, TE2_WIDTH),
    ):
        assert len(tokenizer) == CLIP_VOCAB_SIZE
        assert tuple(encoder.get_input_embeddings().weight.shape) == (CLIP_VOCAB_SIZE, width)
        assert encoder.config.vocab_size == CLIP_VOCAB_SIZE
        assert not [t for t in tokenizer.get_vocab() if t.startswith("<s")]
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                assert layer.disable_adapters, "an adapter layer is still enabled"
    if fresh_unet_state is not None:
        state = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
        assert state.keys() == fresh_unet_state.keys()
        assert all(torch.equal(state[k], fresh_unet_state[k]) for k in state)


# -- the prompt rewriter and the inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a photo of TOK", "a photo of <a><b>"),
        ("TOK, TOK's hat (TOK)", "<a><b>, <a><b>'s hat (<a><b>)"),
        ("TOKyo and tokyo and myTOK and TOK_2 and TOK2", "TOKyo and tokyo and myTOK and TOK_2 and TOK2"),
        ("literal <s0> and <s1>", "literal <a> and <b>"),
        ("", ""),
    ],
)
def test_rewrite_whole_words(text, expected):
    applied = Applied({"TOK": "<a><b>", "<s0>": "<a>", "<s1>": "<b>"})
    assert applied.rewrite_text(text) == expected
    rewritten = applied.rewrite(request(prompt=text, negative_prompt=f"not {text}"))
    assert (rewritten.prompt, rewritten.negative_prompt) == (expected, f"not {expected}" if text else "not ")


@pytest.mark.parametrize(
    "text, field, message",
    [
        ("{", "loras", "not valid JSON"),
        ('{"url": "https://x"}', "loras", "must be a JSON list"),
        ('[{"url": 3}]', "loras[0]", "must be an object"),
        ('[{"url": "https://x", "weight": 1}]', "loras[0]", "must be an object"),
        ('[{"url": "https://x", "scale": "big"}]', "loras[0].scale", "not a finite number"),
        ('[{"url": "https://x", "scale": 9}]', "loras[0].scale", "out of range"),
        ('[{"url": "https://x"}, {"url": "https://x"}]', "loras", "twice"),
        (json.dumps([{"url": f"https://x/{i}"} for i in range(5)]), "loras", "at most 4"),
        ("[" * 100_000 + "]" * 100_000, "loras", "at most 16,384 are accepted"),  # refused before parsing
        ("[" * 8_000 + "]" * 8_000, "loras", "nested too deeply"),
    ],
)
def test_parse_loras_errors(text, field, message):
    with pytest.raises(InputError, match=message) as error:
        parse_loras(text)
    assert error.value.field == field


def test_parse_loras():
    assert parse_loras(None) == parse_loras("") == ()
    assert parse_loras('[{"url": "https://a/x.safetensors", "scale": 0.5}, {"url": "https://b/y"}]') == (
        LoraInput("https://a/x.safetensors", 0.5),
        LoraInput("https://b/y", 1.0),
    )


@pytest.mark.parametrize("scale", [-0.1, 1.5, float("nan"), "0.5", True])
def test_lora_scale_range(scale):
    with pytest.raises(InputError, match="lora_scale"):
        AdapterRequest(lora_scale=scale)
    assert AdapterRequest(replicate_weights="").replicate_weights is None


# -- trained weights on the model ------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_lora_tar_equals_diffusers_and_leaves_nothing(adapters, model, trained, fresh, base_images, server):
    with adapters.applied(AdapterRequest(trained["url"], lora_scale=0.5)) as applied:
        rewritten = applied.rewrite(request(prompt=PROMPT))
        tag = wc.url_key(trained["url"])[:12]
        assert rewritten.prompt == f"a photo of <s0-{tag}><s1-{tag}> in tokyo"
        got = image(model, rewritten)
    expected = reference(
        fresh, lora=trained["lora"], scale=0.5, rows=trained["rows"], prompt="a photo of <s0><s1> in tokyo"
    )
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, base_images[PROMPT])
    assert_clean(model)
    assert np.array_equal(image(model, request(prompt=PROMPT)), base_images[PROMPT])


@pytest.mark.heavy
def test_trained_weights_apply_to_a_controlnet_request(adapters, model, trained, fresh):
    """The ControlNet views share the base's UNet and text encoders: a trained tar's LoRA and tokens steer them as
    diffusers' own loaders do."""
    control_map = Image.new("RGB", (64, 64))
    control_map.paste((255, 255, 255), (0, 0, 32, 64))
    control = dict(controlnet="canny", control_image=control_map, control_preprocess=False)
    with adapters.applied(AdapterRequest(trained["url"], lora_scale=0.5)) as applied:
        got = image(model, applied.rewrite(request(prompt=PROMPT, **control)))
    without = image(model, request(prompt=PROMPT, **control))
    expected = reference(
        fresh, lora=trained["lora"], scale=0.5, rows=trained["rows"], prompt="a photo of <s0><s1> in tokyo", **control
    )
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, without)
    assert_clean(model)


@pytest.mark.heavy
def test_again_scale_zero_no_download_no_reload(adapters, model, trained, base_images, server, monkeypatch):
    """lora_scale 0 gives the base image; the same URL again makes no HTTP request and reads no file."""
    with adapters.applied(AdapterRequest(trained["url"])):  # cached and resident (maybe already)
        pass
    requests_before = server.requests["/trained.tar"]
    loads = []
    real = model.text2img.load_lora_into_unet
    monkeypatch.setattr(model.text2img, "load_lora_into_unet", lambda *a, **k: loads.append(a) or real(*a, **k))
    with adapters.applied(AdapterRequest(trained["url"], lora_scale=0.0)) as applied:
        got = image(model, applied.rewrite(request(prompt="a photo")))
    assert np.array_equal(got, base_images["a photo"])
    assert server.requests["/trained.tar"] == requests_before == 1
    assert loads == []
    assert_clean(model)


@pytest.mark.heavy
def test_switching_back_uses_the_resident_adapter(adapters, model, server, tmp_path, monkeypatch, caplog):
    urls = [
        server.serve(f"/switch{i}.tar", wh.trained_tar(tmp_path, lora=wh.lora_state(model.text2img.unet, seed=10 + i)))
        for i in range(2)
    ]
    loads = []
    real = model.text2img.load_lora_into_unet
    monkeypatch.setattr(
        model.text2img, "load_lora_into_unet", lambda *a, **k: loads.append(k["adapter_name"]) or real(*a, **k)
    )
    images = []
    for url in (urls[0], urls[1], urls[0]):
        with adapters.applied(AdapterRequest(url, lora_scale=1.0)) as applied:
            images.append(image(model, applied.rewrite(request())))
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    assert len(loads) == 2 and server.requests["/switch0.tar"] == 1
    assert caplog.text.count("LoRA switch to") == 3
    assert_clean(model)


@pytest.mark.heavy
def test_two_loras_equal_set_adapters(adapters, model, server, fresh, tmp_path):
    states = [wh.lora_state(model.text2img.unet, seed=20 + i, rank=2 + 2 * i) for i in range(2)]
    urls = [
        server.serve(f"/style{i}.safetensors", wh.save_safetensors(tmp_path / f"{i}.safetensors", s))
        for i, s in enumerate(states)
    ]
    loras = parse_loras(json.dumps([{"url": urls[0], "scale": 0.7}, {"url": urls[1], "scale": 0.4}]))
    with adapters.applied(AdapterRequest(loras=loras)) as applied:
        got = image(model, applied.rewrite(request()))
    assert np.array_equal(got, reference(fresh, loras=[(states[0], 0.7), (states[1], 0.4)]))
    assert_clean(model)


def test_kohya_lora_with_text_encoder_layers(adapters, model, server, fresh, tmp_path, base_images):
    """A kohya-format SDXL LoRA (sgm block names, lora_down/up, alphas, `lora_te1_text_model_*`) gives the image
    of the same LoRA loaded by diffusers in its own format, text-encoder layers included."""
    unet = wh.lora_state(model.text2img.unet, seed=30)
    te = wh.te_lora_state(model.text2img.text_encoder, seed=31)
    kohya = wh.to_kohya({**unet, **te}, lpb=model.text2img.unet.config.layers_per_block)
    assert all(
        k.startswith(
            ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "lora_te1_text_model_")
        )
        for k in kohya
    )
    url = server.serve("/kohya.safetensors", wh.save_safetensors(tmp_path / "k.safetensors", kohya))
    with adapters.applied(AdapterRequest(loras=(LoraInput(url, 0.8),))) as applied:
        got = image(model, applied.rewrite(request()))
        name = "lora_" + wc.url_key(url)
        landed = dict(model.text2img.text_encoder.named_parameters())
        for key in ("q_proj.lora_A", "out_proj.lora_B"):  # the text-encoder layers carry the file's values
            source = te[f"text_encoder.text_model.encoder.layers.1.self_attn.{key}.weight"]
            assert torch.equal(landed[f"encoder.layers.1.self_attn.{key}.{name}.weight"], source)
    assert np.array_equal(got, reference(fresh, loras=[({**unet, **te}, 0.8)]))
    assert_clean(model)


@pytest.mark.heavy
def test_full_unet_tar_applied_then_restored(adapters, model, server, fresh, tmp_path, base_images):
    base_state = {k: v.clone() for k, v in fresh.text2img.unet.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base_state.items()}
    url = server.serve("/full.tar", wh.trained_tar(tmp_path, unet=tuned, rows=wh.embeddings(WIDTHS, seed=4)))
    with adapters.applied(AdapterRequest(url)) as applied:
        got = image(model, applied.rewrite(request()))
    fresh.text2img.unet.load_state_dict(tuned)
    assert np.array_equal(got, image(fresh, request()))
    assert not np.array_equal(got, base_images["a photo"])
    assert_clean(model, base_state)
    assert np.array_equal(image(model, request()), base_images["a photo"])


@pytest.mark.heavy
def test_a_full_unet_tar_is_refused_on_the_inpainting_unet_and_stays_cached(adapters, model, server, tmp_path):
    """A full fine-tune replaces the base UNet's weights; the inpainting UNet has its own: refused naming
    replicate_weights, nothing applied, and the sound tar stays cached for base requests (no second fetch)."""
    url = server.serve("/full-inpainting.tar", wh.trained_tar(tmp_path, unet=unet_tensors(model.text2img.unet)))
    with pytest.raises(InputError, match="full fine-tune of the base UNet.*inpaint_model 'base'") as refused:
        with adapters.applied(AdapterRequest(url), inpainting=True):
            pass
    assert refused.value.field == "replicate_weights"
    assert_clean(model)
    fetched = server.requests["/full-inpainting.tar"]
    with adapters.applied(AdapterRequest(url)):
        pass
    assert server.requests["/full-inpainting.tar"] == fetched


def wrong(model, base_state):
    """Trained tars that do not fit this model, and the error each must give."""
    unet = model.text2img.unet
    lora = wh.lora_state(unet, seed=40)
    wide = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in lora.items()}
    partial = {
        **lora,
        "unet.no_such_block.to_q.lora_A.weight": torch.ones(4, 8),
        "unet.no_such_block.to_q.lora_B.weight": torch.ones(8, 4),
    }
    return [
        ("lora shapes", dict(lora=wide), "does not fit this SDXL model"),
        ("lora keys", dict(lora=partial), "only .* of the LoRA's .* weights match"),
        (
            "embedding width",
            dict(lora=lora, rows=wh.embeddings((TE1_WIDTH + 1, TE2_WIDTH))),
            r"text_encoders_0 has shape \(2, 33\)",
        ),
        (
            "embedding rows",
            dict(
                lora=lora,
                rows={"text_encoders_0": torch.ones(2, TE1_WIDTH), "text_encoders_1": torch.ones(3, TE2_WIDTH)},
            ),
            "text_encoders_1 has shape",
        ),
        (
            "token map",
            dict(lora=lora, rows=wh.embeddings(WIDTHS), token_map={"TOK": "<s0><s5>"}),
            "must be made of tokens",
        ),
        ("unet keys", dict(unet={"conv_in.weight": torch.ones(1)}), "does not match this SDXL UNet"),
        (
            "unet shapes",
            dict(unet={k: torch.ones(2, 2) if k == "conv_in.weight" else v for k, v in base_state.items()}),
            "wrong shape, e.g. conv_in.weight",
        ),
    ]


@pytest.mark.heavy
def test_weights_that_do_not_fit(adapters, model, server, tmp_path, base_images, fresh):
    base_state = {k: v.clone() for k, v in fresh.text2img.unet.state_dict().items()}
    adapters_before = model.text2img.get_list_adapters()
    for name, parts, message in wrong(model, base_state):
        url = server.serve(f"/wrong-{name.replace(' ', '-')}.tar", wh.trained_tar(tmp_path, **parts))
        with pytest.raises(InputError, match=message) as error:
            with adapters.applied(AdapterRequest(url, lora_scale=1.0)):
                raise AssertionError("not reached")
        assert error.value.field == "replicate_weights", name
        assert not adapters.cache.path_for("trained", url).exists(), name
        assert model.text2img.get_list_adapters() == adapters_before, name
        assert_clean(model, base_state)
    assert not list(adapters.cache.root.glob(".tmp-*"))
    assert np.array_equal(image(model, request()), base_images["a photo"])


class Cancelled(BaseException):
    """What a cancel looks like inside a request: not an Exception."""


@pytest.mark.heavy
def test_cancel_mid_load_leaves_the_model_clean(adapters, model, server, tmp_path, monkeypatch, base_images, fresh):
    base_state = {k: v.clone() for k, v in fresh.text2img.unet.state_dict().items()}
    lora_state = wh.lora_state(model.text2img.unet, seed=50)
    rows = wh.embeddings(WIDTHS, seed=50)
    url = server.serve("/cancel.tar", wh.trained_tar(tmp_path, lora=lora_state, rows=rows))
    pipe = model.text2img
    real_lora, real_ti = pipe.load_lora_into_unet, pipe.load_textual_inversion

    def lora_then_cancel(*args, **kwargs):
        real_lora(*args, **kwargs)  # the adapter is in the model, but the load has not returned
        raise Cancelled()

    calls = []

    def ti_cancel_on_second_encoder(*args, **kwargs):
        calls.append(kwargs["text_encoder"])
        real_ti(*args, **kwargs)
        if len(calls) == 2:
            raise Cancelled()

    for patch in (("load_lora_into_unet", lora_then_cancel), ("load_textual_inversion", ti_cancel_on_second_encoder)):
        with monkeypatch.context() as m:
            m.setattr(pipe, *patch)
            with pytest.raises(Cancelled):
                with adapters.applied(AdapterRequest(url, lora_scale=0.5)):
                    raise AssertionError("not reached")
        assert "trained_" + wc.url_key(url) not in adapters.loras.resident
        assert_clean(model, base_state)

    # a cancel in the middle of swapping UNet weights
    tuned = {k: v + 1 for k, v in base_state.items()}
    full = server.serve("/cancel-full.tar", wh.trained_tar(tmp_path, unet=tuned))
    real_copy = adapters.unet.copy_into

    def copy_then_cancel(path):
        real_copy(path)
        raise Cancelled()

    with monkeypatch.context() as m:
        m.setattr(adapters.unet, "copy_into", copy_then_cancel)
        with pytest.raises(Cancelled):
            with adapters.applied(AdapterRequest(full)):
                pass
    assert_clean(model, base_state)

    # the next request loads what it needs, completely
    with adapters.applied(AdapterRequest(url, lora_scale=0.5)) as applied:
        got = image(model, applied.rewrite(request(prompt="TOK")))
    assert np.array_equal(got, reference(fresh, lora=lora_state, scale=0.5, rows=rows, prompt="<s0><s1>"))
    assert_clean(model)


@pytest.mark.heavy
def test_own_weights_from_setup(tiny_weights_dir, trained, server, tmp_path, fresh, base_images):
    """COG_WEIGHTS: a trained tar becomes the model's own; requests use it unless they bring replicate_weights."""
    own = load_pipelines(tiny_weights_dir)
    archive = tmp_path / "trained_model.tar"
    archive.write_bytes(server.files["/trained.tar"])
    adapters = TrainedWeights(own, wc.WeightsCache(tmp_path / "cache"))
    adapters.load_own_weights(str(archive))
    with adapters.applied(AdapterRequest(lora_scale=0.5)) as applied:
        rewritten = applied.rewrite(request(prompt=PROMPT))
        assert rewritten.prompt == "a photo of <s0-own><s1-own> in tokyo"
        got = image(own, rewritten)
    expected = reference(
        fresh, lora=trained["lora"], scale=0.5, rows=trained["rows"], prompt="a photo of <s0><s1> in tokyo"
    )
    assert np.array_equal(got, expected)
    # a request's own replicate_weights take the place of the model's LoRA and word (own tokens stay loaded)
    other = server.serve("/other.tar", wh.trained_tar(tmp_path, lora=wh.lora_state(own.text2img.unet, seed=60)))
    with adapters.applied(AdapterRequest(other, lora_scale=0.0)) as applied:
        assert np.array_equal(image(own, applied.rewrite(request())), base_images["a photo"])
    assert adapters.cache.path_for("trained", other).exists()


def test_requests_are_refused_before_any_download(adapters, server):
    for url, message in [
        ("file:///etc/passwd", "scheme file:"),
        ("https://10.0.0.1/t.tar", "private"),
        ("ftp://x/t.tar", "scheme ftp:"),
    ]:
        with pytest.raises(InputError, match=message) as error:
            with adapters.applied(AdapterRequest(url)):
                pass
        assert error.value.field == "replicate_weights"
    with pytest.raises(InputError, match="HTTP 404") as error:
        with adapters.applied(AdapterRequest(loras=(LoraInput(server.url("/nope.safetensors")),))):
            pass
    assert error.value.field == "loras[0]"
    assert not list(adapters.cache.root.glob(".tmp-*"))


def test_module_has_no_cog_import():
    import ast
    import importlib
    import inspect
    import pkgutil

    import sdxl.trained

    trained = [importlib.import_module(f"sdxl.trained.{m.name}") for m in pkgutil.iter_modules(sdxl.trained.__path__)]
    assert len(trained) >= 7  # every module of the package is read
    for module in (*trained, sdxl.trained, wc, remote):
        tree = ast.parse(inspect.getsource(module))
        names = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "cog" not in names | modules


def test_own_full_finetune_from_a_url(tiny_weights_dir, server, tmp_path):
    """COG_WEIGHTS as a URL: fetched through the cache; a full fine-tune becomes the base, its tokens stay."""
    own = load_pipelines(tiny_weights_dir)
    tuned = {k: v + 0.5 for k, v in own.text2img.unet.state_dict().items()}
    url = server.serve(
        "/own-full.tar", wh.trained_tar(tmp_path, unet=tuned, rows=wh.embeddings(WIDTHS), token_map={"sks": "<s1><s0>"})
    )
    adapters = TrainedWeights(own, wc.WeightsCache(tmp_path / "cache"))
    adapters.load_own_weights(url)
    state = own.text2img.unet.state_dict()
    assert all(torch.equal(state[k], tuned[k]) for k in tuned)
    with adapters.applied(AdapterRequest()) as applied:
        assert applied.rewrite_text("an sks dog") == "an <s1-own><s0-own> dog"
    assert "<s0-own>" in own.text2img.tokenizer.get_vocab() and "<s1-own>" in own.text2img.tokenizer_2.get_vocab()


def test_urls_whose_digests_share_a_prefix_get_their_own_adapters(
    adapters, model, server, fresh, tmp_path, monkeypatch
):
    """Resident adapters are reused by name. Two URLs whose digests agree in their first 48 bits (forced here; 2^24
    URLs give even odds of such a pair) each get their own LoRA, never the other's already resident one."""
    real_key = wc.url_key
    monkeypatch.setattr(wc, "url_key", lambda url: "0" * 12 + real_key(url)[12:])
    states = [wh.lora_state(model.text2img.unet, seed=40 + i) for i in range(2)]
    urls = [
        server.serve(f"/prefix{i}.safetensors", wh.save_safetensors(tmp_path / f"p{i}.safetensors", s))
        for i, s in enumerate(states)
    ]
    got = []
    for url in urls:
        with adapters.applied(AdapterRequest(loras=(LoraInput(url, 0.9),))) as applied:
            got.append(image(model, applied.rewrite(request())))
    assert not np.array_equal(got[0], got[1])
    assert np.array_equal(got[1], reference(fresh, loras=[(states[1], 0.9)]))  # the second URL's own LoRA
    trained = [name for name in adapters.loras.resident if name.startswith("lora_000000000000")]
    assert len(trained) == 2 and all(len(name) == len("lora_") + 64 for name in trained), trained
    assert_clean(model)


def test_a_rewrite_past_the_prompt_cap_is_refused_before_it_is_logged(caplog):
    """A short word that stands for a long token string, repeated: the rewritten prompt is checked before anything
    logs it (one log line of 5.4 MB was written), and a rewrite that fits is logged cut short."""
    applied = Applied({"a": "<s0-0123456789ab>" * 15})
    with caplog.at_level("INFO", logger="sdxl.trained.tokens"):
        with pytest.raises(InputError) as refused:
            applied.rewrite(request(prompt="a " * 4_000))
        assert str(refused.value).startswith("prompt: is 1,024,000 characters long once its trained words")
        assert caplog.text == ""
        applied.rewrite(request(prompt="a " * 30))
    assert max(len(record.getMessage()) for record in caplog.records) < 600
    assert "(7,680 characters)" in caplog.text
