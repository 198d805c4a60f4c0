"""Watermark, safety checker, UNet call counts, seeds and per-request state of sdxl.inference.generation."""

import contextlib

import numpy as np
import pytest
import torch

from sdxl.errors import NSFWError
from sdxl.inference.generation import generate
from sdxl.inference.watermark import watermark_match
from sdxl.inputs.request import SEED_RANGE, GenerationRequest

SMALL = dict(width=64, height=64, num_inference_steps=3)


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


# --- watermark -------------------------------------------------------------------------------------------------


def test_watermark_is_on_by_default_and_decodes(pipes):
    result = generate(pipes, GenerationRequest(width=256, height=256, num_inference_steps=2, seed=5))
    assert watermark_match(result.images[0]) == 1.0


def test_watermark_off_for_one_request_only_even_after_a_failure(pipes):
    unmarked = generate(
        pipes, GenerationRequest(width=256, height=256, num_inference_steps=2, seed=5, apply_watermark=False)
    )
    assert watermark_match(unmarked.images[0]) < 0.8  # random bits agree about half the time

    # A request with the watermark off that fails half way (every output flagged) ...
    with flag_everything(pipes), pytest.raises(NSFWError):
        generate(pipes, GenerationRequest(width=256, height=256, num_inference_steps=2, seed=5, apply_watermark=False))
    # ... leaves the next default request marked.
    marked = generate(pipes, GenerationRequest(width=256, height=256, num_inference_steps=2, seed=5))
    assert watermark_match(marked.images[0]) == 1.0


# --- safety checker --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def checker_thresholds(pipes, concept_threshold):
    """Drive the tiny checker: concept 0 flags images whose similarity exceeds `concept_threshold`."""
    checker = pipes.safety_checker
    saved = checker.concept_embeds_weights.clone(), checker.special_care_embeds_weights.clone()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(10.0)
        checker.special_care_embeds_weights.fill_(10.0)
        checker.concept_embeds_weights[0] = concept_threshold
    try:
        yield
    finally:
        with torch.no_grad():
            checker.concept_embeds_weights.copy_(saved[0])
            checker.special_care_embeds_weights.copy_(saved[1])


def flag_everything(pipes):
    return checker_thresholds(pipes, -10.0)


def concept_similarity(pipes, images):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    checker = pipes.safety_checker
    clip_input = pipes.safety_feature_extractor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        return cosine_distance(embeds, checker.concept_embeds)[:, 0].tolist()


def test_a_flagged_image_is_dropped_and_the_rest_returned(pipes):
    request = GenerationRequest(num_outputs=2, seed=11, apply_watermark=False, **SMALL)
    unchecked = generate(pipes, GenerationRequest(**{**request.__dict__, "disable_safety_checker": True}))
    first, second = concept_similarity(pipes, unchecked.images)
    assert first != second
    with checker_thresholds(pipes, (first + second) / 2):
        checked = generate(pipes, request)
    kept = 0 if first < second else 1
    assert checked.nsfw == [kept == 1, kept == 0]
    assert len(checked.images) == 1
    np.testing.assert_array_equal(np.asarray(checked.images[0]), np.asarray(unchecked.images[kept]))


def test_all_flagged_is_a_clear_error_and_disable_skips_the_checker(pipes):
    with flag_everything(pipes):
        with pytest.raises(NSFWError, match="NSFW content detected"):
            generate(pipes, GenerationRequest(seed=3, **SMALL))
        result = generate(pipes, GenerationRequest(seed=3, disable_safety_checker=True, **SMALL))
    assert len(result.images) == 1 and result.nsfw == [False]


# --- UNet evaluations ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_unet_calls(pipes):
    counts = {"base": 0, "refiner": 0}
    hooks = [
        pipes.text2img.unet.register_forward_pre_hook(lambda *_: counts.__setitem__("base", counts["base"] + 1)),
        pipes.refiner.unet.register_forward_pre_hook(lambda *_: counts.__setitem__("refiner", counts["refiner"] + 1)),
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "refine, steps, frac, refine_steps, expected",
    [
        ("no_refiner", 10, 0.8, None, {"base": 10, "refiner": 0}),
        ("expert_ensemble_refiner", 10, 0.8, None, {"base": 8, "refiner": 2}),
        ("expert_ensemble_refiner", 20, 0.5, None, {"base": 10, "refiner": 10}),
        ("base_image_refiner", 10, 0.8, None, {"base": 10, "refiner": 3}),  # int(10 * 0.3)
        ("base_image_refiner", 10, 0.8, 20, {"base": 10, "refiner": 6}),
    ],
)
def test_unet_calls_per_refine_mode(pipes, refine, steps, frac, refine_steps, expected):
    request = GenerationRequest(
        width=64,
        height=64,
        num_inference_steps=steps,
        refine=refine,
        high_noise_frac=frac,
        refine_steps=refine_steps,
        seed=1,
        num_outputs=2,  # batched: still one UNet call per step
    )
    with count_unet_calls(pipes) as counts:
        generate(pipes, request)
    assert counts == expected


# --- seeds and state -------------------------------------------------------------------------------------------


def test_random_seed_is_reported_and_reproduces_the_image(pipes):
    first = generate(pipes, GenerationRequest(**SMALL))
    assert SEED_RANGE[0] <= first.seed <= SEED_RANGE[1]
    again = generate(pipes, GenerationRequest(seed=first.seed, **SMALL))
    np.testing.assert_array_equal(pixels(first), pixels(again))


def test_random_seeds_span_more_than_16_bits(pipes):
    seeds = {GenerationRequest().with_seed().seed for _ in range(50)}
    assert len(seeds) == 50
    assert max(seeds) > 2**16


def test_different_seeds_give_different_images(pipes):
    a = generate(pipes, GenerationRequest(seed=1, **SMALL))
    b = generate(pipes, GenerationRequest(seed=2, **SMALL))
    assert not np.array_equal(pixels(a), pixels(b))


def test_a_scheduler_does_not_leak_into_the_next_request(pipes):
    original = {id(pipe): pipe.scheduler for pipe in (*pipes.base_views, *pipes.refiner_views)}
    before = generate(pipes, GenerationRequest(seed=9, **SMALL))
    generate(
        pipes, GenerationRequest(seed=9, scheduler="DPMSolverMultistep", refine="expert_ensemble_refiner", **SMALL)
    )
    after = generate(pipes, GenerationRequest(seed=9, **SMALL))
    assert {id(pipe): pipe.scheduler for pipe in (*pipes.base_views, *pipes.refiner_views)} == original
    np.testing.assert_array_equal(pixels(before), pixels(after))


def test_a_long_prompt_is_truncated_with_a_warning(pipes, caplog):
    long_prompt = " ".join(["astronaut"] * 100)
    generate(pipes, GenerationRequest(prompt=long_prompt, seed=1, **SMALL))
    assert "prompt is 100 tokens" in caplog.text and "ignored" in caplog.text
