"""The weights cache: hits use no network, LRU eviction under a budget, safe tar extraction, nothing left behind."""

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import torch
from safetensors.torch import save

from sdxl.errors import InputError
from sdxl.guard import remote
from sdxl.trained import weights_cache as wc
from tools.testing.file_server import FileServer
from tools.testing.trained import tar_bytes

FIELD = "replicate_weights"
LORA = save({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.ones(3, 2)})
EMB = save({"text_encoders_0": torch.ones(2, 4), "text_encoders_1": torch.ones(2, 5)})
TOKENS = json.dumps({"TOK": "<s0><s1>"}).encode()
GOOD = {"lora.safetensors": LORA, "embeddings.pti": EMB, "special_params.json": TOKENS}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(remote.ALLOW_LOOPBACK_ENV, "1")
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path):
    return wc.WeightsCache(tmp_path / "cache", wc.CacheLimits(budget_bytes=10**6, max_trained_bytes=200_000))


def leftovers(cache):
    """Everything in the cache folder but the (empty) kind folders and the lock file."""
    skip = {*wc.KINDS, ".lock"}
    return sorted(str(p.relative_to(cache.root)) for p in cache.root.rglob("*") if p.name not in skip)


def test_hit_uses_no_network(server, cache):
    url = server.serve("/trained.tar", tar_bytes(GOOD))
    folder = cache.get("trained", url, FIELD)
    assert sorted(p.name for p in folder.iterdir()) == sorted(GOOD)
    assert (folder / "lora.safetensors").read_bytes() == LORA
    assert folder.name == "sha256-" + hashlib.sha256(tar_bytes(GOOD)).hexdigest()
    assert cache.path_for("trained", url).resolve() == folder
    assert cache.get("trained", url, FIELD) == folder
    assert server.requests["/trained.tar"] == 1  # one download; the hit asks nothing
    link = f"trained/{wc.url_key(url)}"
    assert leftovers(cache) == sorted([link, f"trained/{folder.name}"] + [f"trained/{folder.name}/{n}" for n in GOOD])


def test_full_finetune_tar_and_no_compression(server, cache):
    """The trainer writes a plain tar; a compressed one could expand far beyond what was downloaded: refused."""
    files = {"unet.safetensors": LORA, "training_params.json": b"{}"}
    url = server.serve("/unet.tar", tar_bytes(files))
    assert sorted(p.name for p in cache.get("trained", url, FIELD).iterdir()) == sorted(files)
    with pytest.raises(InputError, match="gzip-compressed, not a tar archive"):
        cache.get("trained", server.serve("/unet.tar.gz", gzip.compress(tar_bytes(files))), FIELD)


def test_lora_file_entry(server, cache):
    url = server.serve("/style.safetensors", LORA)
    assert (cache.get("lora", url, "loras[0]") / wc.LORA_FILE).read_bytes() == LORA


def test_lru_eviction_under_the_budget(server, tmp_path):
    cache = wc.WeightsCache(tmp_path / "c", wc.CacheLimits(budget_bytes=2500))
    urls = [server.serve(f"/{i}.safetensors", save({"x": torch.full((200,), float(i))})) for i in range(3)]
    first = cache.get("lora", urls[0], "loras[0]")
    second = cache.get("lora", urls[1], "loras[0]")
    os.utime(first, (1, 1))  # first used longest ago...
    os.utime(second, (2, 2))
    cache.get("lora", urls[0], "loras[0]")  # ...but a hit makes it the most recent
    cache.get("lora", urls[2], "loras[0]")  # does not fit beside both: the least recent (second) goes
    assert first.is_dir() and not second.is_dir() and cache.path_for("lora", urls[2]).is_dir()


def test_entries_in_use_are_not_evicted(server, tmp_path):
    """Room for two entries: with the first in use, a third evicts the second, though the first was used longest ago;
    with both others in use, a fourth is refused (never written beside them over the budget)."""
    cache = wc.WeightsCache(tmp_path / "c", wc.CacheLimits(budget_bytes=2000))
    urls = [server.serve(f"/{i}.safetensors", save({"x": torch.full((200,), float(i))})) for i in range(4)]
    with cache.open("lora", urls[0], "loras[0]") as first:
        os.utime(first, (1, 1))
        second = cache.get("lora", urls[1], "loras[1]")
        with cache.open("lora", urls[2], "loras[2]") as third:
            assert first.is_dir() and third.is_dir() and not second.is_dir()
            with pytest.raises(InputError, match="loras.3.: the weights cache has no room for 872 bytes now"):
                cache.get("lora", urls[3], "loras[3]")
    assert leftovers(cache) == sorted(
        [f"lora/{wc.url_key(u)}" for u in urls[:3]]
        + [f"lora/{f.name}{n}" for f in (first, third) for n in ("", "/lora.safetensors")]
    )
    assert cache.get("lora", urls[3], "loras[3]").is_dir()  # free again: the least recent goes


def test_stale_temporary_folders_are_removed_at_start(tmp_path):
    (tmp_path / "c" / ".tmp-crashed").mkdir(parents=True)  # no process holds its lock: its owner is gone
    cache = wc.WeightsCache(tmp_path / "c")
    assert leftovers(cache) == []


def member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


BAD_TARS = [
    ("not a tar", b"this is not a tar archive" * 40, "not a tar archive"),
    ("gzip of junk", gzip.compress(b"junk" * 300), "not a tar archive|damaged"),
    ("parent path", tar_bytes({**GOOD, "../evil.json": b"{}"}), "leaves the archive '../evil.json'"),
    ("nested parent", tar_bytes({**GOOD, "a/../../evil": b"x"}), "leaves the archive"),
    ("absolute path", tar_bytes({**GOOD, "/etc/cron.d/x": b"x"}), "absolute path '/etc/cron.d/x'"),
    ("symlink", tar_bytes(GOOD, [member("lora2", tarfile.SYMTYPE, "/etc/passwd")]), "a link 'lora2'"),
    ("hard link", tar_bytes(GOOD, [member("h", tarfile.LNKTYPE, "lora.safetensors")]), "a link 'h'"),
    (
        "symlink named like a weight",
        tar_bytes({"embeddings.pti": EMB}, [member("lora.safetensors", tarfile.SYMTYPE, "/x")]),
        "a link",
    ),
    ("device", tar_bytes(GOOD, [member("dev", tarfile.CHRTYPE)]), "device or pipe"),
    ("fifo", tar_bytes(GOOD, [member("fifo", tarfile.FIFOTYPE)]), "device or pipe"),
    ("missing files", tar_bytes({"training_params.json": b"{}"}), "neither lora.safetensors nor unet.safetensors"),
    ("tokens without map", tar_bytes({"lora.safetensors": LORA, "embeddings.pti": EMB}), "not special_params.json"),
    ("both weights", tar_bytes({**GOOD, "unet.safetensors": LORA}), "both"),
    ("duplicate", tar_bytes(GOOD, [member("lora.safetensors")]), "twice"),
    (
        "too many entries",
        tar_bytes({**GOOD, **{f"x{i}": b"" for i in range(wc.MAX_TAR_ENTRIES)}}),
        "more than 64 entries",
    ),
    ("compressed tar", gzip.compress(tar_bytes({**GOOD, "x": b" " * 300_000})), "gzip-compressed"),
    ("weights not safetensors", tar_bytes({**GOOD, "lora.safetensors": b"\x80\x04pickle"}), "not a valid safetensors"),
    ("bad token map", tar_bytes({**GOOD, "special_params.json": b"[1, 2]"}), "must map each trained word"),
    ("truncated tar", tar_bytes(GOOD)[:700], "damaged|truncated"),
]


@pytest.mark.parametrize("name, body, message", BAD_TARS, ids=[case[0] for case in BAD_TARS])
def test_bad_tars(server, cache, tmp_path, name, body, message, monkeypatch):
    monkeypatch.setattr(wc.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    url = server.serve("/bad.tar", body)
    with pytest.raises(InputError, match=message) as error:
        cache.get("trained", url, FIELD)
    assert error.value.field == FIELD
    assert leftovers(cache) == [] and list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "evil.json").exists() and not (cache.root / "evil.json").exists()


def test_lora_entry_must_be_safetensors(server, cache):
    url = server.serve("/x.safetensors", b"PK\x03\x04 a zip, or a pickle")
    with pytest.raises(InputError, match="not a valid safetensors"):
        cache.get("lora", url, "loras[0]")
    assert leftovers(cache) == []


def test_download_failures_leave_nothing(server, cache):
    with pytest.raises(InputError, match="HTTP 404"):
        cache.get("trained", server.url("/missing.tar"), FIELD)
    url = server.serve("/huge.tar", b"\0" * 300_000)
    with pytest.raises(InputError, match="larger than"):
        cache.get("trained", url, FIELD)
    assert leftovers(cache) == []


def test_refused_url_does_no_disk_work(cache, monkeypatch):
    with pytest.raises(InputError, match="scheme file:"):
        cache.get("trained", "file:///etc/passwd", FIELD)
    assert leftovers(cache) == []


def test_extracted_tar_from_a_file(tmp_path):
    """The setup path: a local trained tar, extracted without the cache."""
    archive = tmp_path / "trained_model.tar"
    archive.write_bytes(tar_bytes({"./lora.safetensors": LORA}))
    out = tmp_path / "out"
    out.mkdir()
    wc.extract_trained_tar(archive, out, "weights", max_bytes=10**6)
    assert [p.name for p in out.iterdir()] == ["lora.safetensors"]


def test_extracted_sizes_add_up_to_a_cap(tmp_path):
    archive = tmp_path / "trained_model.tar"
    archive.write_bytes(tar_bytes({**GOOD, "x": b" " * 300_000}))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="add up to more than 200000 bytes"):
        wc.extract_trained_tar(archive, tmp_path / "out", "weights", max_bytes=200_000)


def test_directory_entries_are_skipped(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(member(".", tarfile.DIRTYPE))
        info = tarfile.TarInfo("./lora.safetensors")
        info.size = len(LORA)
        tar.addfile(info, io.BytesIO(LORA))
    archive = tmp_path / "t.tar"
    archive.write_bytes(buffer.getvalue())
    (tmp_path / "out").mkdir()
    wc.extract_trained_tar(archive, tmp_path / "out", "weights", max_bytes=10**6)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lora.safetensors"]


def test_an_entry_discarded_while_in_use_goes_when_its_use_ends(server, cache):
    url = server.serve("/x.safetensors", LORA)
    with cache.open("lora", url, "loras[0]") as folder:
        cache.discard("lora", url)
        assert (folder / wc.LORA_FILE).read_bytes() == LORA  # still whole for the request using it
    assert leftovers(cache) == []
