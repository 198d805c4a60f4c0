"""All model work runs on one thread, whatever thread calls (one OpenMP team): each edge (predict.py's setup and
run) makes one call onto the compute thread, and a cancel reaches the work there."""

import ctypes
import json
import threading
import time

import pytest
from cog._inspector import check_input, create_predictor
from peft.tuners.tuners_utils import BaseTunerLayer

import predict
from sdxl import serving
from sdxl.model.compute import on_compute_thread
from sdxl.trained import weights_cache as wc
from sdxl.trained.trained_weights import TrainedWeights
from tools.testing.trained import lora_state, write_lora

LORA_URL = "https://loras.invalid/style.safetensors"  # in the cache already: never looked up, never fetched
TINY = {"width": 64, "height": 64, "num_inference_steps": 1, "apply_watermark": False}


def no_lookups(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} looked up: the LoRA is cached")


@pytest.fixture
def runner(pipes, tmp_path):
    """A Runner on the session's tiny pipelines, with one LoRA in its weights cache."""
    cache = wc.WeightsCache(tmp_path / "cache", resolver=no_lookups)
    cache.put(
        "lora", LORA_URL, {wc.LORA_FILE: write_lora(tmp_path, lora_state(pipes.text2img.unet, seed=2)).read_bytes()}
    )
    runner = predict.Runner()
    runner.pipes, runner._outputs = pipes, []
    runner.trained_weights = TrainedWeights(pipes, cache)
    yield runner
    runner.trained_weights.loras.unload_all()  # the session's pipelines as they were


def run(runner, **inputs):
    """As the Cog server calls run(): inputs checked and completed with their defaults first."""
    return runner.run(**check_input(create_predictor("predict", "Runner").inputs, {**TINY, **inputs}))


def compute_thread() -> int:
    return on_compute_thread(lambda _: threading.get_ident())


def record_threads(module, seen: list):
    return module.register_forward_pre_hook(lambda *_: seen.append(threading.get_ident()))


def test_requests_from_many_threads_run_on_one(runner, pipes):
    seen = []
    hook = record_threads(pipes.text2img.unet, seen)
    try:
        callers = [threading.Thread(target=run, args=(runner,), kwargs={"seed": i}) for i in range(3)]
        for caller in callers:
            caller.start()
            caller.join()
        run(runner, seed=9)
    finally:
        hook.remove()
    assert len(seen) == 4  # one step each (both CFG halves in one batch)
    assert set(seen) == {compute_thread()} and threading.get_ident() not in seen


def test_trained_weights_work_runs_on_the_compute_thread_too(runner, pipes, monkeypatch):
    seen = []
    store = runner.trained_weights.loras
    original = store.pipe.load_lora_into_unet

    def recording(*args, **kwargs):
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(store.pipe, "load_lora_into_unet", recording)
    run(runner, loras=json.dumps([{"url": LORA_URL, "scale": 0.5}]), seed=1)
    assert seen == [compute_thread()] and seen[0] != threading.get_ident()


def test_setup_runs_on_the_compute_thread(tiny_weights_dir, monkeypatch):
    seen = {}

    def recording(name, real):
        def call(*args):
            seen[name] = threading.get_ident()
            return real(*args)

        return call

    monkeypatch.setattr(serving, "load_pipelines", recording("load", serving.load_pipelines))
    monkeypatch.setattr(serving, "warm_up", recording("warm_up", serving.warm_up))
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tiny_weights_dir))
    runner = predict.Runner()
    runner.setup()
    assert seen == {"load": compute_thread(), "warm_up": compute_thread()}
    assert compute_thread() != threading.get_ident()
    assert isinstance(runner.trained_weights, TrainedWeights)


class Interrupt(Exception):
    pass


def interrupt(thread: threading.Thread) -> None:
    """Cog cancels a running prediction by raising an exception in the thread that runs it."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupt))


def test_a_cancelled_caller_stops_the_work_and_frees_the_thread():
    started, stopped = threading.Event(), threading.Event()
    outcome = {}

    def work(cancelled):
        started.set()
        while not cancelled.is_set():  # a denoising loop checking between steps
            time.sleep(0.01)
        stopped.set()
        raise RuntimeError("stopped by cancel")

    def caller():
        try:
            on_compute_thread(work)
        except BaseException as error:  # noqa: BLE001 - what the caller saw is the point
            outcome["raised"] = error

    thread = threading.Thread(target=caller)
    thread.start()
    assert started.wait(10)
    interrupt(thread)
    thread.join(10)
    assert stopped.is_set()
    assert isinstance(outcome["raised"], Interrupt)
    assert on_compute_thread(lambda cancelled: "free again") == "free again"


def test_a_cancelled_request_stops_denoising_and_takes_its_lora_off(runner, pipes):
    """A cancel through the edge, mid-generation with a LoRA on: the denoising loop stops within a step, the caller
    sees the cancel, and the LoRA is off before the next request starts."""
    steps, unet_calls, generating, outcome = 200, [], threading.Event(), {}

    def count_call(*_):
        unet_calls.append(1)
        if len(unet_calls) >= 3:
            generating.set()

    hook = pipes.text2img.unet.register_forward_pre_hook(count_call)

    def caller():
        try:
            run(runner, loras=json.dumps([{"url": LORA_URL}]), num_inference_steps=steps, seed=5)
        except BaseException as error:  # noqa: BLE001 - what the caller saw is the point
            outcome["raised"] = error

    thread = threading.Thread(target=caller)
    try:
        thread.start()
        assert generating.wait(60)
        interrupt(thread)
        thread.join(60)
    finally:
        hook.remove()
    assert isinstance(outcome.get("raised"), Interrupt)
    assert len(unet_calls) < steps // 2  # stopped, not run to the end (one or two UNet calls per step)
    enabled = [
        layer
        for layer in pipes.text2img.unet.modules()
        if isinstance(layer, BaseTunerLayer) and not layer.disable_adapters
    ]
    assert enabled == []  # the LoRA is resident but off
    assert run(runner, seed=5)[0].is_file()  # the thread is free and the next request runs


def test_errors_of_the_work_reach_the_caller():
    def work(cancelled):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        on_compute_thread(work)


def test_a_call_from_the_compute_thread_is_refused_not_left_waiting_for_itself():
    with pytest.raises(RuntimeError, match="called from the compute thread"):
        on_compute_thread(lambda _: on_compute_thread(lambda _: None))
