"""The process that measures: started by gpu_run.py with the steps still to do and the deadline.

Before each step it writes the step and the time it is allowed until to the status file, so the parent can stop it
there (it kills this process group) if a step cannot be interrupted from inside (a torch.compile warm-up, a load);
inside, the steps themselves stop at that time between denoising steps and timed runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

STARTED = time.time()
ROOT = Path(__file__).resolve().parents[2]
import torch  # noqa: E402

from tools.bench.gpu_plan import Config, allowed_until, estimate, steps_for  # noqa: E402
from tools.bench.gpu_report import Report  # noqa: E402
from tools.bench.gpu_steps import FASTPATH_ENV, Context, step_cold_start, step_cold_start_direct, step_defaults  # noqa: E402
from tools.bench.gpu_steps_settings import BODIES  # noqa: E402
from tools.bench.gpu_weights import ensure_random_weights  # noqa: E402
from tools.bench.measure import OverBudget  # noqa: E402

log = logging.getLogger("benchmark")
STEP_BODIES = {
    "defaults": step_defaults,
    "cold_start": step_cold_start,
    "cold_start_direct": step_cold_start_direct,
    **BODIES,
}


def write_status(path: Path, **status) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def stack() -> str:
    import diffusers
    import peft
    import transformers

    versions = (torch, diffusers, transformers, peft)
    return ", ".join(f"{module.__name__} {module.__version__}" for module in versions) + f", python {sys.version[:6]}"


def _partial_summary(m: dict) -> str:
    return "; ".join(f"{key} {value:.3g}" for key, value in m.items() if isinstance(value, float)) or "nothing measured"


def run_step(ctx: Context, report: Report, name: str, deadline: float, status_path: Path) -> None:
    """Skip the step if its estimate exceeds the time left, else run it until its limit; one row either way."""
    step = next(s for s in steps_for(ctx.config) if s.name == name)
    estimate_s, now = estimate(name, ctx.facts, ctx.config), time.time()
    if name == ctx.config.stall:
        estimate_s = 1.0  # tests: a step that overruns its estimate without end
    row = {"step": name, "id": step.id, "title": step.title, "estimate_s": estimate_s}
    if estimate_s > deadline - now:
        reason = f"estimate {estimate_s:.0f} s > {max(deadline - now, 0):.0f} s left"
        report.add_row({**row, "status": "skipped", "reason": reason, "seconds": None})
        log.info("row %s %s: skipped (%s)", step.id, name, reason)
        return
    until = allowed_until(now, estimate_s, deadline, ctx.config.min_allowance_s)
    write_status(status_path, step=name, started=now, until=until)
    log.info("row %s %s: estimate %.0f s, allowed %.0f s", step.id, name, estimate_s, until - now)
    m, started = {}, time.perf_counter()
    try:
        if name == ctx.config.stall:
            time.sleep(10**6)  # tests: a step nothing inside can interrupt (a compile, a load); the parent stops it
        summary = STEP_BODIES[name](ctx, m, time.monotonic() + (until - now))
        status, reason = "measured", None
    except OverBudget as stop:
        summary, status, reason = _partial_summary(m), "stopped", str(stop)
    except Exception as error:  # noqa: BLE001 - one failed row must not lose the rows after it
        traceback.print_exc()
        summary, status, reason = _partial_summary(m), "failed", f"{type(error).__name__}: {error}"[:300]
    seconds = time.perf_counter() - started
    report.add_row({**row, "status": status, "reason": reason, "seconds": seconds, "summary": summary, "metrics": m})
    report.set_facts(**{k: v for k, v in ctx.facts.items() if not isinstance(v, dict)})
    log.info("row %s %s: %s in %.1f s: %s", step.id, name, status, seconds, summary)


def prepare(args, config: Config, report: Report) -> Context:
    for key in FASTPATH_ENV:  # the defaults are the library's own, whatever this shell has set
        os.environ.pop(key, None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not config.smoke:
        raise SystemExit("--mode gpu needs a CUDA device (--smoke runs its code on CPU with small shapes)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    report.set_facts(device=name, stack=stack(), process_start_s=time.time() - STARTED)
    report.set_facts(**ensure_random_weights(Path(args.weights_dir), config.shapes, device))
    ctx = Context(config, Path(args.weights_dir), Path(args.work), facts=dict(report.data["facts"]))
    ctx.load_reference()
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--out", "--status", "--weights-dir", "--work", "--config"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="time.time() at which every step has ended")
    parser.add_argument("--steps", nargs="+", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sdxl").setLevel(logging.WARNING)
    status_path, report = Path(args.status), Report(Path(args.out))
    config = Config(**json.loads(args.config))
    try:
        write_status(status_path, step="prepare", until=args.deadline)
        ctx = prepare(args, config, report)
        for name in args.steps:
            run_step(ctx, report, name, args.deadline, status_path)
        write_status(status_path, step=None, until=args.deadline)
    except Exception as error:
        traceback.print_exc()
        write_status(status_path, step="prepare", until=args.deadline, fatal=f"{type(error).__name__}: {error}"[:300])
        sys.exit(1)


if __name__ == "__main__":
    main()
