"""Kubernetes exec probe for the Cog server: reads the state in /health-check's body and exits 0 or 1.

Cog's /health-check answers 200 in every state, so an httpGet probe cannot tell them apart; this reads the body.

    python deploy/probe.py startup   # 0 once setup has finished (either way): liveness then judges the outcome
    python deploy/probe.py ready     # 0 only when a prediction can start now (READY; not BUSY, not STARTING)
    python deploy/probe.py live      # 1 when only a restart helps: SETUP_FAILED, DEFUNCT, UNHEALTHY, no answer

UNHEALTHY is what coglet reports once its worker process has died (measured with coglet 0.23.1: every later
prediction fails with "Worker crashed" or "Broken pipe"), so liveness restarts it too. Standard library only: the
probe runs inside the predictor image with its Python. Prints the state it saw, for `kubectl describe pod`.
The kubelet's timeoutSeconds must exceed TIMEOUT_S below (the test of the manifests checks it).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

NO_ANSWER = "NO_ANSWER"  # connection refused, timeout or a body that is not the health-check JSON
PASSES = {
    "startup": {"READY", "BUSY", "SETUP_FAILED", "DEFUNCT", "UNHEALTHY"},
    "ready": {"READY"},
    "live": {"STARTING", "READY", "BUSY"},
}


# Seconds to wait for the answer. coglet asks its worker before answering READY or BUSY (and gives it up to 10 s),
# so liveness waits longer than that: a slow answer from a loaded pod must not restart it mid-prediction.
TIMEOUT_S = {"startup": 5.0, "ready": 2.0, "live": 12.0}


def read_status(url: str, timeout_s: float) -> str:
    """The `status` field of the health-check body, or NO_ANSWER."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy from the env
    try:
        with opener.open(f"{url}/health-check", timeout=timeout_s) as response:
            return str(json.load(response).get("status", NO_ANSWER))
    except (OSError, ValueError, urllib.error.URLError):
        return NO_ANSWER


def passes(probe: str, status: str) -> bool:
    return status in PASSES[probe]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PASSES:
        print(f"usage: probe.py {{{'|'.join(PASSES)}}}", file=sys.stderr)
        return 2
    url = os.environ.get("PROBE_URL", f"http://127.0.0.1:{os.environ.get('PORT', '5000')}")
    status = read_status(url, float(os.environ.get("PROBE_TIMEOUT_S", TIMEOUT_S[argv[0]])))
    ok = passes(argv[0], status)
    print(f"{argv[0]} probe: {status} -> {'pass' if ok else 'fail'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
