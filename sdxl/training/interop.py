"""The trained weights in the formats other SDXL tools load (AUTOMATIC1111, Forge, ComfyUI), converted with diffusers'
own utilities, so a trained_model.tar is useful beyond this predictor:

  lora_kohya.safetensors       the UNet LoRA in the kohya layout (`lora_unet_..._to_q.lora_down.weight` + `.alpha`),
                               from diffusers' convert_unet_state_dict_to_peft -> convert_state_dict_to_kohya
  embeddings_sdxl.safetensors  the learned tokens as an SDXL textual-inversion embedding: `clip_l` [n, 768] (rows of
                               the first text encoder) and `clip_g` [n, 1280] (the second), the keys those tools read

A full fine-tune's UNet is not converted to the original (ldm) single-file layout: diffusers 0.42.1 ships only the
ldm -> diffusers direction (single_file_utils.convert_ldm_unet_checkpoint); the reverse lives in a repository
script, not the library. unet.safetensors (diffusers names) is what the tar holds for it.
"""

from __future__ import annotations

import torch

from sdxl.formats import SDXL_EMBEDDING_KEYS


def kohya_lora(unet_lora_layers: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """The UNet LoRA (diffusers layout as save_lora_weights takes it, keys without `unet.`) in the kohya layout.
    `lora_alpha` is the one the LoRA trained with: kohya files carry it per module as `.alpha`."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft_layers = convert_unet_state_dict_to_peft(dict(unet_lora_layers))
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_layers.items()})
    for key in [k for k in kohya if k.endswith(".alpha")]:  # the converter writes alpha = rank; ours may differ
        kohya[key] = torch.tensor(float(lora_alpha))
    return {key: value.detach().cpu().contiguous() for key, value in kohya.items()}


def sdxl_embedding(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """embeddings.pti's rows under the keys A1111 / ComfyUI read for SDXL textual inversion."""
    return {SDXL_EMBEDDING_KEYS[key]: rows.detach().cpu().contiguous() for key, rows in embeddings.items()}
