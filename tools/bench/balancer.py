"""Throughput of N Cog predictors behind HAProxy (scripts/cluster.sh) against one, side by side in one run.

    .venv/bin/python -m tools.bench.balancer --json docs/benchmarks/balancer.json

For each repeat it starts the cluster with 1, then 2 (--backends) predictors, sends the same requests from
--clients concurrent clients through the balancer, and stops it. On CPU each predictor gets one torch thread
(SDXL_CPU_THREADS=1), the CPU stand-in for one GPU per container; on a GPU machine each gets its own GPU.
Reports requests/s, latency percentiles, what the clients got (any 409 would show) and the requests per predictor.
COG_SLOT_GRACE_MS=0 turns off HAProxy's hold on each answer (deploy/haproxy/cog_slot_grace.lua) to show the 409s.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
from tools.testing.cog_server import free_port_run  # noqa: E402

HOST = "127.0.0.1"


class Cluster:
    """scripts/cluster.sh with its own folder and ports."""

    def __init__(self, backends: int, weights: Path, run_dir: Path):
        self.backends = backends
        first = free_port_run(2 + backends)  # balancer, its monitor, then one port per predictor
        self.port, self.monitor_port = first, first + 1
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SDXL_WEIGHTS_DIR": str(weights),
            "CLUSTER_DIR": str(run_dir),
            "CLUSTER_PORT": str(self.port),
            "CLUSTER_MONITOR_PORT": str(self.monitor_port),
            "CLUSTER_BACKEND_PORT": str(first + 2),
        }

    def __enter__(self):
        self._run("start", str(self.backends))
        return self

    def __exit__(self, *exc):
        self._run("stop")

    def _run(self, *args: str) -> None:
        subprocess.run(["bash", "scripts/cluster.sh", *args], cwd=ROOT, env=self.env, check=True, timeout=900)

    def served(self) -> dict[str, int]:
        text = requests.get(f"http://{HOST}:{self.monitor_port}/stats;csv", timeout=5).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: int(r["stot"]) for r in rows if r["pxname"] == "predictors" and r["svname"] != "BACKEND"}


def one_request(url: str, inputs: dict) -> tuple[int, str, float]:
    started = time.perf_counter()
    response = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=900)
    status = response.json().get("status", "") if response.headers.get("content-type", "").startswith("application/json") else ""  # fmt: skip
    return response.status_code, status, time.perf_counter() - started


def load(cluster: Cluster, inputs: dict, clients: int, count: int) -> dict:
    url = f"http://{HOST}:{cluster.port}"
    for _ in range(cluster.backends):  # warm-up: every predictor's first request
        one_request(url, inputs)
    before = cluster.served()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda _: one_request(url, inputs), range(count)))
    wall = time.perf_counter() - started
    latencies = sorted(a[2] for a in answers)
    after = cluster.served()
    return {
        "backends": cluster.backends,
        "requests": count,
        "wall_s": round(wall, 3),
        "requests_per_s": round(count / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (count - 1))], 3),
        "answers": {f"{code} {status}": n for (code, status), n in Counter(a[:2] for a in answers).items()},
        "served_per_predictor": {name: after[name] - before.get(name, 0) for name in after},
    }


def summarize(runs: list[dict], backends: list[int]) -> dict:
    rate = {n: statistics.median(r["requests_per_s"] for r in runs if r["backends"] == n) for n in backends}
    base = rate[backends[0]]
    return {f"{n}_backends_requests_per_s": round(rate[n], 3) for n in backends} | {
        f"speedup_{n}_vs_{backends[0]}": round(rate[n] / base, 3) for n in backends[1:]
    }


def ensure_weights(path: Path | None, scratch: Path) -> Path:
    if path:
        return path
    from sdxl.model.random_weights import write_tiny_weights

    return write_tiny_weights(scratch / "tiny-weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="weights folder (default: the tiny random weights, written)")
    parser.add_argument("--backends", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="requests per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per backend count, interleaved")
    parser.add_argument("--size", type=int, default=128, help="width and height")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    inputs = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "seed": 1}
    inputs |= {"num_inference_steps": args.steps, "disable_safety_checker": True, "apply_watermark": False}
    runs = []
    with tempfile.TemporaryDirectory(prefix="balancer-benchmark-") as scratch:
        weights = ensure_weights(args.weights, Path(scratch))
        for repeat in range(args.repeats):
            for n in args.backends:
                with Cluster(n, weights, Path(scratch) / f"cluster-{repeat}-{n}") as cluster:
                    runs.append(load(cluster, inputs, args.clients, args.requests))
                print(json.dumps(runs[-1]), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "weights")},
        "weights": str(args.weights or "tiny random"),
        "slot_grace_ms": os.environ.get("COG_SLOT_GRACE_MS", "25 (default)"),  # HAProxy's hold on each answer
        "summary": summarize(runs, args.backends),
        "runs": runs,
    }
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
