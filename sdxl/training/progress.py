"""Progress lines: step, loss, learning rates, steps/s and ETA. `verbose` logs every step, otherwise about ten lines."""

from __future__ import annotations

import datetime
import logging
import time

log = logging.getLogger(__name__)

QUIET_LINES = 10


class Progress:
    def __init__(self, total: int, start: int, verbose: bool, enabled: bool = True):
        self.total, self.start, self.verbose, self.enabled = total, start, verbose, enabled
        self.every = 1 if verbose else max(1, (total - start) // QUIET_LINES)
        self.started = time.perf_counter()

    def steps_per_second(self, done: int) -> float:
        return (done - self.start) / max(time.perf_counter() - self.started, 1e-9)

    def update(self, done: int, loss: float, lrs: list[float]) -> None:
        if not self.enabled or (done % self.every and done != self.total):
            return
        rate = self.steps_per_second(done)
        eta = datetime.timedelta(seconds=round((self.total - done) / rate)) if rate > 0 else "?"
        log.info(
            "step %d/%d | loss %.5f | lr %s | %.2f steps/s | ETA %s",
            done,
            self.total,
            loss,
            ", ".join(f"{lr:.2e}" for lr in lrs),
            rate,
            eta,
        )

    def seconds(self) -> float:
        return time.perf_counter() - self.started
