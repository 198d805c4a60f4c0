"""cog_scratch: request folders coglet leaves under its fixed path go once no live server may still use them;
fresh ones, links and files stay; two servers sharing the path never remove a folder of the other's running
request."""

from __future__ import annotations

import multiprocessing
import os
import time

import cog_scratch
from cog_scratch import STALE_AFTER_S, discard_finished_request_folders

FORK = multiprocessing.get_context("fork")


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

    assert discard_finished_request_folders(tmp_path) == 0  # this server's first request: nothing known finished
    assert discard_finished_request_folders(tmp_path) == 0  # the same request still runs: still nothing
    cog_scratch.request_finished(tmp_path)
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

    assert discard_finished_request_folders(root) + discard_finished_request_folders(root) == 0
    assert (outside / "keep").is_dir() and (root / "link").is_symlink() and (root / "file").exists()


def test_a_missing_folder_is_nothing_to_do(tmp_path):
    assert discard_finished_request_folders(tmp_path / "absent") == 0


def _server(root, commands, answers):
    """One Cog server's side: for each request, its previous run() has returned, then coglet makes the new request's
    folder, then run() sweeps."""
    for name in iter(commands.recv, None):
        cog_scratch.request_finished(root)  # nothing to do before the first request
        if not name:  # its run() returned, and no request comes yet: it waits
            answers.send([])
            continue
        time.sleep(0.1)
        (root / name / "outputs").mkdir(parents=True)
        time.sleep(0.1)  # coglet's own work before run() (inputs); a folder made within CLOCK_SLACK_S waits longer
        discard_finished_request_folders(root)
        answers.send(sorted(p.name for p in root.iterdir()))


def _two_servers(root):
    """Servers A and B sharing `root`, each in its own process; request(server, folder) runs one request there
    ("" ends the running one without starting another) and answers what the sweep left."""
    root.mkdir()
    servers = {}
    for name in "AB":
        here, there = FORK.Pipe()
        process = FORK.Process(target=_server, args=(root, there, there))
        process.start()
        servers[name] = (here, process)

    def request(server: str, folder: str) -> list[str]:
        time.sleep(0.15)  # apart by more than the file clock's slack
        servers[server][0].send(folder)
        return servers[server][0].recv()

    return servers, request


def test_two_servers_sharing_the_path_keep_each_others_running_requests(tmp_path, monkeypatch):
    """Server A runs a long request (its folder untouched meanwhile) while server B handles two requests: B's sweep
    keeps A's folder. Finished folders go at the next sweep after every live server has moved past them, and a
    server that waits between requests, or has ended, holds nothing back."""
    monkeypatch.setattr(cog_scratch, "STALE_AFTER_S", 0.0)  # the order of events decides, not the age
    servers, request = _two_servers(tmp_path / "predictions")
    assert request("A", "a1") == ["a1"]
    assert request("A", "a2") == ["a2"]  # A's first request is finished: it goes
    assert request("B", "b1") == ["a2", "b1"]
    assert request("B", "b2") == ["a2", "b1", "b2"]  # A's request a2 is still running: kept
    assert request("A", "a3") == ["a3", "b2"]  # a2 and b1 are finished now; B's b2 still runs
    servers["A"][0].send(None)
    servers["A"][1].join(10)
    assert request("B", "b3") == ["b3"]  # A ended: it holds nothing back; a3 and b2 are finished
    assert request("B", "b4") == ["b4"]
    servers["B"][0].send(None)
    servers["B"][1].join(10)


def test_a_server_waiting_between_requests_holds_nothing_back(tmp_path, monkeypatch):
    """Server A served one request and waits for the next (for hours, say): B's sweeps still remove every finished
    folder, A's included, and keep only B's running one."""
    monkeypatch.setattr(cog_scratch, "STALE_AFTER_S", 0.0)
    servers, request = _two_servers(tmp_path / "predictions")
    assert request("A", "a1") == ["a1"]
    assert request("A", "") == []  # a1 returned; A waits
    assert request("B", "b1") == ["a1", "b1"]  # B's first request: nothing is known finished for B yet
    assert request("B", "b2") == ["b2"]  # A holds nothing back while it waits: a1 and b1 go
    for here, process in servers.values():
        here.send(None)
        process.join(10)
