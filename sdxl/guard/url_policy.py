"""Which URLs a client may make us fetch, and which addresses we may connect to for them: checked before any
connection is made.

Every URL a request names (trained weights, LoRAs) is hostile input:
1. only https (plain http only for loopback, and only when SDXL_ALLOW_LOOPBACK_HTTP=1, for tests, or to a port
   listed in SDXL_ALLOW_LOOPBACK_HTTP_PORTS, for the playground);
2. the host is resolved first and every address it resolves to is checked: private, loopback (unless that
   setting), link-local, site-local, multicast, reserved, unspecified and other non-global addresses are refused
   before any connection, and so are IPv6 forms that carry a refused IPv4 address (IPv4-mapped/compatible, 6to4,
   NAT64) and Teredo tunnels; one refused address refuses the host. The result (`Target`) names the checked
   addresses, which are the only ones sdxl.guard.remote connects to, so a second DNS answer cannot swap in another;
3. URLs in logs and errors go through `redact`: presigned URLs carry credentials in their query strings.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from sdxl.errors import InputError

ALLOW_LOOPBACK_ENV = "SDXL_ALLOW_LOOPBACK_HTTP"  # "1": loopback on every port (tests)
ALLOW_LOOPBACK_PORTS_ENV = "SDXL_ALLOW_LOOPBACK_HTTP_PORTS"  # "7861,...": loopback on these ports only (playground)

Resolver = Callable[[str, int], list[str]]


class FetchError(InputError):
    """A URL the client gave could not be fetched; the message says why and names the input field."""


def loopback_allowed(port: int | None = None) -> bool:
    """Whether loopback (plain http included) may be reached on `port`: on every port with the tests' setting, or
    on the listed ports only (the playground's file server: never the predictor's own port)."""
    if os.environ.get(ALLOW_LOOPBACK_ENV) == "1":
        return True
    listed = {p.strip() for p in os.environ.get(ALLOW_LOOPBACK_PORTS_ENV, "").split(",")}
    return port is not None and str(port) in listed


def redact(url: object) -> str:
    """A URL fit for logs and error messages: no query string or fragment (presigned URLs carry credentials
    there) and no user:password@. Plain string work, so that it never fails on a malformed URL."""
    text = str(url).strip()
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
    base, rest = text[:cut], text[cut:]
    scheme, separator, after = base.partition("://")
    if separator:
        authority, slash, path = after.partition("/")
        if "@" in authority:
            authority = "***@" + authority.rpartition("@")[2]
        base = f"{scheme}{separator}{authority}{slash}{path}"
    return base + ("?..." if rest else "")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the host resolves to, in the resolver's order of preference (RFC 6724), without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits are the IPv4 host
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address reaches through a translator or tunnel, and the form that carries it."""
    if ip.sixtofour is not None:
        return "a 6to4 address", ip.sixtofour
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "a NAT64 address", low
    if ip in _IPV4_TRANSLATED:
        return "an IPv4-translated address", low
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: or ::1
        return "an IPv4-compatible address", low
    return None


def refusal(address: str, allow_loopback: bool) -> str | None:
    """Why we must not connect to this address, or None when it is a public (global unicast) address."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        elif ip.teredo is not None:  # a tunnel through a relay to the IPv4 host it embeds: no public weights host
            server, client = ip.teredo
            return f"a Teredo tunnel address (server {server}, client {client})"
        elif embedded := _embedded_ipv4(ip):
            form, inner = embedded
            reason = refusal(str(inner), allow_loopback=False)  # a translator must not reach our loopback either
            if reason:
                return f"{form} embedding {inner}, {reason}"
            if ip in _NAT64:
                return None  # DNS64 answers this for a public IPv4-only host; the gateway connects to that host
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    for kind in ("unspecified", "link_local", "site_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}", False):  # site-local (fec0::/10, deprecated) is IPv6 only
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """One checked hop: where to connect (checked IPs, tried in order) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str  # the first of `addresses`
    path: str
    url: str
    addresses: tuple[str, ...] = ()  # every address the host resolved to, each checked; empty: `address` only


def _split(url: object, field: str):
    """Parse the URL text; refuse what HTTP cannot carry. Returns (parts, port)."""
    if not isinstance(url, str) or not url.strip():
        shown = repr(url) if isinstance(url, str) else f"a {type(url).__name__}"
        raise FetchError(field, f"{shown} is not a URL; give an https:// URL")
    text = url.strip()
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise FetchError(field, f"{redact(text)} holds spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(text)
        return parts, parts.port
    except ValueError as error:
        raise FetchError(field, f"{redact(text)} is not a valid URL ({error})") from None


def _resolve_and_check(host: str, port: int, field: str, resolver: Resolver, allow_loopback: bool) -> list[str]:
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as error:
        raise FetchError(field, f"cannot resolve {host!r}: {error}") from None
    if not addresses:
        raise FetchError(field, f"{host!r} resolves to no address")
    for address in addresses:
        reason = refusal(address, allow_loopback)
        if reason:
            raise FetchError(field, f"refused: {host} resolves to {address}, {reason}")
    return list(addresses)


def check_url(url: str, field: str, resolver: Resolver = system_resolver) -> Target:
    """Parse, resolve and check a URL; nothing is connected to. Raises FetchError naming `field`."""
    parts, port = _split(url, field)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise FetchError(
            field, f"the URL scheme {scheme + ':' if scheme else '(none)'} is not allowed; give an https:// URL"
        )
    port = port or (443 if scheme == "https" else 80)
    allow_loopback = loopback_allowed(port)
    if scheme == "http" and not allow_loopback:
        raise FetchError(field, "plain http is not allowed; give an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise FetchError(field, "credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise FetchError(field, f"{redact(url)} has no host")
    addresses = _resolve_and_check(host, port, field, resolver, allow_loopback)
    if scheme == "http" and not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise FetchError(field, "plain http is allowed for loopback test servers only; give an https:// URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path = "".join(c if c.isascii() else quote(c) for c in path)  # an IRI's path, as browsers send it
    return Target(scheme, host, port, addresses[0], path, url.strip(), tuple(addresses))
