"""All model work runs on one thread, whatever thread calls (one OpenMP team), and a cancel reaches the work."""

import ctypes
import threading
import time

import pytest

from sdxl.compute import on_compute_thread
from sdxl.generation import generate
from sdxl.request import GenerationRequest


def test_generations_from_many_threads_run_on_one(pipes):
    seen = set()
    hook = pipes.text2img.unet.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        callers = [
            threading.Thread(
                target=generate, args=(pipes, GenerationRequest(width=64, height=64, num_inference_steps=1, seed=i))
            )
            for i in range(3)
        ]
        for caller in callers:
            caller.start()
            caller.join()
        generate(pipes, GenerationRequest(width=64, height=64, num_inference_steps=1, seed=9))
    finally:
        hook.remove()
    assert len(seen) == 1 and threading.get_ident() not in seen


class Interrupt(Exception):
    pass


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
    # Cog cancels a running prediction by raising an exception in the thread that runs it.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupt))
    thread.join(10)
    assert stopped.is_set()
    assert isinstance(outcome["raised"], Interrupt)
    assert on_compute_thread(lambda cancelled: "free again") == "free again"


def test_errors_of_the_work_reach_the_caller():
    def work(cancelled):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        on_compute_thread(work)


def test_adapter_work_runs_on_the_compute_thread_too(pipes, tmp_path, monkeypatch):
    from sdxl.adapters import Adapters
    from tests.weights_helpers import lora_state, write_lora

    adapters = Adapters(pipes)
    seen = []
    original = adapters.pipe.load_lora_into_unet

    def recording(*args, **kwargs):
        seen.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(adapters.pipe, "load_lora_into_unet", recording)
    path = write_lora(tmp_path, lora_state(pipes.text2img.unet, seed=2))
    try:
        adapters._ensure_lora("thread_check", path, "loras[0]")
    finally:
        adapters._remove_adapter("thread_check")
    compute_thread = on_compute_thread(lambda _: threading.get_ident())
    assert seen == [compute_thread] and compute_thread != threading.get_ident()
