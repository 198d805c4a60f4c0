"""prompt_weighting on the tiny model: plain prompts encode exactly as diffusers does, weights move the embeddings as
compel defines, long prompts reach the encoders in full, bad syntax is refused naming the field."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl.errors import InputError
from sdxl.guard import remote
from sdxl.inference.generation import generate
from sdxl.inputs import prompt_weighting as pw
from sdxl.inputs.request import GenerationRequest
from sdxl.model.random_weights.architectures import TINY
from sdxl.trained import weights_cache as wc
from sdxl.trained.request import AdapterRequest
from sdxl.trained.trained_weights import TrainedWeights
from tools.testing import file_server
from tools.testing import trained as wh

PROMPT = "a watercolor fox in the snow"
SMALL = dict(width=64, height=64, num_inference_steps=4, seed=11, apply_watermark=False)
WORDS = "fox snow river tree house cloud stone bird moon lake road field".split()


def long_prompt(tokenizer, tokens: int, tail: str) -> str:
    """Distinct one-token words up to `tokens` tokens, the last 20 of them being `tail` repeated."""
    head = " ".join(WORDS[i % len(WORDS)] for i in range(tokens - 20))
    text = f"{head} {' '.join([tail] * 20)}"
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == tokens
    return text


def embeds_of(pipe, prompt: str, negative: str) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(
            pipe.encode_prompt(prompt, negative_prompt=negative, device="cpu", do_classifier_free_guidance=True)
        )


def ours(embeds: pw.PromptEmbeds) -> list[torch.Tensor]:
    """In the order diffusers' encode_prompt returns them."""
    return [
        embeds.prompt_embeds,
        embeds.negative_prompt_embeds,
        embeds.pooled_prompt_embeds,
        embeds.negative_pooled_prompt_embeds,
    ]


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_plain_prompt_within_77_tokens_encodes_exactly_as_diffusers(pipes, negative):
    """Tolerance: none. On CPU in fp32 every tensor (both encoders' states, pooled, negatives) is bit for bit the
    same, base and refiner; so are the images (test below)."""
    with torch.inference_mode():
        base = pw.encode_base(pipes.text2img, PROMPT, negative)
        refiner = pw.encode_refiner(pipes.refiner, pipes.text2img, base, PROMPT, negative)
        refiner_own = pw.encode((pipes.refiner.tokenizer_2,), (pipes.refiner.text_encoder_2,), PROMPT, negative)
    for expected, got in zip(embeds_of(pipes.text2img, PROMPT, negative), ours(base)):
        assert torch.equal(expected, got)
    for expected, got, own in zip(embeds_of(pipes.refiner, PROMPT, negative), ours(refiner), ours(refiner_own)):
        assert torch.equal(expected, got) and torch.equal(expected, own)
    assert base.prompt_embeds.shape == (1, 77, TINY.te1["hidden_size"] + TINY.te2["hidden_size"])


def _embeds(pipes, prompt: str) -> torch.Tensor:
    with torch.inference_mode():
        return pw.encode_base(pipes.text2img, prompt, "").prompt_embeds[0]


@pytest.mark.parametrize("syntax, weight", [("(red)1.5", 1.5), ("red++", 1.21), ("(red)3", 3.0)])
def test_an_up_weighted_word_scales_its_tokens_away_from_the_empty_prompt(pipes, syntax, weight):
    """compel's weight > 1: token = empty + weight x (token - empty), on the weighted word's tokens only."""
    weighted, plain, empty = _embeds(pipes, f"a {syntax} cat"), _embeds(pipes, "a red cat"), _embeds(pipes, "")
    red = 2  # <start> a red cat <end>
    torch.testing.assert_close(weighted[red] - empty[red], weight * (plain[red] - empty[red]), rtol=1e-5, atol=1e-6)
    others = [i for i in range(77) if i != red]
    assert torch.equal(weighted[others], plain[others])


def test_a_down_weighted_word_fades_towards_the_prompt_without_it(pipes):
    """compel's weight < 1: a blend of the prompt with the word and with the word masked out (weight 0: gone), so
    the embeddings move further from the plain prompt's as the weight falls."""
    plain = _embeds(pipes, "a red cat")
    distances = [(_embeds(pipes, f"a (red){w} cat") - plain).norm().item() for w in (1.0, 0.9, 0.5, 0.1)]
    assert distances[0] == 0 and distances == sorted(distances) and distances[1] > 0


def test_a_200_token_prompt_reaches_the_encoders_and_its_tail_changes_the_image(pipes):
    tokenizer = pipes.text2img.tokenizer_2
    fox_tail, cat_tail = long_prompt(tokenizer, 200, "fox"), long_prompt(tokenizer, 200, "cat")
    with torch.inference_mode():
        embeds = pw.encode_base(pipes.text2img, fox_tail, "")
    assert embeds.prompt_embeds.shape[1] == 3 * 77  # 200 tokens in chunks of 75, each with start and end
    assert embeds.negative_prompt_embeds.shape == embeds.prompt_embeds.shape  # "" padded with empty chunks

    def image(prompt: str, weighting: bool) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, prompt_weighting=weighting, **SMALL)
        return np.asarray(generate(pipes, request).images[0])

    np.testing.assert_array_equal(image(fox_tail, False), image(cat_tail, False))  # truncated: the tail is lost
    assert np.abs(image(fox_tail, True).astype(int) - image(cat_tail, True)).max() > 0


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, 32:] = 255
    return Image.fromarray(pixels)


MODES = [
    dict(refine="no_refiner", num_outputs=2),
    dict(refine="expert_ensemble_refiner", high_noise_frac=0.5, num_outputs=2),
    dict(refine="base_image_refiner", image="image"),
    dict(refine="expert_ensemble_refiner", high_noise_frac=0.5, image="image", mask="mask", num_outputs=2),
    dict(refine="base_image_refiner", image="image", mask="mask"),
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.heavy
def test_every_mode_plain_prompt_same_images_weighted_prompt_other_images(pipes, init_image, mask, mode):
    files = {"image": init_image, "mask": mask}
    args = {**SMALL, **{k: files.get(v, v) if k in files else v for k, v in mode.items()}, "negative_prompt": "blurry"}

    def images(prompt: str, weighting: bool) -> list[np.ndarray]:
        request = GenerationRequest(prompt=prompt, prompt_weighting=weighting, **args)
        return [np.asarray(image) for image in generate(pipes, request).images]

    plain_off, plain_on = images(PROMPT, False), images(PROMPT, True)
    assert len(plain_on) == args.get("num_outputs", 1)
    # Bit for bit, except where the refiner makes several outputs: without prompt_weighting diffusers encodes the
    # refiner's num_outputs copies of the prompt as one batch, which rounds the last float bits differently from one
    # prompt encoded once and repeated. Measured: at most 1 level of 255 in a few pixels.
    tolerance = 1 if mode["refine"] != "no_refiner" and args.get("num_outputs", 1) > 1 else 0
    for off, on in zip(plain_off, plain_on):
        np.testing.assert_allclose(off, on, atol=tolerance, rtol=0)
    weighted = images("a watercolor (fox)1.8 in the snow--", True)
    assert all(np.abs(w.astype(int) - p).max() > 0 for w, p in zip(weighted, plain_on))


@pytest.mark.parametrize(
    "field, text, message",
    [
        ("prompt", "a (fox:1.2) in the snow", "A1111 syntax"),
        ("prompt", "a (fox in the snow", "never closed"),
        ("negative_prompt", "blurry)", "closes nothing"),
        ("prompt", "a (fox)9 in the snow", "out of range; allowed: 0 to 5"),
        ("prompt", '("a fox", "a cat").blend(1, 9)', ".blend() weight 9 is out of range"),
        ("prompt", "a fox.swap(cat) in the snow", ".swap()"),
        ("prompt", "(" * 11 + "fox" + ")" * 11, "nest more than 10 deep"),
        ("negative_prompt", "fox " * 751, "3004 characters is too long; with prompt_weighting at most 3000"),
        ("prompt", "a " * 601, "601 words is too long; with prompt_weighting at most 600 tokens are read"),
    ],
)
def test_bad_weighting_is_refused_naming_the_field(field, text, message):
    with pytest.raises(InputError) as error:
        GenerationRequest(**{field: text}, prompt_weighting=True)
    assert error.value.field == field and message in str(error.value) and str(error.value).startswith(f"{field}: ")
    GenerationRequest(**{field: text})  # without prompt_weighting it is plain text, as for the hosted model


def test_each_text_is_parsed_once_and_an_oversized_one_never(monkeypatch):
    """A request's texts are parsed once (checked, swapped, encoded: three reads), and a text past MAX_CHARS is
    refused before the parser sees it."""
    from sdxl.inputs import prompt_syntax

    calls = []
    parse = prompt_syntax.parse_conjunction
    monkeypatch.setattr(prompt_syntax, "parse_conjunction", lambda text, *a: calls.append(text) or parse(text, *a))
    pw.clear_parse_cache()
    text = "a (fox)1.2 in the snow, " * 20
    for _ in range(3):
        pw.parse(text, "prompt")
    with pytest.raises(InputError):
        pw.parse("x" * (pw.MAX_CHARS + 1), "prompt")
    assert calls == [text]


def test_escaped_parentheses_are_literal():
    conjunction = pw.parse("a fox \\(a cub\\)", "prompt")
    assert pw.plain_text(conjunction) == "a fox (a cub)"


def test_prompts_past_the_token_bound_are_refused_before_encoding(pipes, monkeypatch):
    calls = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipes.text2img, name)
        monkeypatch.setattr(encoder, "forward", lambda *a, _f=encoder.forward, **k: calls.append(1) or _f(*a, **k))
    fox_commas = ", ".join(["fox"] * 301)  # 301 words (within MAX_WORDS), 601 tokens
    request = GenerationRequest(prompt=fox_commas, prompt_weighting=True, **SMALL)
    with pytest.raises(InputError, match="prompt: 601 tokens is too long; with prompt_weighting at most 600"):
        generate(pipes, request)
    assert calls == []  # no encoder ran
    generate(pipes, replace(request, prompt="fox " * 600))  # at the bound: encoded (8 chunks)
    assert calls


@pytest.fixture(scope="module")
def tokens_server():
    with file_server.loopback_file_server() as server:
        yield server


def test_trained_tokens_are_swapped_first_then_weighted(tiny_weights_dir, tokens_server, tmp_path, monkeypatch):
    """A trained tar (UNet LoRA + tokens): TOK becomes its two rows (whole word), compel reads them as tokens and weights
    them; unweighted, the embeddings equal diffusers' encode_prompt over the same swapped prompt."""
    from sdxl.model.loading import load_pipelines

    monkeypatch.setenv(remote.ALLOW_LOOPBACK_ENV, "1")
    model = load_pipelines(tiny_weights_dir)
    rows = wh.embeddings((TINY.te1["hidden_size"], TINY.te2["hidden_size"]), seed=3)
    lora = wh.lora_state(model.text2img.unet, seed=1)
    tar = wh.trained_tar(tmp_path, lora=lora, rows=rows, config=wh.lora_config(rank=4))
    url = tokens_server.serve("/trained.tar", tar)
    adapters = TrainedWeights(model, wc.WeightsCache(tmp_path / "cache"))
    request = GenerationRequest(prompt="a photo of TOK in tokyo", prompt_weighting=True, **SMALL)
    with adapters.applied(AdapterRequest(replicate_weights=url)) as applied, torch.inference_mode():
        swapped = applied.rewrite(request)
        assert "tokyo" in swapped.prompt and "TOK " not in swapped.prompt
        assert torch.equal(
            pw.encode_base(model.text2img, swapped.prompt, "").prompt_embeds,
            embeds_of(model.text2img, swapped.prompt, "")[0],
        )
        weighted = applied.rewrite(GenerationRequest(prompt="a photo of (TOK)1.5 in tokyo", prompt_weighting=True))
        plain = pw.encode_base(model.text2img, swapped.prompt, "").prompt_embeds[0]
        scaled = pw.encode_base(model.text2img, weighted.prompt, "").prompt_embeds[0]
        empty = pw.encode_base(model.text2img, "", "").prompt_embeds[0]
        ids = model.text2img.tokenizer(swapped.prompt).input_ids
        token_positions = [i for i, token in enumerate(ids) if token >= len(model.text2img.tokenizer) - 2]
    assert len(token_positions) == 2  # <s0-...><s1-...>, one row each
    for i in token_positions:
        torch.testing.assert_close(scaled[i] - empty[i], 1.5 * (plain[i] - empty[i]), rtol=1e-5, atol=1e-6)


def test_parse_cost_is_linear_in_length_at_the_caps():
    """compel's grammar re-read each parenthesised group once per alternative: x4 a nesting level (depth 8: 63 s);
    memoised, 0.4-3 s at 3,000 characters. Our reader (sdxl/inputs/prompt_syntax.py): under 15 ms here for every shape
    found, the slowest a run of 1,500 fragments fused under a backslash run (compel's fusion is quadratic)."""
    deepest = "(" * pw.MAX_NESTING + "fox" + ")1.1" * pw.MAX_NESTING
    nested, quoted = "(" * pw.MAX_NESTING + "a" + ")" * pw.MAX_NESTING + " ", '"(((((a)))))" '
    unread = "(" * pw.MAX_NESTING + "a -" + ")" * pw.MAX_NESTING + " "  # groups compel reads as plain text

    def filled(unit: str) -> str:  # whole units up to the character cap
        return unit * (pw.MAX_CHARS // len(unit))

    shapes = {
        "deepest": deepest,
        "plain words": filled("abcd "),
        "nested groups": filled(nested),
        "quoted groups": filled(quoted),
        "weighted nested groups": filled("(" * pw.MAX_NESTING + "a" + ")1.1" * pw.MAX_NESTING + " "),
        "unreadable groups": filled(unread),
        "quoted commas": '"' + "," * (pw.MAX_CHARS - 2) + '"',
        "backslashes fused": "\\" * 1500 + "(" + "," * 1499,
        "blend": "(" + ", ".join([quoted.strip()] * 199) + ").blend()",
    }
    pw.parse("warm", "prompt")  # imports compel's classes
    for name, text in shapes.items():
        assert len(text) <= pw.MAX_CHARS
        pw.clear_parse_cache()
        started = time.process_time()
        pw.parse(text, "prompt")
        seconds = time.process_time() - started
        print(f"{name}: {len(text)} characters parsed in {seconds * 1000:.1f} ms")
        assert seconds < 0.5, (name, seconds)
