"""Fixed-shape LoRA slots for a compiled UNet: switching LoRAs copies numbers and never changes the compiled code.

With SDXL_COMPILE=1 the UNet's transformer blocks are compiled. peft adapters change those blocks' structure when
they are loaded and their Python-float scales when they are set; torch.compile recompiles on each such change
(seconds per block kind on a GPU, and after 8 recompiles it gives up and runs the block eagerly).

Instead, before compiling, every Linear layer inside the UNet's transformer models (attention q/k/v/out, the
feed-forward, proj_in/proj_out: what SDXL LoRAs from diffusers, peft and kohya target) is wrapped once in a
SlotLinear holding one slot of fixed rank R:

    y = W x + U (D x)        D: R x in, U: out x R

A request's LoRAs are written into the slot side by side along the rank dimension,

    sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...]

with each LoRA's scale (the request's scale times its alpha / r) folded into its B block, so any mix of LoRAs whose
ranks add up to at most R per layer runs through the same compiled code. When no LoRA is active the slot is skipped
(`active` is False): a second compiled variant, built during the warm-up, so requests without a LoRA pay nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.errors import InputError

log = logging.getLogger(__name__)

SLOT_SCOPE = "attentions"  # the UNet's Transformer2DModel blocks: down_blocks.*.attentions.*, mid_block.attentions.0
UNET_PREFIX = "unet"


class SlotLinear(nn.Module):
    """A Linear layer plus one fixed-rank LoRA slot (non-persistent buffers: not in state_dict, not parameters)."""

    def __init__(self, base_layer: nn.Linear, rank: int):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.register_buffer("slot_down", weight.new_zeros(rank, base_layer.in_features), persistent=False)
        self.register_buffer("slot_up", weight.new_zeros(base_layer.out_features, rank), persistent=False)
        self.active = False

    # What code that looks inside attention layers reads from a Linear.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.active:
            out = out + F.linear(F.linear(x, self.slot_down), self.slot_up)
        return out


@dataclass(frozen=True)
class SlotLora:
    """One LoRA's UNet part, ready to copy into slots: per layer (A, B with alpha / r folded in), on the device."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def numel(self) -> int:
        return sum(down.numel() + up.numel() for down, up in self.factors.values())


def _unet_part(name: str, state_dict: dict, network_alphas: dict | None, metadata: dict | None):
    """The LoRA's UNet tensors in peft's key layout, and the LoraConfig diffusers would build for them (None when
    the LoRA has no UNet part)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    prefix = f"{UNET_PREFIX}."
    unet_state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not unet_state:
        return unet_state, None
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or None
    if "lora_A" not in next(iter(unet_state)):
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    ranks = {f"^{k}": v.shape[1] for k, v in unet_state.items() if "lora_B" in k and v.ndim > 1}
    alphas = {k.removeprefix(prefix): v for k, v in (network_alphas or {}).items() if k.startswith(prefix)}
    return unet_state, _create_lora_config(unet_state, alphas or None, metadata, ranks, adapter_name=name)


class LoraSlots:
    """The slots of one UNet: install them before compiling, then fill and clear them per request."""

    def __init__(self, layers: dict[str, SlotLinear], rank: int):
        self.layers = layers
        self.rank = rank
        self._used: dict[str, int] = {}  # layer -> columns written by the current fill (all else is zero)

    @classmethod
    def install(cls, unet: nn.Module, rank: int) -> LoraSlots:
        if rank < 1:
            raise ValueError(f"LoRA slot rank must be at least 1, got {rank}")
        layers = {}
        for name, module in list(unet.named_modules()):
            if SLOT_SCOPE not in name.split("."):
                continue
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    slot = SlotLinear(child, rank)
                    setattr(module, child_name, slot)
                    layers[f"{name}.{child_name}"] = slot
        if not layers:
            raise ValueError("no Linear layers found in the UNet's transformer blocks to give LoRA slots")
        count = sum(s.slot_down.numel() + s.slot_up.numel() for s in layers.values())
        log.info("LoRA slots of rank %d on %d UNet layers (%.1fM slot weights)", rank, len(layers), count / 1e6)
        return cls(layers, rank)

    # -- reading a LoRA ---------------------------------------------------------------------------------------------

    def prepare(self, name: str, state_dict: dict, network_alphas: dict | None, metadata: dict | None, field: str):
        """The UNet part of a LoRA (as `lora_state_dict` returns it, any supported format) as a SlotLora.

        Ranks and alphas are read with the same diffusers/peft rules as a normal load (rank and alpha patterns,
        rsLoRA), so the slot computes what a peft adapter would."""
        unet_state, config = _unet_part(name, state_dict, network_alphas, metadata)
        if not unet_state:
            return SlotLora(name, {})
        if config.use_dora or getattr(config, "lora_bias", False):
            raise InputError(field, "DoRA and LoRA-bias adapters are not supported by the compiled UNet's LoRA slots")
        layers = sorted({key.split(".lora_")[0] for key in unet_state})
        outside = [layer for layer in layers if layer not in self.layers]
        if outside:
            raise InputError(
                field,
                f"the LoRA changes {len(outside)} UNet layers outside the transformer blocks (e.g. {outside[0]}); "
                "this server compiles its UNet (SDXL_COMPILE=1) and takes LoRAs on the transformer blocks' linear "
                "layers only (attention, feed-forward, proj_in/proj_out)",
            )
        return SlotLora(name, {layer: self._factors(layer, unet_state, config, field) for layer in layers})

    def _factors(self, layer: str, unet_state: dict, config, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B with the LoRA's alpha / r folded in) for one layer, checked against its slot, on its device."""
        from peft.utils.other import get_pattern_key

        down, up = unet_state.get(f"{layer}.lora_A.weight"), unet_state.get(f"{layer}.lora_B.weight")
        slot = self.layers[layer]
        if down is None or up is None or down.ndim != 2 or up.ndim != 2:
            raise InputError(field, f"the LoRA's layer {layer} needs a 2-D lora_A and lora_B (a linear LoRA)")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), layer), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha)
        if not (down.shape == (rank, slot.in_features) and up.shape == (slot.out_features, rank)):
            raise InputError(
                field,
                f"the LoRA's layer {layer} has shapes {list(down.shape)} and {list(up.shape)}; this model's "
                f"layer is {slot.in_features} -> {slot.out_features}",
            )
        if rank > self.rank:
            raise InputError(
                field,
                f"the LoRA has rank {rank} at {layer}; this server's compiled LoRA slots take rank up to "
                f"{self.rank} (SDXL_LORA_SLOT_RANK)",
            )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        weight = slot.weight
        return (
            down.to(device=weight.device, dtype=weight.dtype).contiguous(),
            (up.to(device=weight.device, dtype=torch.float32) * scaling).to(weight.dtype).contiguous(),
        )

    # -- per request ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def fill(self, loras: list[tuple[SlotLora, float, str]]) -> None:
        """Write these (LoRA, scale, input field) side by side into the slots and turn them on."""
        self.clear()
        offsets = self._used  # kept current while writing, so a refusal half-way clears what was written
        for lora, scale, field in loras:
            for layer, (down, up) in lora.factors.items():
                start = offsets.get(layer, 0)
                end = start + down.shape[0]
                if end > self.rank:
                    self.clear()
                    raise InputError(
                        field,
                        f"together the request's LoRAs need rank {end} at {layer}; this server's compiled LoRA "
                        f"slots hold rank {self.rank} (SDXL_LORA_SLOT_RANK): send fewer or lower-rank LoRAs",
                    )
                slot = self.layers[layer]
                slot.slot_down[start:end].copy_(down)
                slot.slot_up[:, start:end].copy_(up).mul_(scale)
                offsets[layer] = end
        if offsets:
            self.set_active(True)

    @torch.no_grad()
    def clear(self) -> None:
        """Back to the base model: every slot zero and skipped."""
        for layer, used in self._used.items():
            slot = self.layers[layer]
            slot.slot_down[:used].zero_()
            slot.slot_up[:, :used].zero_()
        self._used = {}
        self.set_active(False)

    def set_active(self, active: bool) -> None:
        for slot in self.layers.values():
            slot.active = active

    @property
    def active(self) -> bool:
        return bool(self._used)
