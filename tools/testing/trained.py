"""Builders of trained weights for tests and scripts: trained_model.tar files as the trainer writes them, peft LoRAs
on the tiny UNet and text encoder (diffusers/peft and kohya key layouts), textual-inversion rows."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from safetensors.torch import save, save_file


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
