"""A second wall for the serving process: every outgoing socket connection is checked against the network policy.

sdxl.guard.remote checks the URLs our own code fetches. Anything else that opens a connection from this process (a library,
a future Cog version that downloads file inputs itself again, a proxy setting) is caught here: a Python audit hook
sees each `socket.connect` (and `sendto`/`sendmsg`) with the address actually connected to, after DNS and after every
redirect, and refuses the same addresses sdxl.guard.remote refuses (private, loopback unless SDXL_ALLOW_LOOPBACK_HTTP=1,
link-local, metadata, multicast, reserved, ...). Unix sockets are not network connections and pass.

Audit hooks cannot be removed, so this is installed once, in the server's worker process only (never in a test
process or a shell that must talk to loopback servers). Connections made by native code outside Python's socket
module (coglet's own transport and uploads, torch.distributed) are not seen, and need not be: they are not
directed by client input.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading

from sdxl.guard import remote

log = logging.getLogger(__name__)

CHECKED_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg")  # each with args (socket, address)
_install_lock = threading.Lock()
_installed = False


class EgressRefused(PermissionError):
    """A connection to an address the network policy refuses. An OSError, so HTTP clients report it as a failed
    connection (remote.py names the input field)."""


def _addresses(host: str, port) -> list[str]:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return [host]
    except ValueError:  # a host name: check everything it resolves to (the connect resolves it again itself)
        return remote.system_resolver(host, port or 0)


def check_connection(address) -> None:
    """Raise EgressRefused when `address` (a socket address tuple) is not one this process may connect to."""
    if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[0], str):
        return  # AF_UNIX paths, abstract sockets and other non-IP families
    host, port = address[0], address[1]
    allow_loopback = remote.loopback_allowed(port)
    for ip in _addresses(host, port):
        reason = remote.refusal(ip, allow_loopback)
        if reason:
            raise EgressRefused(f"refused: connection to {ip} port {port} ({reason}); only public addresses")


def _audit_hook(event: str, args: tuple) -> None:
    if event in CHECKED_EVENTS:
        check_connection(args[1])


def install() -> bool:
    """Install the hook for the rest of this process's life; returns False when it already was."""
    global _installed
    with _install_lock:
        if _installed:
            return False
        sys.addaudithook(_audit_hook)
        _installed = True
    log.info("egress guard on: outgoing connections to non-public addresses are refused")
    return True


def is_installed() -> bool:
    return _installed
