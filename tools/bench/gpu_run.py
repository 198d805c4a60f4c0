"""The GPU benchmark under a wall-clock budget: plans, starts the measuring process, and stops it at its limits.

The parent imports no torch. It starts gpu_worker.py with the steps (gpu_plan.py) and a deadline a few seconds
before the budget ends; the worker skips what its estimates say will not fit and stops steps at their limits from
inside. If a step is still running GRACE_S after its limit (a compile or a load cannot be interrupted from inside),
this process kills the worker's process group, reports the step as stopped and, while time is left, starts a new
worker for the steps after it. Whatever was never run is reported as skipped, with the reason. The last lines
printed are the table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from tools.bench.gpu_plan import Config, steps_for
from tools.bench.gpu_report import Report, markdown

GRACE_S = 5.0  # a step's limit + this = killed; the worker's deadline is the budget's end less this
POLL_S = 0.2
MAX_WORKERS = 3
ROOT = Path(__file__).resolve().parents[2]  # the worker runs there as `python -m tools.bench.gpu_worker`


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def watch(process: subprocess.Popen, status_path: Path, deadline: float) -> dict | None:
    """Wait for the worker; kill its group if a step runs GRACE_S past its limit. Returns the killed step's status."""
    while process.poll() is None:
        status = read_status(status_path)
        limit = min(status.get("until", deadline), deadline - GRACE_S) + GRACE_S
        if time.time() > limit:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {**status, "limit": limit}
        time.sleep(POLL_S)
    return None


def start_worker(pending: list[str], config: Config, paths: dict, deadline: float) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "tools.bench.gpu_worker",
        "--config",
        json.dumps(config.to_dict()),
        "--steps",
        *pending,
    ]
    command += ["--deadline", str(deadline - GRACE_S)]
    for key in ("out", "status", "weights_dir", "work"):
        command += [f"--{key.replace('_', '-')}", str(paths[key])]
    return subprocess.Popen(
        command, cwd=ROOT, start_new_session=True
    )  # its own group: killed with its cold-start children


def close_in_flight(report: Report, steps: dict, killed: dict | None, returncode: int, status: dict) -> None:
    """A row for the step the worker was in when it died or was killed (it could not write one itself)."""
    name = (killed or status).get("step")
    if name not in steps or report.row(name):
        return
    step = steps[name]
    if killed:
        allowed = killed["until"] - killed.get("started", killed["until"])
        reason = (
            f"still running {GRACE_S:.0f} s past the {allowed:.0f} s it was allowed: the measuring process was killed"
        )
        row = {"status": "stopped", "reason": reason}
    else:
        row = {"status": "failed", "reason": f"the measuring process exited with code {returncode} in this step"}
    seconds = time.time() - status["started"] if "started" in status else None
    report.add_row({"step": name, "id": step.id, "title": step.title, "seconds": seconds, "summary": "", **row})


def _why_ended(status: dict, returncode: int, deadline: float) -> str:
    if status.get("fatal"):
        return status["fatal"]
    if time.time() > deadline - 2 * GRACE_S:
        return "budget spent"
    return f"the measuring process exited with code {returncode}" if returncode else ""


def run_workers(report_dir: Path, config: Config, names: list[str], paths: dict, deadline: float) -> str:
    """Workers until every step has a row, the time is spent, or a worker made no progress; returns why it ended."""
    steps = {step.name: step for step in steps_for(config)}
    pending, why = list(names), ""
    for _ in range(MAX_WORKERS):
        paths["status"].unlink(missing_ok=True)
        process = start_worker(pending, config, paths, deadline)
        killed = watch(process, paths["status"], deadline)
        status, report = read_status(paths["status"]), Report(report_dir)
        close_in_flight(report, steps, killed, process.returncode, status)
        done = {row["step"] for row in report.rows}
        progressed = any(name in done for name in pending)
        pending = [name for name in pending if name not in done]
        why = _why_ended(status, process.returncode, deadline)
        if not pending or not progressed or time.time() > deadline - 2 * GRACE_S:
            break
    return why or "budget spent"


def run(args) -> None:
    tuning = dict(estimate_scale=args.estimate_scale, min_allowance_s=args.min_allowance_s, stall=args.stall)
    config = Config.for_run(args.arch or ("tiny" if args.smoke else "full"), args.smoke, args.repeats, **tuning)
    deadline = time.time() + args.budget_s
    names = [step.name for step in steps_for(config) if not args.rows or step.id.rstrip("abcd") in args.rows]
    out = Path(args.out)
    header = {"mode": "gpu", "shapes": config.shapes, "date": date.today().isoformat(), "budget_s": args.budget_s}
    report = Report.create(out, {**header, "config": config.to_dict()})
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        weights_dir = Path(args.weights_dir or Path(tmp) / "weights")
        paths = {"out": out, "status": Path(tmp) / "status.json", "weights_dir": weights_dir, "work": Path(tmp)}
        why = run_workers(out, config, names, paths, deadline)
    report = Report(out)
    for step in steps_for(config):
        if step.name in names and not report.row(step.name):
            row = {"status": "skipped", "reason": f"not started: {why}", "seconds": None, "summary": ""}
            report.add_row({"step": step.name, "id": step.id, "title": step.title, **row})
    print(markdown(report.data), flush=True)
