"""The LoRAs a server holds: loaded once, kept resident, switched per request. One interface, three backends.

load_lora_weights(adapter_name=...) puts each LoRA into named peft adapters that stay resident (least recently used
ones are deleted beyond `max_resident`), so switching back to one does not read the disk; activate() sets each
LoRA's weight for the request, deactivate() turns the adapter layers off again. With a compiled UNet (SDXL_COMPILE=1)
the UNet part goes into fixed-shape slots instead (sdxl/model/lora_slots.py), so no switch recompiles; the text-encoder
parts stay peft adapters. A file's LoraConfig metadata is cut to the keys that describe its matrices
(sdxl/trained/lora_metadata.py), and a load that fails leaves the module tree and parameter count exactly as it found them
(sdxl/trained/lora_undo.py).

Which backend a server uses is decided once, by FastPath.lora_backend (sdxl/model/fastpath.py): lora_store_for(pipes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

from diffusers.utils.peft_utils import set_adapter_layers
from safetensors import safe_open

from sdxl.errors import InputError
from sdxl.model.fastpath import PEFT, REFUSED, SLOTS
from sdxl.model.lora_slots import LoraSlots, SlotLora
from sdxl.trained import lora_undo
from sdxl.trained.lora_metadata import allowed_metadata

log = logging.getLogger(__name__)

MAX_RESIDENT = 6
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")


def _first_line(error: BaseException) -> str:
    """The line of a library error that says what is wrong: torch's load_state_dict puts a bare header first and
    the useful "size mismatch for ..." / "Missing key(s) ..." lines after it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(error).__name__)[:300]


def _lora_numel(path: Path, field: str) -> int:
    """The LoRA file's matrices' element count (alphas and other scalars aside): what must land in the model."""
    try:
        with safe_open(path, framework="pt") as file:
            shapes = [tuple(file.get_slice(key).get_shape()) for key in file.keys()]
    except Exception as error:  # safetensors' own error for anything that is not a safetensors file
        raise InputError(field, f"the LoRA file cannot be read as safetensors ({_first_line(error)})") from None
    return sum(math.prod(shape) for shape in shapes if len(shape) >= 2)


class LoraStore:
    """LoRAs as peft adapters on the UNet and both text encoders of `pipe` (every base view shares its modules)."""

    target = "this SDXL model"  # what a LoRA that does not fit is said not to fit
    advice = "is it an SDXL LoRA (diffusers, peft or kohya format)?"

    def __init__(self, pipe, max_resident: int = MAX_RESIDENT):
        self.pipe = pipe
        self.max_resident = max_resident
        self.resident: OrderedDict[str, None] = OrderedDict()  # LoRAs fully loaded, least recently used first

    @property
    def modules(self) -> dict:
        pipe = self.pipe
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}

    def ensure(self, name: str, path: Path, field: str) -> str:
        """The LoRA `name`, loaded from `path` unless already resident. Marked resident only when complete.

        diffusers reads the file itself (safetensors only, never a pickle): it converts kohya/A1111 names and alphas,
        and reads the LoraConfig (rank, alpha) a peft-format file carries in its header."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return name
        started = time.perf_counter()
        before = lora_undo.tree(self.modules)
        complete = False
        try:
            self._load_checked(name, path, field)
            complete = True
        finally:
            if not complete:
                self._forget(name)
                lora_undo.undo_failed_load(self, name, before)
        self.resident[name] = None
        log.info("LoRA %s (%s) loaded in %.2fs", name, field, time.perf_counter() - started)
        self._evict()
        return name

    def _load_checked(self, name: str, path: Path, field: str) -> None:
        expected = _lora_numel(path, field)
        try:
            expected = self._load(name, path, field, expected)
        except InputError:
            raise
        except Exception as error:  # diffusers/peft raise ValueError, RuntimeError (size mismatch), KeyError, ...
            raise InputError(
                field, f"the LoRA does not fit {self.target}: {_first_line(error)}; {self.advice}"
            ) from None
        landed = self.numel(name)
        if landed != expected:
            raise InputError(
                field, f"only {landed} of the LoRA's {expected} weights match layers of {self.target}; {self.advice}"
            )

    def _read(self, path: Path, field: str) -> tuple[dict, dict | None, dict | None]:
        """The LoRA as diffusers reads it for an SDXL pipeline (kohya/A1111 names converted): state, alphas and the
        LoraConfig its header asks for, cut to the keys that describe its matrices (sdxl/trained/lora_metadata.py)."""
        pipe = self.pipe
        state, alphas, metadata = pipe.lora_state_dict(
            str(path), unet_config=pipe.unet.config, use_safetensors=True, return_lora_metadata=True
        )
        if not all("lora" in key for key in state):
            raise InputError(field, "the file is not a LoRA: every tensor name of a LoRA contains 'lora'")
        return state, alphas, allowed_metadata(metadata, field)

    def _load(self, name: str, path: Path, field: str, expected: int) -> int:
        """What load_lora_weights does, with _read's metadata, and the UNet part where this backend keeps it. Returns
        how many matrix elements must land (`expected`: the whole file's)."""
        pipe = self.pipe
        state, alphas, metadata = self._read(path, field)
        self._load_unet_part(name, state, alphas, metadata, field)
        for prefix in TEXT_ENCODER_PREFIXES:
            if any(key.startswith(f"{prefix}.") for key in state):
                pipe.load_lora_into_text_encoder(
                    state,
                    network_alphas=alphas,
                    text_encoder=self.modules[prefix],
                    prefix=prefix,
                    lora_scale=pipe.lora_scale,
                    adapter_name=name,
                    metadata=metadata,
                    _pipeline=pipe,
                )
        return expected

    def _load_unet_part(self, name: str, state: dict, alphas, metadata, field: str) -> None:
        self.pipe.load_lora_into_unet(
            state, network_alphas=alphas, unet=self.pipe.unet, adapter_name=name, metadata=metadata, _pipeline=self.pipe
        )

    def numel(self, name: str) -> int:
        """The LoRA's matrix elements that landed in the model."""
        return sum(
            p.numel()
            for module in self.modules.values()
            for key, p in module.named_parameters()
            if f".{name}." in key and p.ndim >= 2
        )

    def peft_adapter_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def delete_peft_adapter(self, name: str) -> None:
        self.pipe.delete_adapters(name)

    def _forget(self, name: str) -> None:
        self.resident.pop(name, None)

    def remove(self, name: str) -> None:
        """Take a (possibly half-loaded) LoRA out; if that fails, unload every LoRA (all reload on demand)."""
        self._forget(name)
        try:
            if name in self.peft_adapter_names():
                self.delete_peft_adapter(name)
            if lora_undo.has_layers(self.modules, name):
                raise RuntimeError(f"adapter {name} left layers behind")
        except BaseException:
            log.exception("could not delete adapter %s; unloading every LoRA", name)
            self.unload_all()
            raise

    def unload_all(self) -> None:
        self.resident.clear()
        self.pipe.unload_lora_weights()

    def _evict(self) -> None:
        while len(self.resident) > self.max_resident:
            name = next(iter(self.resident))
            self.remove(name)
            log.info("LoRA %s evicted (more than %d resident)", name, self.max_resident)

    def activate(self, active: list[tuple[str, float, str]]) -> None:
        """Turn on these (LoRA, scale, input field) for one request; deactivate() turns them off."""
        if not active:
            return
        started = time.perf_counter()
        present = self.peft_adapter_names()  # with slots, a UNet-only LoRA has no peft adapter at all
        peft_active = [(n, s) for n, s, _ in active if n in present]
        if peft_active:
            self._set_layers(enabled=True)
            self._set_adapters([n for n, _ in peft_active], [s for _, s in peft_active])
        self._fill(active)
        log.info(
            "LoRA switch to %s in %.1f ms",
            ", ".join(f"{n}@{s:g}" for n, s, _ in active),
            1000 * (time.perf_counter() - started),
        )

    def _set_adapters(self, names: list[str], scales: list[float]) -> None:
        self.pipe.set_adapters(names, scales)

    def _fill(self, active: list[tuple[str, float, str]]) -> None:
        """The backend's own part of activate (nothing: peft adapters are all set above)."""

    def deactivate(self) -> None:
        """Back to the base model: every LoRA off (they stay resident)."""
        self._set_layers(enabled=False)

    def _set_layers(self, enabled: bool) -> None:
        if lora_undo.has_layers(self.modules):
            for module in self.modules.values():
                set_adapter_layers(module, enabled=enabled)


class SlotLoras(LoraStore):
    """The compiled UNet's LoRA parts in its fixed-shape slots (filled per request); text-encoder parts as above."""

    def __init__(self, pipe, slots: LoraSlots, max_resident: int = MAX_RESIDENT):
        super().__init__(pipe, max_resident)
        self.slots = slots
        self._unet_parts: dict[str, SlotLora] = {}  # resident LoRAs' UNet parts, ready to copy into the slots

    def _load_unet_part(self, name: str, state: dict, alphas, metadata, field: str) -> None:
        self._unet_parts[name] = self.slots.prepare(name, state, alphas, metadata, field)

    def numel(self, name: str) -> int:
        in_slots = self._unet_parts[name].numel() if name in self._unet_parts else 0
        return in_slots + super().numel(name)

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self._unet_parts.pop(name, None)

    def unload_all(self) -> None:
        super().unload_all()
        self._unet_parts.clear()

    def _fill(self, active: list[tuple[str, float, str]]) -> None:
        self.slots.fill([(self._unet_parts[n], s, field) for n, s, field in active])

    def deactivate(self) -> None:
        super().deactivate()
        if self.slots.active:
            self.slots.clear()


class InpaintingUnetLoras(LoraStore):
    """The UNet parts of LoRAs as peft adapters on the inpainting UNet, loaded on the first request that inpaints with
    it. Its text encoders are the base's: their LoRA parts come from the base's store (the same adapter names), so
    every call here reaches the UNet only, never the pipeline-wide ones that would touch the shared encoders.

    A LoRA trained on the base UNet fits wherever the two UNets agree (every attention and resnet layer); the
    inpainting UNet's conv_in takes 9 channels, so a LoRA on conv_in is refused. The UNet is never compiled, so this
    store is peft with either fast-path LoRA backend."""

    target = "the inpainting UNet (inpaint_model 'inpainting')"
    advice = "use inpaint_model 'base' with it"

    @property
    def modules(self) -> dict:
        return {"unet": self.pipe.unet}

    def _load(self, name: str, path: Path, field: str, expected: int) -> int:
        state, alphas, metadata = self._read(path, field)
        unet_part = {key: value for key, value in state.items() if key.startswith("unet.")}
        if unet_part:  # diffusers only warns about a LoRA with no UNet part; here there is nothing to load
            self._load_unet_part(name, unet_part, alphas, metadata, field)
        return sum(value.numel() for value in unet_part.values() if value.ndim >= 2)

    def peft_adapter_names(self) -> set[str]:
        return set(getattr(self.pipe.unet, "peft_config", {}))

    def delete_peft_adapter(self, name: str) -> None:
        self.pipe.unet.delete_adapters(name)

    def unload_all(self) -> None:
        self.resident.clear()
        if hasattr(self.pipe.unet, "peft_config"):
            self.pipe.unet.unload_lora()

    def _set_adapters(self, names: list[str], scales: list[float]) -> None:
        self.pipe.unet.set_adapters(names, scales)


class RefusedLoras(LoraStore):
    """A server whose fast-path settings take no LoRAs: every LoRA is refused, naming the setting."""

    def __init__(self, pipe, refusal: str):
        super().__init__(pipe)
        self.refusal = refusal

    def ensure(self, name: str, path: Path, field: str) -> str:
        raise InputError(field, self.refusal)


def lora_store_for(pipes, max_resident: int = MAX_RESIDENT) -> LoraStore:
    """The LoRA store for these pipelines, by their fast-path settings' one decision (FastPath.lora_backend)."""
    backend = pipes.fastpath.lora_backend
    if backend.kind == PEFT:
        return LoraStore(pipes.text2img, max_resident)
    if backend.kind == SLOTS:
        return SlotLoras(pipes.text2img, pipes.lora_slots, max_resident)
    return RefusedLoras(pipes.text2img, backend.refusal)


def inpainting_lora_store_for(pipes, max_resident: int = MAX_RESIDENT) -> LoraStore | None:
    """The inpainting UNet's LoRA store, None without that UNet (with REFUSED, the base's store refuses first)."""
    if pipes.inpainting is None:
        return None
    if pipes.fastpath.lora_backend.kind == REFUSED:
        return RefusedLoras(pipes.inpainting, pipes.fastpath.lora_backend.refusal)
    return InpaintingUnetLoras(pipes.inpainting, max_resident)
