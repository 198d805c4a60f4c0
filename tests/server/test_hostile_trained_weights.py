"""Hostile trained weights and archives: each refused with an error naming the input, at a measured, bounded cost,
leaving nothing behind; the model afterwards exactly as before. In-process cases measure with tracemalloc; the HTTP
cases send the same inputs to the real Cog server on loopback and read the worker's VmHWM."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl.errors import InputError
from sdxl.guard.private_dirs import UnsafeFolderError, private_dir
from sdxl.model.loading import load_pipelines
from sdxl.model.lora_slots import LoraSlots
from sdxl.preprocess import archive
from sdxl.trained import weights_cache as wc
from sdxl.trained.lora_store import LoraStore, SlotLoras, lora_store_for
from sdxl.trained.unet_swap import unet_tensors
from tools.testing import file_server
from tools.testing import hostile_builders as hb
from tools.testing import trained as wh
from tools.testing.cog_server import CogServer, decode_png, free_port, ready_server

BOMB = 300_000_000  # the header size tarfile alone would read into memory (measured: 967 MB peak, 3.2 s, unpatched)


def measured(call):
    """(exception raised, peak traced MB, seconds)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        call()
        error = None
    except Exception as raised:  # noqa: BLE001 - the test inspects it
        error = raised
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return error, peak, seconds


@pytest.fixture(scope="module")
def bombs():
    """Compressed 300 MB header bombs, built once (a few seconds of compression)."""
    return {
        "pax.tar.xz": hb.compressed(hb.header_bomb_chunks(BOMB), "xz"),
        "longname.tar.gz": hb.compressed(hb.header_bomb_chunks(BOMB, tarfile.GNUTYPE_LONGNAME), "gz"),
        "global-pax.tar.bz2": hb.compressed(hb.header_bomb_chunks(BOMB // 10, tarfile.XGLTYPE), "bz2"),
    }


# --- 1. tar header bombs -----------------------------------------------------------------------------------------


def test_training_archive_header_bombs_cost_nothing(bombs, tmp_path):
    cases = {
        **bombs,
        "pax-1mb.tar": hb.compressed(hb.header_bomb_chunks(1 << 20), "plain"),
        "chain.tar": hb.header_chain(50),
        "sparse.tar": hb.sparse_member(),
        "big-dictionary.tar.xz": hb.big_dictionary_xz(hb.header_chain(1)),
    }
    for name, body in cases.items():
        path = hb.write(tmp_path / name, body)
        scratch = tmp_path / f"scratch-{name}"
        scratch.mkdir()

        def run(path=path, scratch=scratch):
            with archive.extracted(path, parent=scratch):
                pass

        error, peak, seconds = measured(run)
        assert isinstance(error, InputError) and error.field == "input_images", (name, error)
        assert re.search("extended header|in a row|sparse file|more than 256 MiB", str(error)), (name, str(error))
        # Measured: peak <= 8.5 MB (the xz decoder's own dictionary), <= 0.015 s; unpatched: 967 MB, 3.2 s.
        assert peak < 20 and seconds < 2, (name, peak, seconds)
        assert list(scratch.iterdir()) == [], name
    assert len(bombs["pax.tar.xz"]) < 60_000  # the 45 KB upload that carries 300 MB


def test_ordinary_pax_and_gnu_tars_still_read(tmp_path):
    """Long names (PAX and GNU), a global header as git archive writes it, and the trainer's own tar still work."""
    long_name = "folder/" + "a" * 200 + ".png"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        global_header = {"comment": "x" * 40} if fmt == tarfile.PAX_FORMAT else None
        with tarfile.open(path, "w", format=fmt, pax_headers=global_header) as tar:
            info = tarfile.TarInfo(long_name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
        dest = tmp_path / f"out-{fmt}"
        dest.mkdir()
        assert archive.extract(path, dest) == "tar"
        assert (dest / long_name).read_bytes() == b"data"
    for compression in ("gz", "bz2", "xz"):  # xz at preset 9: a 64 MiB dictionary, under the decoder's limit
        path = tmp_path / f"t.tar.{compression}"
        with tarfile.open(path, f"w:{compression}", **({"preset": 9} if compression == "xz" else {})) as tar:
            info = tarfile.TarInfo(long_name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
        dest = tmp_path / f"out-{compression}"
        dest.mkdir()
        assert archive.extract(path, dest) == "tar" and (dest / long_name).read_bytes() == b"data"


def test_trained_tar_header_bombs_and_compression(bombs, tmp_path):
    cases = {
        "pax.tar.xz": (bombs["pax.tar.xz"], "xz-compressed, not a tar archive"),
        "pax-1mb.tar": (hb.compressed(hb.header_bomb_chunks(1 << 20), "plain"), "extended header of 1,048,576 bytes"),
        "chain.tar": (hb.header_chain(50), "in a row"),
    }
    for name, (body, words) in cases.items():
        path = hb.write(tmp_path / name, body)
        dest = tmp_path / f"out-{name}"
        dest.mkdir()
        error, peak, seconds = measured(lambda p=path, d=dest: wc.extract_trained_tar(p, d, "replicate_weights", 10**9))
        assert isinstance(error, InputError) and words in str(error), (name, error)
        # Measured: peak <= 0.03 MB, <= 0.006 s (the 1 MB header is never read; the xz never decompressed).
        assert peak < 2 and seconds < 1, (name, peak, seconds)
        assert list(dest.iterdir()) == []


# --- 2. sizes before parsing ---------------------------------------------------------------------------------------


def lora_bytes(tmp_path: Path, unet, seed: int = 1, metadata: dict | None = None, broken: bool = False) -> bytes:
    from diffusers import StableDiffusionXLPipeline

    state = wh.lora_state(unet, seed=seed)
    if broken:  # one matrix one row too many: the load fails half-way, after peft has wrapped the layers
        key = next(iter(state))
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    folder = tmp_path / f"lora-{seed}-{hashlib.sha1(json.dumps(metadata).encode()).hexdigest()[:8]}-{broken}"
    folder.mkdir()
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers={k.removeprefix("unet."): v for k, v in state.items()},
        weight_name="lora.safetensors",
        unet_lora_adapter_metadata=metadata,
    )
    return (folder / "lora.safetensors").read_bytes()


def test_json_size_is_checked_from_the_tar_header_before_reading(tmp_path, pipes):
    lora = lora_bytes(tmp_path, pipes.text2img.unet)
    body = hb.claimed_size_tar({"lora.safetensors": lora, "embeddings.pti": b"x"}, "special_params.json", 60_000_000)
    path = hb.write(tmp_path / "t.tar", body)
    (tmp_path / "out").mkdir()
    error, peak, _ = measured(lambda: wc.extract_trained_tar(path, tmp_path / "out", "replicate_weights", 10**9))
    assert "special_params.json is 60,000,000 bytes; at most 65,536" in str(error)  # not "truncated": never read
    assert peak < 2  # measured 0.02 MB with a tiny LoRA first; unpatched, parsing such a 60 MB JSON cost ~1.4 GB


def test_json_size_is_checked_before_parsing_a_folder(tmp_path):
    path = tmp_path / "special_params.json"
    path.write_text('{"TOK": "' + "<s0>" * 500_000 + '"}')  # 2 MB
    error, peak, _ = measured(lambda: wc.read_token_map(path, "weights"))
    assert "larger than 65,536 bytes" in str(error) and peak < 0.1  # measured 0.001 MB
    path.write_text("[" * 60_000)  # under the cap, but nested past the parser's recursion limit
    with pytest.raises(InputError, match="not valid JSON"):
        wc.read_token_map(path, "weights")


def test_safetensors_header_is_capped_before_parsing(tmp_path):
    path = hb.write(tmp_path / "big.safetensors", hb.safetensors_header_only(20 << 20))
    error, peak, _ = measured(lambda: wc.check_safetensors(path, "loras[0]", "the LoRA file"))
    assert "header of 20,971,520 bytes; at most 8,388,608" in str(error) and peak < 0.1  # measured 0.005 MB


# --- 3. LoRA metadata ------------------------------------------------------------------------------------------------

HOSTILE_METADATA = {
    "modules_to_save conv_out": {"modules_to_save": ["conv_out"]},
    "modules_to_save resnets": {"modules_to_save": ["resnets"]},
    "init pissa": {"init_lora_weights": "pissa"},
    "target_parameters": {"target_parameters": ["conv_out.weight"]},
    "layers_to_transform": {"layers_to_transform": [0], "layers_pattern": "resnets"},
}


def metadata_with(extra: dict) -> dict:
    return {"r": 4, "lora_alpha": 4, "target_modules": list(wh.TARGETS), **extra}


def model_state(store: LoraStore) -> tuple[list[str], int, str]:
    """Module names, parameter count, and a hash of every parameter and buffer of the adapted models."""
    names, count, digest = [], 0, hashlib.sha256()
    for root, model in store.modules.items():
        names += [f"{root}.{name}" for name, _ in model.named_modules()]
        count += sum(p.numel() for p in model.parameters())
        for key, tensor in model.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return names, count, digest.hexdigest()


@pytest.fixture(scope="module", params=["peft", "slots"])
def backend(request, tiny_weights_dir):
    pipes = load_pipelines(tiny_weights_dir)
    if request.param == "slots":
        return SlotLoras(pipes.text2img, LoraSlots.install(pipes.text2img.unet, 8))
    return lora_store_for(pipes)


@pytest.mark.parametrize("variant", HOSTILE_METADATA)
def test_refused_lora_leaves_the_model_as_it_was(backend, variant, tmp_path):
    path = hb.write(
        tmp_path / "l.safetensors",
        lora_bytes(tmp_path, backend.pipe.unet, metadata=metadata_with(HOSTILE_METADATA[variant]), broken=True),
    )
    before = model_state(backend)
    for _ in range(2):  # a refused request repeated grows nothing
        with pytest.raises(InputError, match=r"^loras\[0\]: "):
            backend.ensure("lora_hostile", path, "loras[0]")
        assert model_state(backend) == before
    assert backend.peft_adapter_names() == set() and not backend.resident


@pytest.mark.parametrize("variant", HOSTILE_METADATA)
def test_hostile_metadata_is_ignored_on_a_fitting_lora(backend, variant, tmp_path):
    """The LoRA loads as what its tensors say; no module is copied or wrapped beyond its LoRA layers; the base
    weights (which init_lora_weights="pissa" would rewrite) stay as they were."""
    path = hb.write(
        tmp_path / "l.safetensors",
        lora_bytes(tmp_path, backend.pipe.unet, seed=2, metadata=metadata_with(HOSTILE_METADATA[variant])),
    )
    before = model_state(backend)
    base = {k: v.clone() for k, v in unet_tensors(backend.pipe.unet).items()}
    backend.ensure("lora_fits", path, "loras[0]")
    try:
        wrapped = [n for n in model_state(backend)[0] if "modules_to_save" in n or "original_module" in n]
        assert wrapped == []
        assert all(torch.equal(base[k], v) for k, v in unet_tensors(backend.pipe.unet).items())
    finally:
        backend.unload_all()
    assert model_state(backend)[1:] == before[1:]


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"target_modules": "(a+)+$"}, "target_modules"),  # a regex peft would match against every module name
        ({"rank_pattern": {"(x+x+)+y": 4}}, "rank_pattern"),
        ({"r": 10**9}, "unet.r"),
    ],
)
def test_metadata_values_are_checked(backend, extra, words, tmp_path):
    path = hb.write(tmp_path / "l.safetensors", lora_bytes(tmp_path, backend.pipe.unet, metadata=metadata_with(extra)))
    before = model_state(backend)
    started = time.perf_counter()
    with pytest.raises(InputError, match=rf"loras\[0\]: the LoRA file's adapter metadata sets .*{words}"):
        backend.ensure("lora_bad_meta", path, "loras[0]")
    assert time.perf_counter() - started < 5  # a catastrophic regex here would run for minutes
    assert model_state(backend) == before


# --- 4. trained tokens -------------------------------------------------------------------------------------------


def test_token_rows_are_capped_from_the_header(tmp_path, pipes):
    widths = (pipes.text2img.text_encoder.config.hidden_size, pipes.text2img.text_encoder_2.config.hidden_size)
    body = wh.trained_tar(tmp_path, lora=wh.lora_state(pipes.text2img.unet, seed=1), rows=wh.embeddings(widths, 1000))
    path = hb.write(tmp_path / "t.tar", body)
    (tmp_path / "out").mkdir()
    started = time.perf_counter()
    with pytest.raises(InputError, match="embeddings.pti: text_encoders_0 holds 1,000 token rows; at most 16"):
        wc.extract_trained_tar(path, tmp_path / "out", "replicate_weights", 10**9)
    assert time.perf_counter() - started < 1  # read from the header; 1,000 rows applied and undone took minutes before


# --- 5. private scratch folders ------------------------------------------------------------------------------------


def test_private_folders_are_made_0700_and_checked(tmp_path):
    made = private_dir(tmp_path / "fresh", "SETTING")
    assert made.stat().st_mode & 0o777 == 0o700

    target = tmp_path / "attacker"
    target.mkdir()
    (tmp_path / "planted").symlink_to(target)
    with pytest.raises(UnsafeFolderError, match=r"planted .*symbolic link.*set SETTING"):
        private_dir(tmp_path / "planted", "SETTING")

    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(UnsafeFolderError, match="writable by other users"):
        private_dir(tmp_path / "open", "SETTING")

    (tmp_path / "foreign").mkdir(mode=0o700)
    os.chown(tmp_path / "foreign", 12345, 12345)
    with pytest.raises(UnsafeFolderError, match="owned by uid 12345"):
        private_dir(tmp_path / "foreign", "SETTING")


def test_weights_cache_refuses_a_planted_folder(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    planted = tmp_path / "tmp" / "sdxl-weights-cache"
    planted.parent.mkdir()
    planted.symlink_to(target)
    monkeypatch.setattr("tempfile.tempdir", str(planted.parent))
    monkeypatch.delenv(wc.CACHE_DIR_ENV, raising=False)
    with pytest.raises(UnsafeFolderError, match=f"{planted}.*symbolic link.*{wc.CACHE_DIR_ENV}"):
        wc.WeightsCache.from_env()
    assert list(target.iterdir()) == []

    planted.unlink()
    cache = wc.WeightsCache.from_env()
    assert cache.root == planted and planted.stat().st_mode & 0o777 == 0o700
    os.chmod(planted, 0o777)  # changed after setup: checked again on use (after the URL check, before any connect)
    monkeypatch.setenv("SDXL_ALLOW_LOOPBACK_HTTP", "1")
    with pytest.raises(UnsafeFolderError, match="writable by other users"):
        cache._insert("lora", "http://127.0.0.1:9/x.safetensors", "loras[0]")


def test_training_results_folder_refuses_a_planted_symlink(tmp_path, monkeypatch):
    from sdxl.training import job

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / job.RESULTS_DIR).symlink_to(victim)
    with pytest.raises(UnsafeFolderError, match="symbolic link.*TMPDIR"):
        job.fresh_result_dir()
    assert (victim / "precious").read_text() == "keep"  # the old code emptied the symlink's target


# --- over HTTP, against the real Cog server ------------------------------------------------------------------------

BASE = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}
BASE = {**BASE, "apply_watermark": False}


def worker_hwm_mb(server: CogServer | subprocess.Popen) -> float:
    """The largest VmHWM in the server's process group: its worker, which holds the model."""
    server = getattr(server, "process", server)
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if _pgid(status.parent) == server.pid:
            found = re.search(r"VmHWM:\s+(\d+) kB", text)
            if found:
                peaks.append(int(found.group(1)) / 1024)
    return max(peaks)


def _pgid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.fixture(scope="module")
def http(tiny_weights_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    env = {"SDXL_ALLOW_LOOPBACK_HTTP": "1", "SDXL_WEIGHTS_CACHE_DIR": str(cache / "c")}
    files = file_server.FileServer()
    with ready_server(tiny_weights_dir, tmp_path_factory.mktemp("log") / "server.log", env) as server:
        yield server, files, cache / "c"
        files.close()


def test_hostile_weights_over_http(http, bombs, pipes, tmp_path):
    server, files, cache = http
    first = server.predict(BASE).json()
    assert first["status"] == "succeeded", first.get("error")
    widths = (pipes.text2img.text_encoder.config.hidden_size, pipes.text2img.text_encoder_2.config.hidden_size)
    unet = pipes.text2img.unet
    lora = lora_bytes(tmp_path, unet)
    cases = [
        ("replicate_weights", "/bomb.tar.xz", bombs["pax.tar.xz"], "xz-compressed"),
        ("replicate_weights", "/pax.tar", hb.compressed(hb.header_bomb_chunks(1 << 20), "plain"), "extended header"),
        (
            "replicate_weights",
            "/json.tar",
            hb.claimed_size_tar({"lora.safetensors": lora, "embeddings.pti": b"x"}, "special_params.json", 60_000_000),
            "special_params.json is 60,000,000 bytes",
        ),
        (
            "replicate_weights",
            "/tokens.tar",
            wh.trained_tar(tmp_path, lora=wh.lora_state(unet, seed=1), rows=wh.embeddings(widths, 1000)),
            "1,000 token rows",
        ),
        (
            "loras",
            "/conv_out.safetensors",
            lora_bytes(tmp_path, unet, seed=3, metadata=metadata_with({"modules_to_save": ["conv_out"]}), broken=True),
            "does not fit",
        ),
    ]
    hwm = worker_hwm_mb(server)
    for field, path, body, words in cases:
        url = files.serve(path, body)
        value = json.dumps([{"url": url, "scale": 1.0}]) if field == "loras" else url
        for _ in range(2 if field == "loras" else 1):
            started = time.perf_counter()
            answer = server.predict({**BASE, field: value}).json()
            seconds = time.perf_counter() - started
            assert answer["status"] == "failed" and re.search(rf"{field}(\[0\])?: .*{words}", answer["error"]), answer
            print(f"{path}: refused in {seconds:.2f}s")
            assert seconds < 10, (path, seconds)  # measured 0.02-1.2 s (the LoRA ones load it first)
            assert server.wait_for("READY", "SETUP_FAILED", "DEFUNCT", timeout=10)["status"] == "READY"
    grown = worker_hwm_mb(server) - hwm
    print(f"worker VmHWM {hwm:.0f} MB before, +{grown:.1f} MB after every hostile request")
    assert grown < 50, grown  # measured +6 MB over a 542 MB worker peak
    again = server.predict(BASE).json()
    np.testing.assert_array_equal(decode_png(again["output"][0]), decode_png(first["output"][0]))
    leftovers = [p for p in cache.rglob("*") if (p.is_file() and p.name != ".lock") or p.name.startswith(".tmp")]
    assert leftovers == []


# --- training archives over HTTP, against the real Cog server in train mode -----------------------------------------


@pytest.fixture(scope="module")
def train_server(tiny_weights_dir, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("train-tmp")
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "COG_TRAIN_TYPE_STUB": "train.py:train",
        "SDXL_WEIGHTS_DIR": str(tiny_weights_dir),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TMPDIR": str(scratch),
        "SDXL_ALLOW_LOOPBACK_HTTP": "1",  # the archives come from this test's loopback server
    }
    log = open(tmp_path_factory.mktemp("train-log") / "server.log", "wb")  # noqa: SIM115 (closed below)
    command = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", "--x-mode", "train"]
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    files = file_server.FileServer()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while _health(url) != "READY":
            assert time.monotonic() < deadline and server.poll() is None, "the train-mode server did not start"
            time.sleep(0.5)
        yield server, url, files, scratch
    finally:
        files.close()
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _health(url: str) -> str | None:
    import requests

    try:
        return requests.get(f"{url}/health-check", timeout=5).json()["status"]
    except requests.RequestException:
        return None


def test_hostile_training_archives_over_http(train_server, bombs):
    import requests

    from tests.server.test_train_cog import TINY_INPUTS, _zip_of_images

    server, url, files, scratch = train_server
    cases = {
        "/pax.tar.xz": (bombs["pax.tar.xz"], "extended header of 300,000,000 bytes"),
        "/global.tar.bz2": (bombs["global-pax.tar.bz2"], "extended header of 30,000,000 bytes"),
        "/dictionary.tar.xz": (hb.big_dictionary_xz(hb.header_chain(1)), "more than 256 MiB to decompress"),
    }
    hwm = worker_hwm_mb(server)
    for path, (body, words) in cases.items():
        started = time.perf_counter()
        answer = requests.post(
            f"{url}/trainings", json={"input": {"input_images": files.serve(path, body), **TINY_INPUTS}}, timeout=300
        ).json()
        seconds = time.perf_counter() - started
        print(f"{path} ({len(body):,} bytes): refused in {seconds:.2f}s")
        assert answer["status"] == "failed" and re.search(f"input_images: .*{words}", answer["error"]), answer
        assert seconds < 10, seconds  # measured 0.01-0.15 s each
        deadline = time.monotonic() + 10
        while _health(url) != "READY":
            assert time.monotonic() < deadline, "the server did not come back to READY"
            time.sleep(0.1)
    grown = worker_hwm_mb(server) - hwm
    print(f"train worker VmHWM {hwm:.0f} MB before, +{grown:.1f} MB after the hostile archives")
    assert grown < 50, grown  # measured +5.6 MB over a 371 MB worker peak (unpatched: ~1 GB for the first, 3 s)
    left = sorted(p.name for p in scratch.rglob("*") if "sdxl-" in p.name)
    assert left == ["sdxl-trained-models"], left  # the private results folder, empty; no scratch or archive folder
    assert list((scratch / "sdxl-trained-models").iterdir()) == []
    assert (scratch / "sdxl-trained-models").stat().st_mode & 0o777 == 0o700

    good = "data:application/zip;base64," + base64.b64encode(_zip_of_images()).decode()
    answer = requests.post(f"{url}/trainings", json={"input": {"input_images": good, **TINY_INPUTS}}, timeout=600)
    assert answer.json()["status"] == "succeeded", answer.json().get("error")
