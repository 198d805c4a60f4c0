"""Files coglet leaves behind, removed at the Cog edge (predict.py, train.py) at the start of each request.

coglet 0.23 gives every prediction and training a folder under the fixed path /tmp/coglet/predictions/<id>
(inputs/, outputs/) and never removes it, nor the spill_*.json files it writes there for messages too large for its
worker channel (files of 28 MB and 100 MB were found left there): one folder per request, for good. A request runs
only after the server has sent the previous answer, so by then every older folder of this server is finished with.
Only folders untouched for STALE_AFTER_S go: other Cog servers on the same machine (tests, several servers on one
host) share the path, and their current folder is younger than that.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # fixed in coglet 0.23, not under $TMPDIR
STALE_AFTER_S = 60.0


def _last_change(folder: Path) -> float:
    return max((entry.lstat().st_mtime for entry in (folder, *folder.rglob("*"))), default=0.0)


def discard_finished_request_folders(root: Path = COGLET_PREDICTIONS, now: float | None = None) -> int:
    """Remove this user's request folders under `root` untouched for STALE_AFTER_S; returns how many went."""
    now = time.time() if now is None else now
    removed = 0
    try:
        folders = list(root.iterdir())
    except OSError:  # no such folder yet (no request so far), or not ours to read
        return 0
    for folder in folders:
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue  # never follow a link, never touch another user's files
            if now - _last_change(folder) < STALE_AFTER_S:
                continue
        except OSError:  # removed meanwhile by another server's sweep
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d finished request folder(s) coglet left under %s", removed, root)
    return removed
