"""The download script's offline parts: checksum verification against a fake hub on loopback, pickle-to-safetensors conversion, the dry run."""

import hashlib
import importlib.util
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("download_weights", ROOT / "scripts" / "download_weights.py")
download_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download_weights)


class FakeHub:
    """The hub's file-tree API (GET /api/models/REPO/tree/REVISION) on loopback, for one repository at one revision,
    serving what huggingface_hub's verify_repo_checksums reads: each file's git blob id and, for LFS files, sha256."""

    def __init__(self, repo: str, revision: str, files: dict[str, tuple[bytes, bool]]):
        entries = [_tree_entry(path, body, lfs) for path, (body, lfs) in files.items()]
        self.tree_path, self.body, self.requests = f"/api/models/{repo}/tree/{revision}", json.dumps(entries), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append(self.path)
                found = urlsplit(self.path).path == hub.tree_path
                body = hub.body.encode() if found else b"{}"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _tree_entry(path: str, body: bytes, lfs: bool) -> dict:
    git_blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    entry = {"type": "file", "path": path, "size": len(body), "oid": git_blob}
    if lfs:  # the git blob is then the LFS pointer; its id does not matter here
        entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
    return entry


def test_verify_names_files_that_differ_or_are_missing_from_the_hubs_checksums(tmp_path):
    spec = download_weights.weights.WeightSpec(
        name="fake",
        repo_id="org/model",
        revision="0123456789abcdef0123456789abcdef01234567",
        folder="fake",
        allow_patterns=("*.json", "unet/*.safetensors", "gone.bin"),
        required_files=("config.json",),
        purpose="a test",
    )
    hub = FakeHub(
        spec.repo_id,
        spec.revision,
        {
            "config.json": (b'{"a": 1}', False),  # small: checked against its git blob id
            "tokenizer.json": (b'{"b": 2}', False),
            "unet/good.safetensors": (b"weights", True),  # LFS: checked against its sha256
            "unet/bad.safetensors": (b"weights", True),
            "gone.bin": (b"never fetched", True),
            "other.bin": (b"not in the spec's patterns", True),
        },
    )
    folder = tmp_path / "fake"
    (folder / "unet").mkdir(parents=True)
    (folder / "config.json").write_bytes(b'{"a": 1}')
    (folder / "tokenizer.json").write_bytes(b'{"b": 3}')
    (folder / "unet" / "good.safetensors").write_bytes(b"weights")
    (folder / "unet" / "bad.safetensors").write_bytes(b"weighty")
    (folder / "model.safetensors").write_bytes(b"converted here")  # not on the hub, not fetched: not judged
    try:
        api = HfApi(endpoint=hub.url, token=False)
        bad = download_weights.verify(spec, folder, api)
        assert bad == ["gone.bin", "tokenizer.json", "unet/bad.safetensors"]
        (folder / "tokenizer.json").write_bytes(b'{"b": 2}')
        (folder / "unet" / "bad.safetensors").write_bytes(b"weights")
        (folder / "gone.bin").write_bytes(b"never fetched")
        assert download_weights.verify(spec, folder, api) == []
    finally:
        hub.close()
    assert {urlsplit(path).path for path in hub.requests} == {hub.tree_path}  # asked at the pinned revision only


def test_pickled_checkpoint_becomes_safetensors(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    download_weights.convert_pickle_to_safetensors(tmp_path)
    assert not (tmp_path / "pytorch_model.bin").exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_dry_run_lists_pinned_revisions_without_network(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "download_weights.py"), "--dry-run", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "stabilityai/stable-diffusion-xl-base-1.0@462165984030d82259a11f4367a4eed129e94a7b" in out
    assert "madebyollin/sdxl-vae-fp16-fix" in out and "safety-checker" in out


def test_a_sha256_pinned_in_the_registry_is_checked_as_well_as_the_hubs(tmp_path, monkeypatch):
    """The hub is stood in for (no network here): its snapshot writes the file, and its own check finds nothing."""
    import dataclasses

    import huggingface_hub

    from sdxl.model import weights

    name = weights.FACE_DETECTOR.required_files[0]

    def snapshot(repo_id, revision, allow_patterns, local_dir, max_workers):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / name).write_bytes(b"not the published model")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(download_weights, "verify", lambda spec, folder: [])
    with pytest.raises(SystemExit, match=f"checksum mismatch for {name}"):
        download_weights.download(weights.FACE_DETECTOR, tmp_path)
    matching = dataclasses.replace(
        weights.FACE_DETECTOR, sha256=((name, hashlib.sha256(b"not the published model").hexdigest()),)
    )
    download_weights.download(matching, tmp_path / "other")  # the same bytes pass when they are what is pinned
