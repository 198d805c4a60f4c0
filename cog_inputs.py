"""File inputs at the Cog edge (predict.py, train.py): declared so that Cog hands over the client's raw string.

coglet 0.23 converts only inputs annotated exactly `cog.Path`: an http(s) URL is downloaded in the worker before
run() (requests: redirects followed, proxies honoured, no address check, no size cap) and any other string is
passed on as a path on the server. An input annotated with a subclass of cog.Path keeps the OpenAPI schema's
`"type": "string", "format": "uri"` (cog's inspector sees a path type), but coglet leaves its value alone, so
sdxl.inputs.file_inputs applies the network policy to it instead. tests/inputs/test_file_inputs.py checks that this still holds.
"""

from __future__ import annotations

from cog import Input, Path

from sdxl.guard import egress_guard
from sdxl.validation import Spec


class FileInput(Path):
    """A file input given as an https:// URL or a data: URI, fetched by sdxl.inputs.file_inputs (never by Cog)."""


def guard_worker_egress() -> None:
    """In the Cog server's worker process, refuse every outgoing connection to a non-public address (the second
    wall behind sdxl.inputs.file_inputs and sdxl.guard.remote). Not in tests or shells that call run() themselves."""
    import coglet

    if coglet.server.active:
        egress_guard.install()


def field(described: Spec):
    """Cog's Input for an input the library describes (sdxl/inputs/request.py, sdxl/training/config.py): description,
    default, and the bounds and choices the spec declares."""
    return Input(**described.declared())
