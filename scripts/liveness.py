"""Liveness probe for the Cog server: exit 0 while /health-check says STARTING, READY or BUSY, else 1.

    python scripts/liveness.py                           # http://127.0.0.1:$PORT (default 5000)
    python scripts/liveness.py --url http://127.0.0.1:5000 --timeout 5

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
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        status = health_status(args.url, args.timeout)
    except (OSError, ValueError) as error:
        print(f"no answer from {args.url}: {error}")
        return 1
    print(status)
    return 0 if status in ALIVE else 1


if __name__ == "__main__":
    sys.exit(main())
