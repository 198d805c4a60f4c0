"""A full fine-tune (`unet.safetensors`) in the base UNet and out again.

In: validate keys and shapes against the UNet, then copy into its parameters in place. Out: copy the base back from
a CPU snapshot taken the first time one is needed (bit for bit; no disk read, no device memory). The model's own
full fine-tune (setup) becomes the base: the snapshot is dropped and taken again from it when next needed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open

from sdxl.errors import InputError
from sdxl.trained import weights_cache as wc

log = logging.getLogger(__name__)


def unet_tensors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own parameters and buffers under diffusers' key names, adapter layers (peft, slots) aside."""
    return {
        key.replace(".base_layer.", "."): tensor
        for key, tensor in unet.state_dict(keep_vars=True).items()
        if "lora_" not in key
    }


class UnetSwap:
    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._snapshot: dict[str, torch.Tensor] | None = None
        self.dirty = False  # a request's fine-tune is in the UNet: restore() before anything else

    def check(self, path: Path, field: str) -> Path:
        """`path` if its keys and shapes are exactly this UNet's; else an error naming `field`."""
        expected = unet_tensors(self.unet)
        with safe_open(path, framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        if missing or unexpected:
            raise InputError(
                field,
                f"{wc.UNET_FILE} does not match this SDXL UNet: {len(missing)} keys missing "
                f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})",
            )
        wrong = [k for k, shape in shapes.items() if shape != tuple(expected[k].shape)]
        if wrong:
            k = wrong[0]
            raise InputError(
                field,
                f"{wc.UNET_FILE}: {len(wrong)} tensors have the wrong shape, e.g. {k} is {list(shapes[k])}, "
                f"this model's is {list(expected[k].shape)}",
            )
        return path

    def apply(self, checked: Path) -> None:
        """A request's fine-tune in; restore() takes it out."""
        self._take_snapshot()
        self.dirty = True  # before copying: a copy stopped half-way is restored too
        self.copy_into(checked)

    def make_base(self, checked: Path) -> None:
        """The model's own fine-tune, for good."""
        self.copy_into(checked)
        self._snapshot = None

    def _take_snapshot(self) -> None:
        if self._snapshot is None:
            started = time.perf_counter()
            self._snapshot = {k: t.detach().to("cpu", copy=True) for k, t in unet_tensors(self.unet).items()}
            log.info("base UNet snapshot kept in CPU memory for full fine-tunes (%.1fs)", time.perf_counter() - started)

    @torch.no_grad()
    def copy_into(self, path: Path) -> None:
        targets = unet_tensors(self.unet)
        with safe_open(path, framework="pt") as file:
            for key in file.keys():
                targets[key].copy_(file.get_tensor(key))

    @torch.no_grad()
    def restore(self) -> None:
        if not self.dirty:
            return
        started = time.perf_counter()
        targets = unet_tensors(self.unet)
        for key, tensor in self._snapshot.items():
            targets[key].copy_(tensor)
        self.dirty = False
        log.info("base UNet restored in %.2fs", time.perf_counter() - started)
