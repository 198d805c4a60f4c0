"""Folders with fixed names under a shared temporary folder, made private to this process's user.

Under a world-writable /tmp another local user could create such a folder first, or a symlink in its place, and so
read, replace or redirect what the server writes there (or what it deletes when it cleans up). Each such folder is
created 0700 and checked whenever it is used: a real folder (not a symlink), owned by us, not writable by group or
others. A failed check is an UnsafeFolderError naming the folder and the setting that moves it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFolderError(RuntimeError):
    """A scratch folder someone else could control; raised at setup (or before a training) with what to change."""


def _problem(path: Path) -> str | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "it disappeared after it was created"
    if stat.S_ISLNK(info.st_mode):
        return f"it is a symbolic link (to {os.readlink(path)!r})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by this server's uid {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def check_private_dir(path: Path, setting: str) -> Path:
    """Raise UnsafeFolderError unless `path` is a real folder of ours that only we can write to."""
    problem = _problem(Path(path))
    if problem:
        raise UnsafeFolderError(
            f"{path} cannot be used as this server's private scratch folder: {problem}. Remove it, or set {setting} "
            "to a folder only this server's user can write to"
        )
    return Path(path)


def private_dir(path: Path, setting: str) -> Path:
    """`path`, created 0700 if absent (its parents as usual), then checked with check_private_dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)  # never follows a symlink planted at `path`: that is EEXIST, then the check refuses it
    except FileExistsError:
        pass
    return check_private_dir(path, setting)
