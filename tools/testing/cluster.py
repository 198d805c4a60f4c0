"""scripts/cluster.sh driven from a test: N real Cog servers behind the project's HAProxy config on loopback."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tools.testing.cog_server import HOST, ROOT, free_port_run


class Cluster:
    """The balancer and its predictors on free loopback ports; predictor i listens on backend_port + i - 1."""

    def __init__(self, weights_dir: Path, run_dir: Path, **settings: str):
        self.dir = run_dir
        first = free_port_run(4)  # balancer, its monitor, two predictors
        self.port, self.monitor_port, self.backend_port = first, first + 1, first + 2
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SDXL_WEIGHTS_DIR": str(weights_dir),
            "CLUSTER_DIR": str(run_dir),
            "CLUSTER_PORT": str(self.port),
            "CLUSTER_MONITOR_PORT": str(self.monitor_port),
            "CLUSTER_BACKEND_PORT": str(self.backend_port),  # the second predictor takes the next port
            "CLUSTER_GPUS": "",
            "CLUSTER_CHECK_INTERVAL_MS": "300",
            "CLUSTER_START_TIMEOUT_S": "180",
            "CLUSTER_STOP_TIMEOUT_S": "30",
            # Here the predictors are CPU-bound on two shared cores, and coglet can take longer than the default
            # 25 ms hold to free its slot after answering; a GPU host's idle CPUs free it within the default.
            "COG_SLOT_GRACE_MS": "200",
            **settings,  # more CLUSTER_* settings
        }
        self.url = f"http://{HOST}:{self.port}"

    def run(self, *args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            ["bash", "scripts/cluster.sh", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, f"cluster.sh {args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def stats(self) -> dict[str, dict]:
        """HAProxy's own counters per server of the predictors backend (and BACKEND for the whole of it)."""
        text = requests.get(f"http://{HOST}:{self.monitor_port}/stats;csv", timeout=5).text.lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "predictors"}

    def kill_predictor(self, index: int) -> None:
        os.killpg(int((self.dir / f"predictor{index}.pid").read_text()), signal.SIGKILL)


def stats_row(monitor_port: int, server: str) -> dict:
    text = requests.get(f"http://{HOST}:{monitor_port}/stats;csv", timeout=5).text.lstrip("# ")
    return next(r for r in csv.DictReader(io.StringIO(text)) if r["pxname"] == "predictors" and r["svname"] == server)
