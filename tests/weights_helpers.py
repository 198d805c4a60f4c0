"""Test helpers for trained weights: a loopback HTTP server with Range support, and builders of trained tars."""

from __future__ import annotations

import contextlib
import io
import json
import os
import ssl
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save, save_file


class WeightsServer:
    """Serves in-memory files on 127.0.0.1; counts requests; can redirect, stall, omit lengths or refuse ranges."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        self.scheme = "https" if tls else "http"
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.stalls: set[str] = set()
        self.no_length: set[str] = set()
        self.ranges = True
        self.requests: Counter[str] = Counter()
        self.range_requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                server.requests[path] += 1
                if path in server.redirects:
                    self._head(302, {"Location": server.redirects[path], "Content-Length": "0"})
                    return
                if path in server.stalls:
                    server.release.wait(10)
                    return
                body = server.files.get(path)
                if body is None:
                    self._head(404, {"Content-Length": "0"})
                    return
                wanted = self.headers.get("Range")
                if wanted and server.ranges:
                    server.range_requests.append(wanted)
                    start, end = (int(x) for x in wanted.removeprefix("bytes=").split("-"))
                    part = body[start : end + 1]
                    self._head(
                        206, {"Content-Length": str(len(part)), "Content-Range": f"bytes {start}-{end}/{len(body)}"}
                    )
                    self.wfile.write(part)
                    return
                headers = {"Accept-Ranges": "bytes"} if server.ranges else {}
                if path in server.no_length:
                    headers["Connection"] = "close"
                    self.close_connection = True
                else:
                    headers["Content-Length"] = str(len(body))
                self._head(200, headers)
                self.wfile.write(body)

            def _head(self, status, headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None  # clients that hang up early are expected
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url(path)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def loopback_weights_server():
    """A WeightsServer, with plain-http loopback URLs allowed (sdxl.remote refuses them outside tests) meanwhile."""
    from sdxl import remote

    os.environ[remote.ALLOW_LOOPBACK_ENV] = "1"
    server = WeightsServer()
    try:
        yield server
    finally:
        server.close()
        del os.environ[remote.ALLOW_LOOPBACK_ENV]


# ---------------------------------------------------------------------------------------------------------------------
# Trained weights


def tar_bytes(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buffer.getvalue()


TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_config(rank: int = 4, alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(TARGETS), init_lora_weights=False)


def lora_state(unet, seed: int, rank: int = 4, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A peft LoRA on (a fresh copy of) the tiny UNet's attention, with random non-zero lora_B, keyed `unet.*`
    the way StableDiffusionXLPipeline.save_lora_weights writes it."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model_state_dict

    fresh = UNet2DConditionModel.from_config(unet.config)
    torch.manual_seed(seed)
    fresh.add_adapter(lora_config(rank, alpha))
    state = get_peft_model_state_dict(fresh)
    return {f"unet.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def write_lora(folder: Path, state: dict[str, torch.Tensor], config=None) -> Path:
    """Through the library's own writer, as the trainer does; with `config`, its LoraConfig goes in the header."""
    from diffusers import StableDiffusionXLPipeline

    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    metadata = config.to_dict() if config is not None else None
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=unet, weight_name="lora.safetensors", unet_lora_adapter_metadata=metadata
    )
    return folder / "lora.safetensors"


def embeddings(widths: tuple[int, int], count: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"text_encoders_{i}": torch.randn(count, width, generator=generator) for i, width in enumerate(widths)}


def trained_tar(
    tmp: Path, lora: dict | None = None, unet: dict | None = None, rows: dict | None = None, token_map=None, config=None
) -> bytes:
    """A trained_model.tar as the trainer writes it."""
    files = {}
    if lora is not None:
        files["lora.safetensors"] = write_lora(tmp, lora, config).read_bytes()
    if unet is not None:
        files["unet.safetensors"] = save(unet)
    if rows is not None:
        files["embeddings.pti"] = save(rows)
        files["special_params.json"] = json.dumps(token_map or {"TOK": "<s0><s1>"}).encode()
    files["training_params.json"] = json.dumps({"resolution": 64}).encode()
    return tar_bytes(files)


def to_kohya(state: dict[str, torch.Tensor], lpb: int) -> dict[str, torch.Tensor]:
    """A diffusers/peft SDXL LoRA renamed the way kohya-ss writes SDXL LoRAs (sgm block names, lora_down/lora_up,
    an alpha per module): the file A1111 and ComfyUI load."""
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".lora_", 1)
        if module.startswith("unet."):
            name = module.removeprefix("unet.")
            parts = name.split(".")
            if parts[0] == "down_blocks":  # down_blocks.B.attentions.J -> input_blocks.(1 + B*(lpb+1) + J).1
                sgm = f"input_blocks.{1 + int(parts[1]) * (lpb + 1) + int(parts[3])}.1"
                rest = parts[4:]
            elif parts[0] == "up_blocks":  # up_blocks.B.attentions.J -> output_blocks.(B*(lpb+1) + J).1
                sgm = f"output_blocks.{int(parts[1]) * (lpb + 1) + int(parts[3])}.1"
                rest = parts[4:]
            else:  # mid_block.attentions.0 -> middle_block.1
                sgm, rest = "middle_block.1", parts[3:]
            prefix = "lora_unet_" + (sgm + "." + ".".join(rest)).replace(".", "_")
        else:  # text_encoder.text_model.encoder... -> lora_te1_text_model_encoder_...
            encoder, name = module.split(".", 1)
            prefix = ("lora_te1_" if encoder == "text_encoder" else "lora_te2_") + name.replace(".", "_")
        out[f"{prefix}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
        if kind.startswith("A"):
            out[f"{prefix}.alpha"] = torch.tensor(float(tensor.shape[0]))
    return out


def te_lora_state(text_encoder, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A peft LoRA on the first text encoder's attention, keyed as SDXL LoRAs name CLIP-L (`text_model.` inside)."""
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import CLIPTextModel

    fresh = CLIPTextModel(text_encoder.config)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    fresh.add_adapter(config)
    state = get_peft_model_state_dict(fresh, save_embedding_layers=False)
    return {f"text_encoder.text_model.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> bytes:
    save_file(state, path)
    return path.read_bytes()
