"""What the prediction edge runs on the compute thread: setup in one call, each request in one call (sdxl/model/compute.py
says why). Plain synchronous functions; the edge wraps each in on_compute_thread."""

from __future__ import annotations

import threading
from pathlib import Path

from sdxl.guard.request_deadline import RequestDeadline
from sdxl.inference import image_prompt
from sdxl.inference.generation import GenerationResult, StepCallback, generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model.compute import stop_if_cancelled
from sdxl.model.fastpath import warm_up
from sdxl.model.loading import Pipelines, load_pipelines
from sdxl.trained.request import AdapterRequest
from sdxl.trained.trained_weights import TrainedWeights


def set_up(root: Path, own_weights: str | None = None) -> tuple[Pipelines, TrainedWeights]:
    """1. load the pipelines  2. warm them up (compiles, with SDXL_COMPILE=1)  3. apply the model's own weights."""
    pipes = load_pipelines(root)
    warm_up(pipes)
    trained_weights = TrainedWeights(pipes)
    if own_weights:
        trained_weights.load_own_weights(own_weights)
    return pipes, trained_weights


def predict_once(
    pipes: Pipelines,
    trained_weights: TrainedWeights,
    adapter_request: AdapterRequest,
    request: GenerationRequest,
    cancelled: threading.Event | None = None,
    on_step: StepCallback | None = None,
    deadline: RequestDeadline | None = None,
) -> GenerationResult:
    """1. apply the request's trained weights  2. generate with its trained words rewritten  3. take the weights
    off again (also on error or cancel). A cancel stops it between steps, after each denoising step, and within a
    second in a download. Every download ends by the request's `deadline` (default: from the environment, now).
    What the server's optional models cannot do is refused first, before anything is fetched."""
    image_prompt.check_request(pipes, request, own_full_finetune=trained_weights.has_own_full_finetune)
    deadline = (deadline or RequestDeadline.from_env()).cancelled_by(cancelled)
    inpainting = request.base_view == "inpainting"
    with trained_weights.applied(adapter_request, cancelled, deadline, inpainting) as applied:
        stop_if_cancelled(cancelled, "before generating")
        return generate(pipes, applied.rewrite(request), on_step=on_step, cancelled=cancelled)
