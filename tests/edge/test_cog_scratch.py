"""cog_scratch: finished request folders coglet leaves under its fixed path go; fresh ones, links and files stay."""

from __future__ import annotations

import os

from cog_scratch import STALE_AFTER_S, discard_finished_request_folders


def _age(path, seconds):
    stamp = os.stat(path, follow_symlinks=False).st_mtime - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def test_only_folders_untouched_for_a_while_are_removed(tmp_path):
    old, fresh, touched = (tmp_path / name for name in ("old", "fresh", "touched-lately"))
    for folder in (old, fresh, touched):
        (folder / "outputs").mkdir(parents=True)
        (folder / "outputs" / "spill_1.json").write_bytes(b"x" * 1000)
    for entry in (old, old / "outputs", old / "outputs" / "spill_1.json", touched, touched / "outputs"):
        _age(entry, STALE_AFTER_S + 5)  # touched-lately's spill file is new: its folder is still in use

    assert discard_finished_request_folders(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "touched-lately"]


def test_links_and_files_are_never_followed_or_removed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    root = tmp_path / "predictions"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file").write_text("x")
    for entry in (root / "link", root / "file", outside, outside / "keep"):
        _age(entry, STALE_AFTER_S + 5)

    assert discard_finished_request_folders(root) == 0
    assert (outside / "keep").is_dir() and (root / "link").is_symlink() and (root / "file").exists()


def test_a_missing_folder_is_nothing_to_do(tmp_path):
    assert discard_finished_request_folders(tmp_path / "absent") == 0
