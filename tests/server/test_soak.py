"""A CI-sized soak of the real Cog server (tools/soak/ on the tiny weights): every kind of request, hostile ones
and cancels among them, answered as expected; identical requests give the same image wherever they fall; after the
warm-up the worker's memory, the descriptors, the temporary folder and the weights cache do not grow.

It runs in a network namespace with only loopback when the machine allows one (unshare), so even a broken URL check
could not send anything beyond 127.0.0.1; the report says which.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.testing.cog_server import ROOT

REQUESTS = 62  # the warm-up's 11, then every success kind and every hostile and cancel variant once, with probes

# Bounds on growth after the warm-up, measured here and given headroom (see each number's comment).
RSS_GROWTH_MB = 80  # worker RSS, end minus after warm-up: measured +30 MB (62 requests); +77 MB over 149
HWM_GROWTH_MB = 80  # worker VmHWM, the same way: measured +28 MB (62); +72 MB over 149


def private_network() -> bool:
    probe = ["unshare", "--net", "--map-root-user", "sh", "-c", "ip link set lo up"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_soak(weights, out, requests: int, max_seconds: float) -> dict:
    command = [sys.executable, "-m", "tools.soak", "--requests", str(requests), "--steps", "2"]
    command += ["--weights-dir", str(weights), "--json", str(out), "--max-seconds", str(max_seconds)]
    command += ["--request-timeout", "60", "--setup-timeout", "300"]
    if private_network():
        command.append("--private-network")
    soak = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = soak.communicate(timeout=max_seconds + 300)  # it stops itself; this is a backstop
    except subprocess.TimeoutExpired:
        soak.terminate()  # SIGTERM: the soak stops its servers on the way out
        stdout, stderr = soak.communicate(timeout=60)
    assert out.exists(), stdout[-3000:] + stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tiny_weights_dir, tmp_path_factory):
    return run_soak(tiny_weights_dir, tmp_path_factory.mktemp("soak") / "report.json", REQUESTS, 600)


def test_every_kind_of_request_is_answered_as_expected(report):
    assert report["requests"] <= REQUESTS
    check_answers(report)
    for kind in ("bad_value_422", "bad_value", "bad_image", "refused_url", "bad_archive", "cancel"):
        assert report["kinds"][kind]["n"] >= report["variants"][kind], kind  # each variant at least once


def check_answers(report):
    assert report["checks_failed"] == [], report.get("server_log_tail")
    assert report["stopped_by"] == "count"
    kinds = {"probe_base", "probe_lora", "txt2img", "img2img", "inpaint", "refiner_expert", "refiner_base"}
    kinds |= {"trained_lora", "trained_full", "lora", "bad_value_422", "bad_value", "bad_image", "refused_url"}
    kinds |= {"bad_archive", "cancel"}
    assert set(report["kinds"]) == kinds
    assert report["kinds"]["cancel"]["outcomes"] == {"canceled": report["kinds"]["cancel"]["n"]}
    if private_network():
        assert report["network"].startswith("private")


def test_identical_requests_give_the_same_image_wherever_they_fall(report):
    check_probes(report)


def check_probes(report):
    assert all(probe["distinct_images"] == 1 for probe in report["probes"].values()), report["probes"]
    assert report["probes"]["probe_base"]["count"] >= 4 and report["probes"]["probe_lora"]["count"] >= 2
    # Probes came straight after trained weights, LoRAs, failures and cancels, not only after plain requests.
    outcomes = report["outcomes"]
    followed = {
        "trained" if a["kind"].startswith("trained") else a["kind"] if a["kind"] in ("lora", "cancel") else a["status"]
        for a, b in zip(outcomes, outcomes[1:])
        if b["kind"].startswith("probe") and not a["kind"].startswith("probe")
    }
    assert {"cancel", "failed"} <= followed and {"trained", "lora"} & followed, followed


def test_nothing_grows_after_the_warmup(report):
    check_growth(report, RSS_GROWTH_MB, HWM_GROWTH_MB)


def check_growth(report, rss_bound: float, hwm_bound: float):
    rss, hwm = report["worker_rss_mb"], report["worker_hwm_mb"]
    assert rss["growth"] <= rss_bound, (rss, report["worker_rss_growth_by_kind_mb"])
    assert hwm["growth"] <= hwm_bound, hwm
    for fds in (report["worker_fds"], report["server_fds"]):  # measured: worker 18 flat; server 14-15 (a connection)
        assert fds["max_after_warmup"] <= fds["after_warmup"] + 2, fds
    temp = report["temp_entries"]
    assert temp["leftover"] == [] and temp["end"] == temp["after_warmup"], temp
    assert temp["max_after_warmup"] <= temp["after_warmup"] + 1, temp  # the last answer's images, no more
    assert report["cache_mb"]["growth"] == 0, report["cache_mb"]  # every URL was fetched in the warm-up


@pytest.mark.slow
def test_a_long_soak_answers_alike_and_stays_bounded(tiny_weights_dir, tmp_path):
    """150 requests (about 15 minutes on two busy cores). The worker's RSS still creeps after the warm-up, in steps
    that follow full-UNet and LoRA requests and slow down: +45 MB by request 42, +58 by 96, +77 by 149 (the same with
    MALLOC_ARENA_MAX=2). The bounds below hold it to that, with headroom."""
    report = run_soak(tiny_weights_dir, tmp_path / "report.json", 150, 2400)
    check_answers(report)
    check_probes(report)
    check_growth(report, rss_bound=150, hwm_bound=150)
