"""predict.py in process: output files, progress logging, the weights it refuses, and generate()'s on_step hook."""

from __future__ import annotations

import logging

import pytest
from cog._inspector import check_input, create_predictor

import predict
from sdxl.errors import InputError
from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.output.outputs import OutputOptions, save_images
from sdxl.trained.trained_weights import TrainedWeights

TINY = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}


@pytest.fixture
def runner(pipes):
    """A Runner on the session's tiny pipelines (setup's loading is the server tests' business)."""
    runner = predict.Runner()
    runner.pipes, runner._outputs = pipes, []
    runner.trained_weights = TrainedWeights(pipes)
    return runner


def run(runner, **inputs):
    """Call run() the way the Cog server does: inputs checked and completed with their defaults first."""
    info = create_predictor("predict", "Runner")
    return runner.run(**check_input(info.inputs, inputs))


def test_each_request_writes_its_own_folder_and_the_previous_one_goes(runner):
    first = run(runner, **TINY, num_outputs=2)
    assert [path.name for path in first] == ["out-0.png", "out-1.png"]
    assert all(path.is_file() for path in first)

    second = run(runner, **TINY)
    assert second[0].parent != first[0].parent
    assert second[0].is_file()
    assert not first[0].parent.exists()  # not left to pile up in /tmp


def test_pngs_of_concurrent_requests_never_share_a_path(pipes):
    images = generate(pipes, GenerationRequest(**TINY)).images
    a, b = save_images(images, OutputOptions(), ["x"]), save_images(images, OutputOptions(), ["x"])
    assert a[0] != b[0] and a[0].read_bytes() == b[0].read_bytes()


@pytest.mark.parametrize("steps, logged", [(3, [1, 3]), (25, [1, 10, 20, 25])])
def test_progress_is_logged_on_the_first_every_tenth_and_the_last_step(caplog, steps, logged):
    with caplog.at_level(logging.INFO, logger="predict"):
        for step in range(1, steps + 1):
            predict.log_progress("base", step, steps)
    assert caplog.messages == [f"base: step {step}/{steps}" for step in logged]


def test_unusable_own_weights_fail_setup_naming_them(tiny_weights_dir, monkeypatch):
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tiny_weights_dir))
    with pytest.raises(InputError, match="weights: .*https"):
        predict.Runner().setup(weights="ftp://127.0.0.1/trained_model.tar")


@pytest.mark.parametrize(
    "refine, stages",
    [("no_refiner", [("base", 4)]), ("expert_ensemble_refiner", [("base", 3), ("refiner", 1)])],
)
def test_on_step_reports_every_denoising_step_of_each_stage(pipes, refine, stages):
    calls = []
    request = GenerationRequest(**{**TINY, "num_inference_steps": 4}, refine=refine, high_noise_frac=0.75)
    generate(pipes, request, on_step=lambda stage, step, total: calls.append((stage, step, total)))
    expected = [(stage, step, total) for stage, total in stages for step in range(1, total + 1)]
    assert calls == expected
