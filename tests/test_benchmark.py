"""The benchmark script runs end to end (quickly, on tiny shapes), so it cannot rot between GPU sessions. Its
numbers are not asserted here: speed is checked by reading the benchmark, never by timed tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path, *args):
    out = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "scripts/benchmark.py", *args, "--repeats", "1", "--json", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_cpu_mode_measures_every_part(tmp_path):
    report = run_benchmark(tmp_path, "--mode", "cpu", "--architectures", "tiny")
    tiny = report["architectures"]["tiny"]
    for part in ("setup", "generation", "http", "lora_switch"):
        assert tiny[part]["ours_s"] > 0 and tiny[part]["baseline_s"] > 0, part
    assert all(row["counted"] == row["expected"] for row in tiny["unet_calls"])
    assert tiny["memory"]["base_refiner_checker_mb"] > 0


def test_gpu_mode_code_path_runs_in_smoke_form(tmp_path):
    """In two parts, as on a device with a time limit per command: the second reuses the first's weights."""
    weights = tmp_path / "weights"
    report = run_benchmark(tmp_path, "--mode", "gpu", "--smoke", "--parts", "runs", "--weights-dir", str(weights))
    assert {run["refine"] for run in report["runs"]} == {"no_refiner", "expert_ensemble_refiner", "base_image_refiner"}
    assert report["unet_tflop_per_call"] > 0
    assert report["lora_switch"]["ours_s"] > 0
    assert report["write_weights_s"] > 0 and "fastpath_variants" not in report

    report = run_benchmark(tmp_path, "--mode", "gpu", "--smoke", "--parts", "variants", "--weights-dir", str(weights))
    assert report["write_weights_s"] is None  # reused
    variants = report["fastpath_variants"]
    assert "needs a CUDA device" in variants["xformers"]["error"]  # the one setting CPU cannot run
    for name in set(variants) - {"xformers"}:
        assert variants[name]["s_per_image"] > 0 and variants[name]["max_pixel_diff"] <= 2, name
    assert variants["compile"]["lora_switch_ms"] > 0 and variants["compile"]["s_per_image_with_lora"] > 0
    assert "lora_switch_ms" not in variants["compile_without_lora_slots"]  # it refuses LoRAs
