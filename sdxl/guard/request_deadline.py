"""One request's time for all of its downloads (trained tar, LoRAs, image, mask), and its cancel signal.

Made once when a request starts and passed by name to every fetch (sdxl.guard.remote keeps each download to
min(its own deadline, this one)): five LoRAs and an image share one budget instead of each having its own.
The default keeps a prediction's fetching well inside the balancer's request timeout (docs/DEPLOY.md says how the
two relate).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

from sdxl import settings

REQUEST_FETCH_DEADLINE_ENV = "SDXL_REQUEST_FETCH_DEADLINE"
# Half of HAProxy's default request timeout (600 s, deploy/haproxy/render_config.py): the rest is for generating.
DEFAULT_SECONDS = 300


@dataclass(frozen=True)
class RequestDeadline:
    at: float  # time.monotonic() by which every download of the request has ended
    seconds: float  # what the request was given (for messages)
    cancelled: threading.Event | None = None  # set when the client cancels: running downloads stop within a second

    @classmethod
    def start(cls, seconds: float, cancelled: threading.Event | None = None) -> RequestDeadline:
        return cls(time.monotonic() + seconds, seconds, cancelled)

    @classmethod
    def from_env(cls) -> RequestDeadline:
        """Starts now, with the operator's SDXL_REQUEST_FETCH_DEADLINE (seconds; default 300)."""
        return cls.start(settings.positive_int(REQUEST_FETCH_DEADLINE_ENV, DEFAULT_SECONDS, "number of seconds"))

    def cancelled_by(self, cancelled: threading.Event | None) -> RequestDeadline:
        """The same end time, stopped by `cancelled` too (the compute thread's cancel event)."""
        return self if cancelled is None else replace(self, cancelled=cancelled)

    def left(self) -> float:
        return self.at - time.monotonic()
