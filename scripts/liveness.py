"""Liveness (and readiness) probe for the Cog server, from the body of its /health-check.

    python scripts/liveness.py            # alive: exit 0 while the status is STARTING, READY or BUSY, else 1
    python scripts/liveness.py --ready    # ready for a request: exit 0 only while the status is READY
    python scripts/liveness.py --url http://127.0.0.1:5000 --timeout 15   # default: 127.0.0.1:$PORT (5000)

coglet answers /health-check with HTTP 200 in every state. When its worker process dies (killed, out of memory) the
server stays up, says UNHEALTHY and refuses all work with 409 until it is restarted: only the body tells, so a probe
must read it. Standard library only, so it runs in the image as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

ALIVE = ("STARTING", "READY", "BUSY")


def health_status(url: str, timeout: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local probe never goes through a proxy
    with opener.open(f"{url.rstrip('/')}/health-check", timeout=timeout) as response:
        return str(json.load(response).get("status"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('PORT', '5000')}")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait (coglet gives its worker 10)")
    parser.add_argument("--ready", action="store_true", help="succeed only when READY (for a readiness probe)")
    args = parser.parse_args(argv)
    try:
        status = health_status(args.url, args.timeout)
    except (OSError, ValueError) as error:
        print(f"no answer from {args.url}: {error}")
        return 1
    print(status)
    return 0 if status in (("READY",) if args.ready else ALIVE) else 1


if __name__ == "__main__":
    sys.exit(main())
