"""Files coglet leaves behind, removed at the Cog edge (predict.py, train.py) at the start of each request.

coglet 0.23 gives every prediction and training a folder under the fixed path /tmp/coglet/predictions/<id>
(inputs/, outputs/) and never removes it, nor the spill_*.json files it writes there for messages too large for its
worker channel (files of 28 MB and 100 MB were found left there): one folder per request, for good.

Several Cog servers on one host share that path (scripts/cluster.sh, tests), and a request's code is never told its
folder's name, so a server cannot tell its folders from the others'. What it can tell is when a folder may still be
in use. A server handles one request at a time, and coglet makes a request's folder only after the server has
answered the one before; so while a server runs a request, every folder last changed before its previous request
ended is finished, as far as that server is concerned, and while it waits between requests, every folder is. Each
server records that moment (`since`: 0 during its first request, infinity while idle) in a registry beside the
predictions folder, in a file it holds locked for its life; a folder goes only when it was last changed before every
live server's `since` (a server that ended no longer counts) and STALE_AFTER_S ago (for Cog servers of other
models, which do not register, and for the moments between coglet making a folder and the request's run starting).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import shutil
import stat
import time
from pathlib import Path

from sdxl.guard.private_dirs import private_dir

log = logging.getLogger(__name__)

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # fixed in coglet 0.23, not under $TMPDIR
STALE_AFTER_S = 60.0
CLOCK_SLACK_S = 0.05  # file times come from the kernel's coarse clock, a tick behind time.time()
_servers: dict[Path, _Server] = {}  # this process's registration, per predictions folder


def _last_change(folder: Path) -> float:
    return max((entry.lstat().st_mtime for entry in (folder, *folder.rglob("*"))), default=0.0)


def registry_for(root: Path) -> Path:
    return root.with_name(root.name + ".servers")


class _Server:
    """This process's entry in the registry: a file locked for the process's life, holding its `since`."""

    def __init__(self, registry: Path):
        private_dir(registry, "the predictions folder")
        pending = registry / f"{os.getpid()}-{time.time_ns()}.new"
        self.fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # locked before others can see it: unlocked means its owner is gone
        self._write(0.0)  # its first request's folder was made before it registered: nothing is known finished
        self.path = pending.with_suffix(".live")
        os.rename(pending, self.path)
        self.last_end = 0.0

    def _write(self, since: float) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, repr(since).encode(), 0)

    def request_started(self) -> None:
        """A new request runs: every folder older than the end of the previous one is finished for us."""
        self._write(self.last_end)

    def request_ended(self) -> None:
        """Idle: none of the folders there is ours to keep (a fresh one is kept by STALE_AFTER_S)."""
        self.last_end = time.time()
        self._write(math.inf)


def _oldest_since(registry: Path) -> float:
    """The earliest `since` of the live servers; files of servers that ended are removed."""
    oldest = float("inf")
    for record in registry.glob("*.live"):
        try:
            fd = os.open(record, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            record.unlink(missing_ok=True)  # its owner is gone
            continue
        except BlockingIOError:  # held: its owner is alive
            try:
                oldest = min(oldest, float(os.pread(fd, 64, 0).decode()))
            except ValueError:  # being rewritten this instant: protect everything
                oldest = 0.0
        finally:
            os.close(fd)
    return oldest


def discard_finished_request_folders(root: Path = COGLET_PREDICTIONS, now: float | None = None) -> int:
    """Remove this user's request folders under `root` that no live server may still use; returns how many went."""
    now = time.time() if now is None else now
    if not root.is_dir():  # no request so far
        return 0
    registry = registry_for(root)
    if root in _servers:
        _servers[root].request_started()
    else:
        _servers[root] = _Server(registry)
    finished_before = min(_oldest_since(registry) - CLOCK_SLACK_S, now - STALE_AFTER_S)
    removed = 0
    with contextlib.suppress(OSError):  # not ours to read
        for folder in list(root.iterdir()):
            removed += _discard_if_finished(folder, finished_before)
    if removed:
        log.info("removed %d finished request folder(s) coglet left under %s", removed, root)
    return removed


def request_finished(root: Path = COGLET_PREDICTIONS) -> None:
    """The request this server ran has ended (returned, failed or cancelled): while it waits for the next one, it
    holds no folder back from the other servers' sweeps."""
    if root in _servers:
        _servers[root].request_ended()


def _discard_if_finished(folder: Path, finished_before: float) -> int:
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return 0  # never follow a link, never touch another user's files
        if _last_change(folder) >= finished_before:
            return 0
    except OSError:  # removed meanwhile by another server's sweep
        return 0
    shutil.rmtree(folder, ignore_errors=True)
    return 1
