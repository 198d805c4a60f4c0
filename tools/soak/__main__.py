"""Soak the real Cog server: many mixed requests, hostile ones and cancels among them, while watching its processes.

    python -m tools.soak --requests 150 --max-seconds 1800         # tiny random weights, written on the fly
    python -m tools.soak --weights-dir weights --size 1024 --steps 30 --requests 100   # production weights (GPU)
    python -m tools.soak --private-network ...                      # in a network namespace with only loopback

It starts `python -m cog.server.http` (predict.py:Runner) and a loopback HTTP server for trained weights and LoRAs,
then sends --requests predictions (stopping early at --max-seconds): text-to-image over every scheduler, img2img,
inpainting, both refiners, trained tars (LoRA + tokens, full UNet), extra LoRAs, bad values (422), unreadable images,
refused URLs (schemes, literal private addresses, a redirect to one: all refused before any connection), hostile
archives, and async predictions cancelled mid-run. Identical "probe" requests recur throughout and must give the same
image every time. After each request it reads coglet's worker and the server from /proc (RSS, VmHWM, open file
descriptors), counts the entries under the server's temporary folder and coglet's per-prediction folders, and sizes
the weights cache. Writes a JSON report (--json) and prints a table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
import numpy as np  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from sdxl.model.schedulers import SCHEDULERS  # noqa: E402
from tools.testing.cog_server import CogServer, WebhookReceiver, decode_png, png_data_uri  # noqa: E402
from tools.testing.file_server import FileServer  # noqa: E402
from tools.testing.proc import read_process  # noqa: E402

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # coglet 0.23.1 keeps a folder per prediction here (not $TMPDIR)
PROBES = ("probe_base", "probe_lora")
SUCCESS_KINDS = ("txt2img", "img2img", "inpaint", "refiner_expert", "refiner_base", "trained_lora", "trained_full")
SUCCESS_KINDS += ("lora",)
HOSTILE_KINDS = ("bad_value_422", "bad_value", "bad_image", "refused_url", "bad_archive")


@dataclass(frozen=True)
class Case:
    kind: str  # the report's row
    input: dict
    expect: str  # succeeded | failed | 422 | canceled, or alternatives joined by |
    error: str = ""  # a regex the error (or the 422 detail) must match


@dataclass
class Outcome:
    index: int
    kind: str
    status: str
    latency_s: float
    ok: bool
    why: str = ""
    image_sha: str | None = None


@dataclass
class Fixtures:
    urls: dict[str, str]
    images: dict[str, str]  # data: URIs
    served: FileServer = field(repr=False)


# ---------------------------------------------------------------------------------------------------------------------
# What is sent


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(body: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(body).decode()


def make_images(size: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    bomb = png_bytes(Image.new("L", (5000, 5000)))  # 25 megapixels in a few kB: refused from the header
    return {
        "image": png_data_uri(photo),
        "mask": png_data_uri(mask),
        "small_mask": png_data_uri(mask.resize((size // 2, size // 2))),
        "garbage": data_uri(b"this is not an image" * 50),
        "truncated": data_uri(png_bytes(photo)[:200]),
        "bomb": data_uri(bomb),
    }


def make_weights(weights_dir: Path, scratch: Path) -> dict[str, bytes]:
    """Trained tars and LoRA files for the model in weights_dir, built the way the trainer and peft write them."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxl.model import weights
    from tools.testing.trained import embeddings, lora_state, tar_bytes, trained_tar, write_lora

    unet_dir = weights_dir / weights.BASE.folder / "unet"
    unet = SimpleNamespace(config=UNet2DConditionModel.load_config(unet_dir))
    widths = tuple(
        json.loads((weights_dir / weights.BASE.folder / name / "config.json").read_text())["hidden_size"]
        for name in ("text_encoder", "text_encoder_2")
    )
    base = UNet2DConditionModel.from_pretrained(unet_dir).state_dict()
    generator = torch.Generator().manual_seed(3)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    loras = {}
    for name, seed in (("a", 11), ("b", 12)):
        folder = scratch / f"lora-{name}"
        folder.mkdir()
        loras[f"/lora-{name}.safetensors"] = write_lora(folder, lora_state(unet, seed=seed)).read_bytes()
    return {
        "/trained-lora.tar": trained_tar(scratch, lora=lora_state(unet, seed=3), rows=embeddings(widths, seed=4)),
        "/trained-full.tar": trained_tar(scratch, unet=tuned, rows=embeddings(widths, seed=5)),
        "/escape.tar": tar_bytes({"../evil.safetensors": b"data"}),
        "/not-a-tar.tar": b"this is not a tar archive" * 100,
        **loras,
    }


def make_fixtures(weights_dir: Path, scratch: Path, size: int) -> Fixtures:
    served = FileServer()
    urls = {path: served.serve(path, body) for path, body in make_weights(weights_dir, scratch).items()}
    served.redirects["/redirect.tar"] = "https://10.9.8.7/trained_model.tar"  # a private address: refused
    urls["/redirect.tar"] = served.url("/redirect.tar")
    urls["/missing.tar"] = served.url("/missing.tar")
    return Fixtures(urls, make_images(size), served)


def lora_list(fx: Fixtures, *entries: tuple[str, float]) -> str:
    return json.dumps([{"url": fx.urls[f"/lora-{name}.safetensors"], "scale": scale} for name, scale in entries])


@dataclass(frozen=True)
class CaseMaker:
    """Cases over one base request: the input is the base with a few fields changed."""

    base: dict

    def ok(self, kind: str, **extra) -> Case:
        return Case(kind, {**self.base, **extra}, "succeeded")

    def fails(self, kind: str, error: str, expect: str = "failed", **extra) -> Case:
        return Case(kind, {**self.base, **extra}, expect, error)


def successes(fx: Fixtures, make: CaseMaker) -> dict[str, list[Case]]:
    img, mask = fx.images["image"], fx.images["mask"]
    return {
        "probe_base": [make.ok("probe_base")],
        "probe_lora": [make.ok("probe_lora", loras=lora_list(fx, ("a", 0.8)))],
        "txt2img": [make.ok("txt2img", scheduler=name, seed=i) for i, name in enumerate(SCHEDULERS)]
        + [make.ok("txt2img", num_outputs=2, seed=None)],
        "img2img": [make.ok("img2img", image=img, prompt_strength=0.6)],
        "inpaint": [make.ok("inpaint", image=img, mask=mask)],
        "refiner_expert": [make.ok("refiner_expert", refine="expert_ensemble_refiner", high_noise_frac=0.5)],
        "refiner_base": [make.ok("refiner_base", refine="base_image_refiner", refine_steps=4)],
        "trained_lora": [make.ok("trained_lora", replicate_weights=fx.urls["/trained-lora.tar"], lora_scale=0.9)],
        "trained_full": [make.ok("trained_full", replicate_weights=fx.urls["/trained-full.tar"])],
        "lora": [
            make.ok("lora", loras=lora_list(fx, ("b", 1.0))),
            make.ok("lora", loras=lora_list(fx, ("a", 0.5), ("b", -0.5))),
            make.ok("lora", loras=lora_list(fx, ("a", 1.0)), replicate_weights=fx.urls["/trained-lora.tar"]),
        ],
    }


def refusals(fx: Fixtures, make: CaseMaker, size: int) -> dict[str, list[Case]]:
    """Bad values (refused by Cog's schema, or by the model), bad images, refused URLs and bad archives."""
    img, mask = fx.images["image"], fx.images["mask"]
    return {
        "bad_value_422": [
            make.fails("bad_value_422", "width", "422", width=size - 1 if size > 64 else 63),
            make.fails("bad_value_422", "num_outputs", "422", num_outputs=9),
            make.fails("bad_value_422", "scheduler", "422", scheduler="NOPE"),
            make.fails("bad_value_422", "guidance_scale", "422", guidance_scale=0),
            make.fails("bad_value_422", "prompt_strength", "422", prompt_strength=1.5),
            make.fails("bad_value_422", "seed", "422", seed=-1),
        ],
        "bad_value": [
            make.fails("bad_value", "width", width=size + 4),  # in range, not a multiple of 8: the model says so
            make.fails("bad_value", "mask", mask=mask),  # a mask without an image
            make.fails("bad_value", "loras", loras="not json"),
            make.fails("bad_value", "loras.*scale", loras=lora_list(fx, ("a", 9.0))),
        ],
        "bad_image": [
            make.fails("bad_image", "image", image=fx.images["garbage"]),
            make.fails("bad_image", "image", image=fx.images["truncated"]),
            make.fails("bad_image", "image: .*too large", image=fx.images["bomb"]),
            make.fails("bad_image", "mask", image=img, mask=fx.images["small_mask"]),
            # a local path: refused or not an image
            make.fails("bad_image", "image", "failed|422", image="/etc/passwd"),
        ],
        "refused_url": [
            make.fails("refused_url", "replicate_weights.*scheme file", replicate_weights="file:///etc/passwd"),
            make.fails("refused_url", "replicate_weights.*scheme ftp", replicate_weights="ftp://127.0.0.1/t.tar"),
            make.fails(
                "refused_url", "replicate_weights.*refused: 10.1.2.3", replicate_weights="https://10.1.2.3/t.tar"
            ),
            make.fails(
                "refused_url", "replicate_weights.*refused: 192.168.0.1", replicate_weights="http://192.168.0.1/t.tar"
            ),
            make.fails("refused_url", "refused: 169.254.169.254", replicate_weights="https://169.254.169.254/latest"),
            make.fails(
                "refused_url", "refused: ::ffff:192.168.1.1", replicate_weights="https://[::ffff:192.168.1.1]/t"
            ),
            make.fails("refused_url", "refused: 10.9.8.7", replicate_weights=fx.urls["/redirect.tar"]),
            make.fails(
                "refused_url", "loras.*refused: 172.16.0.1", loras='[{"url": "https://172.16.0.1/l.safetensors"}]'
            ),
        ],
        "bad_archive": [
            make.fails("bad_archive", "replicate_weights.*\\.\\.", replicate_weights=fx.urls["/escape.tar"]),
            make.fails("bad_archive", "replicate_weights.*not a tar", replicate_weights=fx.urls["/not-a-tar.tar"]),
            make.fails("bad_archive", "replicate_weights.*404", replicate_weights=fx.urls["/missing.tar"]),
        ],
    }


def cancels(fx: Fixtures, base: dict) -> list[Case]:
    """Requests long enough to be running when the cancel comes."""
    return [
        Case("cancel", {**base, "width": 128, "height": 128, "num_inference_steps": 500}, "canceled"),
        Case("cancel", {**base, "num_inference_steps": 500, "loras": lora_list(fx, ("b", 1.0))}, "canceled"),
        Case(
            "cancel",
            {**base, "num_inference_steps": 500, "replicate_weights": fx.urls["/trained-full.tar"]},
            "canceled",
        ),
    ]


def catalogue(fx: Fixtures, size: int, steps: int) -> dict[str, list[Case]]:
    """Every kind of request, each with the variants it cycles through."""
    make = CaseMaker(
        {"prompt": "a photo of TOK", "width": size, "height": size, "num_inference_steps": steps, "seed": 7}
    )
    return {**successes(fx, make), **refusals(fx, make, size), "cancel": cancels(fx, make.base)}


def plan(cases: dict[str, list[Case]], count: int, seed: int) -> tuple[list[Case], int]:
    """A warm-up (every success kind and the probes once), then rounds in a seeded order, each holding every success
    kind once and every hostile and cancel variant once. A probe follows every cancel, every request with trained
    weights or LoRAs and every fourth hostile one; the last request is a probe, as was the warm-up's.
    Returns (cases, warm-up length)."""
    rng = random.Random(seed)
    turns = Counter()

    def take(kind: str) -> Case:
        variants = cases[kind]
        turns[kind] += 1
        return variants[(turns[kind] - 1) % len(variants)]

    steps = [take(kind) for kind in ("probe_base", "probe_lora", *SUCCESS_KINDS, "probe_base")]
    warmup, round_, hostile = len(steps), [], 0
    while len(steps) < count - 2:
        if not round_:
            round_ = [*SUCCESS_KINDS, *(c for kind in (*HOSTILE_KINDS, "cancel") for c in cases[kind])]
            rng.shuffle(round_)
        item = round_.pop()
        steps.append(take(item) if isinstance(item, str) else item)
        hostile += steps[-1].kind in HOSTILE_KINDS
        adapters = steps[-1].kind in ("trained_lora", "trained_full", "lora")
        if steps[-1].kind == "cancel" or adapters or (steps[-1].kind in HOSTILE_KINDS and hostile % 4 == 0):
            steps.append(take(PROBES[len(steps) % 2]))
    steps.append(take("probe_base"))
    return steps, warmup


# ---------------------------------------------------------------------------------------------------------------------
# Sending and checking


def image_sha(body: dict) -> str | None:
    outputs = body.get("output") or []
    if not outputs:
        return None
    return hashlib.sha256(b"".join(decode_png(uri).tobytes() for uri in outputs)).hexdigest()[:16]


def error_text(status: str, body: dict) -> str:
    return json.dumps(body.get("detail")) if status == "422" else body.get("error") or ""


def send(server: CogServer, case: Case, prediction_id: str, timeout: float) -> tuple[str, dict, float]:
    started = time.monotonic()
    response = server.predict(case.input, timeout=timeout, id=prediction_id)
    body = response.json()
    status = "422" if response.status_code == 422 else body.get("status", str(response.status_code))
    return status, body, time.monotonic() - started


def send_and_cancel(server: CogServer, hook: WebhookReceiver, case: Case, prediction_id: str, timeout: float):
    """An async prediction, cancelled once it runs. The latency is the cancel's: from POST .../cancel to the end."""
    answer = server.predict_async(case.input, hook.url, id=prediction_id)
    if answer.status_code != 202:
        return str(answer.status_code), answer.json(), 0.0
    hook.wait_until(lambda p: p.get("id") == prediction_id and p.get("status") == "processing", timeout)
    started = time.monotonic()
    requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10)
    final = hook.wait_until(
        lambda p: p.get("id") == prediction_id and p.get("status") in ("succeeded", "failed", "canceled"), timeout
    )
    return final["status"], final, time.monotonic() - started


def judge(case: Case, status: str, body: dict) -> tuple[bool, str]:
    error = error_text(status, body)
    if status not in case.expect.split("|"):
        return False, f"expected {case.expect}, got {status}: {error[:300]}"
    if case.error and not re.search(case.error, error):
        return False, f"error does not match {case.error!r}: {error[:300]}"
    return True, ""


def run_case(server, hook, case: Case, index: int, id_prefix: str, timeout: float) -> Outcome:
    prediction_id = f"{id_prefix}-{index}"
    try:
        if case.kind == "cancel":
            status, body, latency = send_and_cancel(server, hook, case, prediction_id, timeout)
        else:
            status, body, latency = send(server, case, prediction_id, timeout)
    except (requests.RequestException, TimeoutError, ValueError) as error:
        return Outcome(index, case.kind, "error", 0.0, False, f"{type(error).__name__}: {error}")
    ok, why = judge(case, status, body)
    sha = image_sha(body) if status == "succeeded" else None
    return Outcome(index, case.kind, status, round(latency, 4), ok, why, sha)


def wait_ready(server: CogServer, timeout: float = 30) -> str:
    """The health status once the slot is free again (coglet frees it a few ms after answering)."""
    deadline = time.monotonic() + timeout
    while True:
        status = server.health()["status"]
        if status != "BUSY" or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------------------------------
# Watching


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def temp_entries(folder: Path) -> list[str]:
    """Everything under the server's temporary folder, each output folder's random name made generic."""
    return sorted(re.sub(r"^sdxl-out-[^/]+", "sdxl-out-*", str(p.relative_to(folder))) for p in folder.rglob("*"))


def sample(server: CogServer, index: int, started: float, tmp: Path, cache: Path, id_prefix: str) -> dict:
    worker, parent = read_process(server.worker_pid()), read_process(server.process.pid)
    return {
        "after_request": index,
        "t_s": round(time.monotonic() - started, 2),
        "worker_rss_mb": worker.rss_mb,
        "worker_hwm_mb": worker.hwm_mb,
        "worker_fds": worker.fds,
        "server_rss_mb": parent.rss_mb,
        "server_fds": parent.fds,
        "worker_cpu_s": worker.cpu_s,
        "server_cpu_s": parent.cpu_s,
        "temp_entries": len(temp_entries(tmp)),
        "cache_mb": round(folder_bytes(cache) / 1e6, 2),
        "coglet_entries": sum(1 + len(list(p.rglob("*"))) for p in COGLET_PREDICTIONS.glob(f"{id_prefix}-*")),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def latency_stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"n": len(values), "p50_s": round(p50, 3), "p90_s": round(p90, 3), "p99_s": round(p99, 3),
            "max_s": round(max(values), 3)}  # fmt: skip


def trend(samples: list[dict], key: str, warmup: int) -> dict:
    """A reading after the warm-up's last request, its largest value since, and at the end."""
    start, after = samples[min(warmup, len(samples)) - 1][key], [s[key] for s in samples[warmup - 1 :]]
    return {"after_warmup": start, "max_after_warmup": max(after), "end": after[-1],
            "growth": round(after[-1] - start, 1), "max_growth": round(max(after) - start, 1)}  # fmt: skip


def probe_report(outcomes: list[Outcome]) -> tuple[dict, list[str]]:
    report, problems = {}, []
    for name in PROBES:
        shas = [o.image_sha for o in outcomes if o.kind == name and o.status == "succeeded"]
        report[name] = {"count": len(shas), "distinct_images": len(set(shas))}
        if len(set(shas)) > 1:
            where = [o.index for o in outcomes if o.kind == name]
            problems.append(f"{name}: identical inputs gave {len(set(shas))} different images (requests {where})")
    return report, problems


def growth_by_kind(outcomes: list[Outcome], samples: list[dict], warmup: int) -> dict:
    """Worker RSS change summed over the requests of each kind after the warm-up: where growth comes from."""
    growth = Counter()
    for before, after, outcome in zip(samples[warmup - 1 :], samples[warmup:], outcomes[warmup:]):
        growth[outcome.kind] += after["worker_rss_mb"] - before["worker_rss_mb"]
    return {kind: round(mb, 1) for kind, mb in growth.most_common()}


def summarize(outcomes: list[Outcome], samples: list[dict], warmup: int, snapshots: dict, meta: dict) -> dict:
    kinds = {}
    for kind in dict.fromkeys(o.kind for o in outcomes):
        mine = [o for o in outcomes if o.kind == kind]
        latencies = [o.latency_s for o in mine if o.status != "error"]
        kinds[kind] = {**latency_stats(latencies), "outcomes": dict(Counter(o.status for o in mine))}
    probes, problems = probe_report(outcomes)
    checks = [f"request {o.index} ({o.kind}): {o.why}" for o in outcomes if not o.ok] + problems
    leftover = sorted((Counter(snapshots["end"]) - Counter(snapshots["after_warmup"])).elements())
    predictions = len(outcomes)
    return {
        **meta,
        "requests": predictions,
        "warmup_requests": warmup,
        "kinds": kinds,
        "probes": probes,
        "worker_rss_mb": trend(samples, "worker_rss_mb", warmup),
        "worker_hwm_mb": trend(samples, "worker_hwm_mb", warmup),
        "worker_rss_growth_by_kind_mb": growth_by_kind(outcomes, samples, warmup),
        "worker_fds": trend(samples, "worker_fds", warmup),
        "server_fds": trend(samples, "server_fds", warmup),
        "server_rss_mb": trend(samples, "server_rss_mb", warmup),
        "temp_entries": {**trend(samples, "temp_entries", warmup), "leftover": leftover},
        "cache_mb": trend(samples, "cache_mb", warmup),
        "coglet_entries": {
            "end": samples[-1]["coglet_entries"],
            "per_prediction": round(samples[-1]["coglet_entries"] / predictions, 2),
        },  # fmt: skip
        "checks_failed": checks,
        "timeline": samples,
    }


def print_table(report: dict) -> None:
    print(f"{'kind':<16}{'n':>4}{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'max s':>8}  outcomes")
    for kind, row in report["kinds"].items():
        numbers = "".join(f"{row.get(k, float('nan')):>8.3f}" for k in ("p50_s", "p90_s", "p99_s", "max_s"))
        print(f"{kind:<16}{row['n']:>4}{numbers}  {row['outcomes']}")
    rss, hwm = report["worker_rss_mb"], report["worker_hwm_mb"]
    print(f"\n{report['requests']} requests in {report['duration_s']} s (setup {report['setup_s']} s, "
          f"stopped by {report['stopped_by']}, network: {report['network']}); CPU s: {report['cpu_s']}")  # fmt: skip
    print(f"worker RSS MB: {rss['after_warmup']} after warm-up -> {rss['end']} at the end (max growth "
          f"{rss['max_growth']}); VmHWM {hwm['after_warmup']} -> {hwm['end']}")  # fmt: skip
    print(f"worker RSS growth after warm-up by kind (MB): {report['worker_rss_growth_by_kind_mb']}")
    for key in ("worker_fds", "server_fds", "temp_entries", "cache_mb"):
        row = report[key]
        print(f"{key}: {row['after_warmup']} after warm-up -> {row['end']} at the end (max {row['max_after_warmup']})")
    print(f"coglet per-prediction folder entries (under {COGLET_PREDICTIONS}): {report['coglet_entries']}")
    print(
        "probes: "
        + ", ".join(f"{k} {v['count']}x -> {v['distinct_images']} image(s)" for k, v in report["probes"].items())
    )
    print("checks: " + ("all passed" if not report["checks_failed"] else "\n  " + "\n  ".join(report["checks_failed"])))


# ---------------------------------------------------------------------------------------------------------------------
# The run


def drive(server, hook, steps: list[Case], warmup: int, args, paths: SimpleNamespace) -> tuple[list, list, dict, str]:
    """Send the planned requests, sampling the processes after each; past --max-seconds skip to the final probe."""
    id_prefix = f"soak{os.getpid()}x{int(time.time())}"
    started, outcomes, samples, snapshots, stopped_by = time.monotonic(), [], [], {}, "count"
    for index, case in enumerate(steps):
        if time.monotonic() - started > args.max_seconds and index < len(steps) - 1:
            stopped_by = "time"
            continue
        outcome = run_case(server, hook, case, index, id_prefix, args.request_timeout)
        if server.process.poll() is not None:
            outcome.ok, outcome.why = False, f"the server exited ({server.process.returncode})"
            outcomes.append(outcome)
            break
        health = wait_ready(server)
        if health != "READY":
            outcome.ok, outcome.why = False, f"{outcome.why} the server is {health} afterwards".strip()
        outcomes.append(outcome)
        samples.append(sample(server, index, started, paths.tmp, paths.cache, id_prefix))
        print(f"[{index + 1}/{len(steps)}] {case.kind} {outcome.status} {outcome.latency_s:.2f}s "
              f"worker {samples[-1]['worker_rss_mb']} MB {'' if outcome.ok else outcome.why}", file=sys.stderr)  # fmt: skip
        if index == warmup - 1:
            snapshots["after_warmup"] = temp_entries(paths.tmp)
    snapshots["end"] = temp_entries(paths.tmp)
    snapshots.setdefault("after_warmup", snapshots["end"])
    for folder in COGLET_PREDICTIONS.glob(f"{id_prefix}-*"):  # ours, by id: leave nothing behind
        shutil.rmtree(folder, ignore_errors=True)
    return outcomes, samples, snapshots, stopped_by


def cpu_used(samples: list[dict]) -> dict:
    """CPU seconds spent, a measure of cost that does not depend on what else the machine is running."""
    driver = os.times()
    return {
        "worker": samples[-1]["worker_cpu_s"] if samples else None,
        "server": samples[-1]["server_cpu_s"] if samples else None,
        "this_script": round(driver.user + driver.system, 2),
    }


def soak(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="sdxl-soak-"))
    paths = SimpleNamespace(tmp=root / "server-tmp", cache=root / "weights-cache", fixtures=root / "fixtures")
    for folder in vars(paths).values():
        folder.mkdir()
    try:
        weights_dir = args.weights_dir
        if weights_dir is None:
            from sdxl.model.random_weights import write_tiny_weights

            weights_dir = write_tiny_weights(root / "weights")
        fixtures = make_fixtures(weights_dir, paths.fixtures, args.size)
        cases = catalogue(fixtures, args.size, args.steps)
        steps, warmup = plan(cases, args.requests, args.seed)
        env = {
            "TMPDIR": str(paths.tmp),
            "SDXL_WEIGHTS_CACHE_DIR": str(paths.cache),
            "SDXL_ALLOW_LOOPBACK_HTTP": "1",  # the loopback weights server speaks plain http
        }
        server, hook = CogServer(weights_dir, root / "server.log", env=env), WebhookReceiver()
        try:
            setup_started = time.monotonic()
            server.wait_for("READY", timeout=args.setup_timeout)
            setup_s = round(time.monotonic() - setup_started, 2)
            run_started = time.monotonic()
            outcomes, samples, snapshots, stopped_by = drive(server, hook, steps, warmup, args, paths)
            meta = {
                "duration_s": round(time.monotonic() - run_started, 1),
                "cpu_s": cpu_used(samples),
                "setup_s": setup_s,
                "stopped_by": stopped_by,
                "variants": {kind: len(variants) for kind, variants in cases.items()},
                "network": "private namespace, loopback only" if os.environ.get("SOAK_NETNS") else "host",
                "settings": {k: str(v) for k, v in vars(args).items()},
            }
            report = summarize(outcomes, samples, warmup, snapshots, meta)
            report["outcomes"] = [asdict(o) for o in outcomes]
            if report["checks_failed"]:
                report["server_log_tail"] = server.log()[-4000:]
            return report
        finally:
            server.stop()
            hook.close()
            fixtures.served.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def reexec_in_private_network() -> None:
    """Run this script again in a new network namespace with only loopback up: nothing it or the server sends can
    leave the machine, whatever the URL checks do."""
    if os.environ.get("SOAK_NETNS"):
        return
    argv = [a for a in sys.argv[1:] if a != "--private-network"]
    command = ["unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    os.environ["SOAK_NETNS"] = "1"
    os.execvp("unshare", [*command, sys.executable, "-m", "tools.soak", *argv])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests", type=int, default=62, help="requests to send (the warm-up is 11; 62 cover every variant once)"
    )
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    parser.add_argument("--weights-dir", type=Path, help="model weights (default: tiny random ones, written now)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds to wait for one answer")
    parser.add_argument("--setup-timeout", type=float, default=600, help="seconds to wait for the server to be READY")
    parser.add_argument("--json", type=Path, default=Path("soak-report.json"), help="where to write the report")
    parser.add_argument("--private-network", action="store_true", help="run in a loopback-only network namespace")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (weights, logs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    if args.private_network:
        reexec_in_private_network()
    report = soak(args)
    args.json.write_text(json.dumps(report, indent=1))
    print_table(report)
    return 1 if report["checks_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
