"""Render the HAProxy config for N Cog predictors: a fixed list (one host) or DNS discovery (Kubernetes).

    python deploy/haproxy/render_config.py --server 127.0.0.1:5001 --server 127.0.0.1:5002 > haproxy.cfg
    python deploy/haproxy/render_config.py --discover sdxl-predictor-pods:5000 --slots 32 --lua-path /etc/haproxy/...

Standard library only, so it runs wherever HAProxy does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "haproxy.cfg.in"
LUA = HERE / "cog_slot_grace.lua"


def server_lines(servers: list[str]) -> str:
    return "\n".join(f"    server predictor{i} {address}" for i, address in enumerate(servers, start=1))


def discovery_lines(name_port: str, slots: int) -> str:
    """Up to `slots` servers filled from the DNS A records of a headless Service; empty slots stay in MAINT."""
    return f"    server-template predictor 1-{slots} {name_port} resolvers cluster init-addr none"


def resolvers_section(hold_obsolete_s: int) -> str:
    # A pod missing from DNS (not ready while BUSY, or gone) is kept this long; HAProxy's own checks decide the rest.
    return (
        "resolvers cluster\n"
        "    parse-resolv-conf\n"
        "    resolve_retries 3\n"
        "    hold valid 5s\n"
        f"    hold obsolete {hold_obsolete_s}s\n"
    )


def render(args: argparse.Namespace) -> str:
    if bool(args.server) == bool(args.discover):
        raise SystemExit("give either --server HOST:PORT (one or more) or --discover NAME:PORT, not both")
    if args.server:
        servers, extra = server_lines(args.server), ""
    else:
        servers, extra = discovery_lines(args.discover, args.slots), resolvers_section(args.request_timeout_s)
    global_extra = "\n".join(f"    {line}" for line in args.global_line)
    return Template(TEMPLATE.read_text()).substitute(
        lua_path=args.lua_path,
        global_extra=global_extra,
        request_timeout_s=args.request_timeout_s,
        queue_timeout_s=args.queue_timeout_s,
        body_timeout_s=args.body_timeout_s,
        bind=args.bind,
        monitor_bind=args.monitor_bind,
        check_interval_ms=args.check_interval_ms,
        servers=servers,
        extra_sections=extra,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", default=[], help="a predictor's HOST:PORT (repeat)")
    parser.add_argument("--discover", help="NAME:PORT of a headless Service whose A records are the predictors")
    parser.add_argument("--slots", type=int, default=32, help="with --discover: the most predictors (default 32)")
    parser.add_argument("--bind", default="127.0.0.1:8080", help="where clients connect")
    parser.add_argument("--monitor-bind", default="127.0.0.1:8404", help="/metrics (Prometheus) and /stats")
    parser.add_argument("--request-timeout-s", type=int, default=600, help="longest prediction (default 600)")
    parser.add_argument("--queue-timeout-s", type=int, default=600, help="longest wait for a free predictor")
    parser.add_argument(
        "--body-timeout-s", type=int, default=30, help="longest time to send a request, body included (default 30)"
    )
    parser.add_argument("--check-interval-ms", type=int, default=1000, help="health-check period")
    parser.add_argument("--lua-path", default=str(LUA), help="where HAProxy finds cog_slot_grace.lua")
    parser.add_argument("--global-line", action="append", default=[], help="extra line for the global section")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(render(parse_args(sys.argv[1:])))
