"""Trained weights at inference: apply them for one request and leave nothing behind.

What a request can bring (AdapterRequest):
- `replicate_weights`: a trained_model.tar from our trainer (or the hosted one): a UNet LoRA (`lora.safetensors`) or a
  full fine-tune (`unet.safetensors`), new token rows for both text encoders (`embeddings.pti`) and the word they
  stand for (`special_params.json`, e.g. {"TOK": "<s0><s1>"}: row i of each embedding table is token <s{i}>);
- `lora_scale`: the strength of that LoRA (0 = the base model's image, bit for bit);
- `loras`: more LoRA files (diffusers/peft or kohya/A1111/ComfyUI format, safetensors only), each with a scale.

How it is applied (Adapters.applied, a context manager; everything is undone on exit, also on error or cancel):
1. fetch through the WeightsCache (a hit uses no network);
2. a full fine-tune: validate keys and shapes, then copy into the base UNet's parameters in place; on exit copy the
   base back from a CPU snapshot taken the first time one is needed (bit for bit; no disk read, no device memory);
3. tokens: load_textual_inversion into both text encoders and tokenizers under names unique to these weights
   (<s0> becomes <s0-1a2b3c4d5e6f>, so two trained models never collide); unload_textual_inversion on exit;
4. LoRAs: load_lora_weights(adapter_name=...) into named peft adapters that stay resident (least recently used
   ones are deleted beyond `max_resident`), so switching back to one does not read the disk; set_adapters with each
   LoRA's weight activates them for the request and the adapter layers are disabled on exit. With a compiled UNet
   (SDXL_COMPILE=1) the UNet part goes into fixed-shape slots instead (sdxl/lora_slots.py), so no switch recompiles.
   A file's LoraConfig metadata is cut to the keys that describe its matrices (sdxl/lora_metadata.py), and a load
   that fails leaves the module tree and parameter count exactly as it found them;
5. the prompt rewriter replaces each trained word as a whole word (TOK, not inside "TOKyo") and literal <sN> tokens.

The model's own weights (Cog's COG_WEIGHTS / setup(weights)): load_own_weights applies a trained tar for good: its
full fine-tune becomes the base, its tokens stay, its LoRA is an adapter active (at lora_scale) in every request that
does not bring replicate_weights of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers.utils.peft_utils import set_adapter_layers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors import safe_open

from sdxl import remote
from sdxl import weights_cache as wc
from sdxl.compute import compute_bound
from sdxl.errors import InputError
from sdxl.formats import EMBEDDING_KEYS, NEW_TOKEN
from sdxl.loading import Pipelines
from sdxl.lora_metadata import allowed_metadata
from sdxl.lora_slots import SlotLora
from sdxl.request import GenerationRequest

log = logging.getLogger(__name__)

TRAINED_FIELD = "replicate_weights"
LORAS_FIELD = "loras"
OWN_FIELD = "weights"
OWN_TAG = "own"
MAX_LORAS = 4
MAX_LORAS_CHARS = 16 << 10  # four entries with long presigned URLs fit; checked before the JSON is parsed
LORA_SCALE_RANGE = (0.0, 1.0)
EXTRA_SCALE_RANGE = (-2.0, 2.0)
TOKEN = NEW_TOKEN


# ---------------------------------------------------------------------------------------------------------------------
# The request


def _check_scale(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(name, f"{value!r} is not a number")
    if not low <= value <= high:
        raise InputError(name, f"{value} is out of range; allowed: {low} to {high}")
    return float(value)


@dataclass(frozen=True)
class LoraInput:
    url: str
    scale: float = 1.0


def _redacted(item: object) -> object:
    """A `loras` item fit for an error message: no URL query in it (presigned URLs carry credentials there)."""
    if isinstance(item, dict):
        return {key: _redacted(value) for key, value in item.items()}
    if isinstance(item, list):
        return [_redacted(value) for value in item]
    return remote.redact(item) if isinstance(item, str) else item


def parse_loras(text: str | None, field: str = LORAS_FIELD) -> tuple[LoraInput, ...]:
    """The `loras` input: a JSON list of {"url": "https://...", "scale": 0.8} (scale defaults to 1)."""
    if text is None or not str(text).strip():
        return ()
    if len(text) > MAX_LORAS_CHARS:
        raise InputError(field, f"is {len(text):,} characters long; at most {MAX_LORAS_CHARS:,} are accepted")
    try:
        items = json.loads(text)
    except RecursionError:
        raise InputError(field, "is nested too deeply; give a flat list of objects") from None
    except ValueError as error:
        raise InputError(
            field, f'is not valid JSON ({error}); give a list like [{{"url": "https://...", "scale": 0.8}}]'
        ) from None
    if not isinstance(items, list):
        raise InputError(field, 'must be a JSON list like [{"url": "https://...", "scale": 0.8}]')
    if len(items) > MAX_LORAS:
        raise InputError(field, f"{len(items)} LoRAs given; at most {MAX_LORAS} are allowed")
    loras = []
    for i, item in enumerate(items):
        name = f"{field}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("url"), str) or set(item) - {"url", "scale"}:
            raise InputError(name, f'{_redacted(item)!r} must be an object {{"url": "https://...", "scale": 0.8}}')
        loras.append(
            LoraInput(item["url"].strip(), _check_scale(f"{name}.scale", item.get("scale", 1.0), *EXTRA_SCALE_RANGE))
        )
    urls = [lora.url for lora in loras]
    if len(set(urls)) != len(urls):
        raise InputError(field, "the same URL is given twice; give it once with the scale you want")
    return tuple(loras)


@dataclass(frozen=True)
class AdapterRequest:
    replicate_weights: str | None = None
    lora_scale: float = 0.6
    loras: tuple[LoraInput, ...] = ()

    def __post_init__(self):
        if self.replicate_weights is not None and not isinstance(self.replicate_weights, str):
            raise InputError(TRAINED_FIELD, f"{self.replicate_weights!r} is not a URL")
        if isinstance(self.replicate_weights, str) and not self.replicate_weights.strip():
            object.__setattr__(self, "replicate_weights", None)  # an empty string from a form means "none"
        _check_scale("lora_scale", self.lora_scale, *LORA_SCALE_RANGE)


# ---------------------------------------------------------------------------------------------------------------------
# Trained weights, read from an extracted trained_model.tar


@dataclass(frozen=True)
class Trained:
    folder: Path
    tag: str  # unique to these weights: names their adapter and their tokens
    field: str

    def file(self, name: str) -> Path | None:
        path = self.folder / name
        return path if path.is_file() else None

    def _token_count(self, te_widths: tuple[int, int]) -> int:
        """The new tokens' count, from embeddings.pti's header (capped) before any tensor is read."""
        header = wc.safetensors_header(self.folder / wc.EMBEDDINGS_FILE, self.field, wc.EMBEDDINGS_FILE)
        wc.check_token_rows(header, self.field)
        missing = [key for key in EMBEDDING_KEYS if key not in header]
        if missing:
            raise InputError(self.field, f"{wc.EMBEDDINGS_FILE} lacks {', '.join(missing)} (has {', '.join(header)})")
        shapes = {key: tuple(header[key].get("shape") or ()) for key in EMBEDDING_KEYS}
        count = shapes[EMBEDDING_KEYS[0]][0] if len(shapes[EMBEDDING_KEYS[0]]) == 2 else -1
        for key, width in zip(EMBEDDING_KEYS, te_widths):
            if shapes[key] != (count, width) or count < 1:
                raise InputError(
                    self.field,
                    f"{wc.EMBEDDINGS_FILE}: {key} has shape {shapes[key]}; this model needs "
                    f"[{max(count, 1)}, {width}] (one row per new token, as wide as its text encoder)",
                )
        return count

    @property
    def adapter_name(self) -> str:
        return f"trained_{self.tag}"

    def tokens(self, te_widths: tuple[int, int]) -> tuple[dict[str, str], list[str], dict[str, torch.Tensor]]:
        """(prompt rewrites, new token names, rows per encoder), checked against this model's text encoders."""
        token_map = wc.read_token_map(self.folder / wc.SPECIAL_PARAMS_FILE, self.field)
        count = self._token_count(te_widths)
        with safe_open(self.folder / wc.EMBEDDINGS_FILE, framework="pt") as file:  # only the rows checked above
            rows = {key: file.get_tensor(key) for key in EMBEDDING_KEYS}
        names = [f"<s{i}-{self.tag}>" for i in range(count)]
        rewrites = {f"<s{i}>": names[i] for i in range(count)}
        for word, value in token_map.items():
            used = TOKEN.findall(value)
            if TOKEN.sub("", value).strip() or any(int(i) >= count for i in used):
                raise InputError(
                    self.field,
                    f"{wc.SPECIAL_PARAMS_FILE}: {word!r} -> {value!r} must be made of tokens <s0>..<s{count - 1}>",
                )
            rewrites[word] = TOKEN.sub(lambda m: names[int(m.group(1))], value)
        return rewrites, names, {key: rows[key] for key in EMBEDDING_KEYS}


@dataclass(frozen=True)
class Applied:
    """What a request sees while its weights are applied: the prompt rewriter."""

    rewrites: dict[str, str] = field(default_factory=dict)

    def rewrite_text(self, text: str) -> str:
        if not self.rewrites:
            return text
        words = sorted(self.rewrites, key=len, reverse=True)
        pattern = "|".join(re.escape(w) if w.startswith("<") else rf"(?<!\w){re.escape(w)}(?!\w)" for w in words)
        return re.sub(pattern, lambda m: self.rewrites[m.group(0)], text)

    def rewrite(self, request: GenerationRequest) -> GenerationRequest:
        prompt, negative = self.rewrite_text(request.prompt), self.rewrite_text(request.negative_prompt)
        if prompt != request.prompt:
            log.info("prompt with trained tokens: %r", prompt)
        return replace(request, prompt=prompt, negative_prompt=negative)


def _lora_numel(shapes) -> int:
    """LoRA matrices' element count (alphas and other scalars aside): what must land in the model."""
    return sum(math.prod(shape) for shape in shapes if len(shape) >= 2)


def _file_shapes(path: Path, field: str) -> list[tuple[int, ...]]:
    try:
        with safe_open(path, framework="pt") as file:
            return [tuple(file.get_slice(key).get_shape()) for key in file.keys()]
    except Exception as error:  # safetensors' own error for anything that is not a safetensors file
        raise InputError(field, f"the LoRA file cannot be read as safetensors ({_first_line(error)})") from None


# ---------------------------------------------------------------------------------------------------------------------
# The state of one set of pipelines


class Adapters:
    """Applies trained weights to `pipes` per request; one request at a time (the model's modules are shared)."""

    def __init__(self, pipes: Pipelines, cache: wc.WeightsCache | None = None, max_resident: int = 6):
        self.pipes = pipes
        self.pipe = pipes.text2img  # its modules are every base view's modules
        self.cache = cache or wc.WeightsCache.from_env()
        self.max_resident = max(max_resident, MAX_LORAS + 2)  # a request's own adapters are never evicted mid-request
        self._resident: OrderedDict[str, None] = OrderedDict()  # peft adapters fully loaded, least recent first
        self._lock = threading.Lock()
        self._unet_snapshot: dict[str, torch.Tensor] | None = None
        self._unet_dirty = False
        self._request_tokens: list[str] = []
        self._own_rewrites: dict[str, str] = {}
        self._own_lora: Path | None = None  # a private copy: no cache eviction can remove it
        self.slots = pipes.lora_slots  # the compiled UNet's LoRA slots, or None: LoRAs are peft adapters everywhere
        self._slot_loras: dict[str, SlotLora] = {}  # resident LoRAs' UNet parts, when there are slots

    @property
    def _modules(self):
        return {
            "unet": self.pipe.unet,
            "text_encoder": self.pipe.text_encoder,
            "text_encoder_2": self.pipe.text_encoder_2,
        }

    # -- per request ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, request: AdapterRequest) -> Iterator[Applied]:
        """Apply the request's weights for the with-block; on exit (also on error or cancel) the base is back."""
        with self._lock, contextlib.ExitStack() as stack:
            self._reset()
            rewrites = dict(self._own_rewrites)
            active: list[tuple[str, float, str]] = []  # (adapter, scale, input field)
            if request.replicate_weights:
                url = request.replicate_weights
                folder = stack.enter_context(self.cache.open("trained", url, TRAINED_FIELD))
                trained = Trained(folder, wc.url_key(url)[:12], TRAINED_FIELD)
                with self._discard_on_input_error("trained", url):
                    rewrites.update(self._apply_trained(stack, trained))
                    if trained.file(wc.LORA_FILE):
                        adapter = self._ensure_lora(trained.adapter_name, trained.file(wc.LORA_FILE), TRAINED_FIELD)
                        active.append((adapter, request.lora_scale, TRAINED_FIELD))
            elif self._own_lora is not None:
                adapter = self._ensure_lora(f"trained_{OWN_TAG}", self._own_lora, OWN_FIELD)
                active.append((adapter, request.lora_scale, OWN_FIELD))
            for i, lora in enumerate(request.loras):
                name = f"{LORAS_FIELD}[{i}]"
                folder = stack.enter_context(self.cache.open("lora", lora.url, name))
                with self._discard_on_input_error("lora", lora.url):
                    adapter = self._ensure_lora(f"lora_{wc.url_key(lora.url)[:12]}", folder / wc.LORA_FILE, name)
                active.append((adapter, lora.scale, name))
            self._activate(stack, active)
            yield Applied(rewrites)

    def _reset(self) -> None:
        """Whatever an interrupted request may have left: adapters off, request tokens out, base UNet back."""
        self._set_lora_layers(enabled=False)
        if self.slots is not None and self.slots.active:
            self._clear_slots()
        if self._request_tokens:
            self._unload_tokens(self._request_tokens)
        if self._unet_dirty:
            self._restore_unet()

    @contextlib.contextmanager
    def _discard_on_input_error(self, kind: str, url: str):
        """Weights that do not fit this model leave the cache too (nothing left on disk after a refused request)."""
        try:
            yield
        except InputError:
            self.cache.discard(kind, url)
            raise

    def _apply_trained(self, stack: contextlib.ExitStack, trained: Trained) -> dict[str, str]:
        """Steps 2 and 3 for a request's trained weights: UNet swap and tokens, each undone when `stack` closes."""
        if trained.file(wc.UNET_FILE):
            checked = self._check_unet_file(trained.file(wc.UNET_FILE), trained.field)
            self._take_unet_snapshot()
            stack.callback(self._restore_unet)
            self._unet_dirty = True
            self._copy_into_unet(checked)
            log.info("full fine-tune UNet from %s applied", trained.field)
        if not trained.file(wc.EMBEDDINGS_FILE):
            return {}
        rewrites, names, rows = trained.tokens(self._te_widths())
        stack.callback(self._unload_tokens, names)
        self._request_tokens = names
        self._load_tokens(names, rows)
        return rewrites

    # -- LoRA adapters ------------------------------------------------------------------------------------------------

    @compute_bound
    def _ensure_lora(self, name: str, path: Path, field: str) -> str:
        """The LoRA `name`, loaded from `path` unless already resident. Marked resident only when complete.

        diffusers reads the file itself (safetensors only, never a pickle): it converts kohya/A1111 names and alphas,
        and reads the LoraConfig (rank, alpha) a peft-format file carries in its header. Normally every part becomes a
        named peft adapter; with the compiled UNet's LoRA slots the UNet part is kept ready to copy into the slots.
        """
        if name in self._resident:
            self._resident.move_to_end(name)
            return name
        if self.pipes.fastpath.fuse_qkv:
            raise InputError(
                field, "this server runs with fused attention projections (SDXL_FUSE_QKV=1), which cannot take LoRAs"
            )
        if self.pipes.fastpath.compile and self.slots is None:
            raise InputError(
                field, "this server compiles its UNet without LoRA slots (SDXL_COMPILE=1, SDXL_LORA_SLOT_RANK=0)"
            )
        started = time.perf_counter()
        before = self._tree()
        complete = False
        try:
            expected = _lora_numel(_file_shapes(path, field))
            try:
                self._load_lora(name, path, field)
            except InputError:
                raise
            except Exception as error:  # diffusers/peft raise ValueError, RuntimeError (size mismatch), KeyError, ...
                raise InputError(field, f"the LoRA does not fit this SDXL model: {_first_line(error)}") from None
            landed = self._adapter_numel(name)
            if landed != expected:
                raise InputError(
                    field,
                    f"only {landed} of the LoRA's {expected} weights match layers of this SDXL model; "
                    "is it an SDXL LoRA (diffusers, peft or kohya format)?",
                )
            complete = True
        finally:
            if not complete:
                self._undo_failed_load(name, before)
        self._resident[name] = None
        log.info("LoRA %s (%s) loaded in %.2fs", name, field, time.perf_counter() - started)
        self._evict_adapters()
        return name

    def _load_lora(self, name: str, path: Path, field: str) -> None:
        """What load_lora_weights does, with two changes: the LoraConfig the file's header asks for is cut to the keys
        that describe the LoRA's matrices (sdxl/lora_metadata.py), and with the compiled UNet's slots the UNet part is
        prepared for the slots instead of injected as an adapter."""
        state, alphas, metadata = self.pipe.lora_state_dict(
            str(path), unet_config=self.pipe.unet.config, use_safetensors=True, return_lora_metadata=True
        )
        metadata = allowed_metadata(metadata, field)
        if not all("lora" in key for key in state):
            raise InputError(field, "the file is not a LoRA: every tensor name of a LoRA contains 'lora'")
        if self.slots is None:
            self.pipe.load_lora_into_unet(
                state,
                network_alphas=alphas,
                unet=self.pipe.unet,
                adapter_name=name,
                metadata=metadata,
                _pipeline=self.pipe,
            )
        else:
            self._slot_loras[name] = self.slots.prepare(name, state, alphas, metadata, field)
        for encoder, prefix in ((self.pipe.text_encoder, "text_encoder"), (self.pipe.text_encoder_2, "text_encoder_2")):
            if not any(key.startswith(f"{prefix}.") for key in state):
                continue
            self.pipe.load_lora_into_text_encoder(
                state,
                network_alphas=alphas,
                text_encoder=encoder,
                prefix=prefix,
                lora_scale=self.pipe.lora_scale,
                adapter_name=name,
                metadata=metadata,
                _pipeline=self.pipe,
            )

    def _adapter_numel(self, name: str) -> int:
        in_slots = self._slot_loras[name].numel() if name in self._slot_loras else 0
        return in_slots + sum(
            p.numel()
            for module in self._modules.values()
            for key, p in module.named_parameters()
            if f".{name}." in key and p.ndim >= 2
        )

    def _has_layers(self, name: str | None = None) -> bool:
        """Whether any module carries adapter layers (for `name`, or at all), listed in peft's config or not."""
        for module in self._modules.values():
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer) and (name is None or name in getattr(layer, "lora_A", {})):
                    return True
        return False

    def _tree(self) -> tuple[dict[str, type], int]:
        """Every module of the adapted models by name with its type, and the parameter count: what a failed load
        must leave exactly as it found."""
        modules = {
            f"{root}.{name}": type(module)
            for root, model in self._modules.items()
            for name, module in model.named_modules()
        }
        return modules, sum(p.numel() for model in self._modules.values() for p in model.parameters())

    @compute_bound
    def _undo_failed_load(self, name: str, before: tuple[dict[str, type], int]) -> None:
        """Take a half-loaded adapter out and unwrap the modules the load wrapped (peft leaves its wrappers in place
        when an adapter is deleted), so the module tree and parameter count are what they were; if they still are
        not, unload every LoRA (resident ones reload on demand)."""
        self._resident.pop(name, None)
        self._slot_loras.pop(name, None)
        try:
            if name in self._peft_adapter_names():
                self.pipe.delete_adapters(name)
            for model in self._modules.values():
                for layer in model.modules():
                    if isinstance(layer, BaseTunerLayer | AuxiliaryTrainingWrapper):
                        layer.delete_adapter(name, *([None] if isinstance(layer, AuxiliaryTrainingWrapper) else []))
                getattr(model, "peft_config", {}).pop(name, None)
            self._unwrap_new_wrappers(before[0])
        except Exception:
            log.exception("could not take the failed adapter %s out; unloading every LoRA", name)
        if self._tree() != before:
            log.warning("a failed LoRA load changed the model's modules; unloading every LoRA to restore it")
            self._unload_all_loras()

    def _unwrap_new_wrappers(self, before: dict[str, type]) -> None:
        for root, model in self._modules.items():
            for module_name, module in list(model.named_modules()):
                was = before.get(f"{root}.{module_name}")
                if was is None or type(module) is was or model.get_submodule(module_name) is not module:
                    continue
                if isinstance(module, AuxiliaryTrainingWrapper):
                    original = module.original_module
                elif isinstance(module, BaseTunerLayer):
                    original = module.get_base_layer()
                else:
                    continue
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, original)

    @compute_bound
    def _remove_adapter(self, name: str) -> None:
        """Take a (possibly half-loaded) adapter out; if that fails, unload every adapter (all reload on demand)."""
        self._resident.pop(name, None)
        self._slot_loras.pop(name, None)
        try:
            if name in self._peft_adapter_names():
                self.pipe.delete_adapters(name)
            if self._has_layers(name):
                raise RuntimeError(f"adapter {name} left layers behind")
        except BaseException:
            log.exception("could not delete adapter %s; unloading every LoRA", name)
            self._unload_all_loras()
            raise

    @compute_bound
    def _unload_all_loras(self) -> None:
        self._resident.clear()
        self._slot_loras.clear()
        self.pipe.unload_lora_weights()

    def _evict_adapters(self) -> None:
        while len(self._resident) > self.max_resident:
            name, _ = self._resident.popitem(last=False)
            self._remove_adapter(name)
            log.info("LoRA %s evicted (more than %d resident)", name, self.max_resident)

    @compute_bound
    def _set_lora_layers(self, enabled: bool) -> None:
        if not self._has_layers():
            return
        for module in self._modules.values():
            set_adapter_layers(module, enabled=enabled)

    @compute_bound
    def _activate(self, stack: contextlib.ExitStack, active: list[tuple[str, float, str]]) -> None:
        if not active:
            return
        started = time.perf_counter()
        stack.callback(self._set_lora_layers, False)
        present = self._peft_adapter_names()  # with slots, a UNet-only LoRA has no peft adapter at all
        peft_active = [(n, s) for n, s, _ in active if n in present]
        if peft_active:
            self._set_lora_layers(enabled=True)
            self.pipe.set_adapters([n for n, _ in peft_active], [s for _, s in peft_active])
        if self.slots is not None:
            stack.callback(self._clear_slots)
            self.slots.fill([(self._slot_loras[n], s, field) for n, s, field in active])
        log.info(
            "LoRA switch to %s in %.1f ms",
            ", ".join(f"{n}@{s:g}" for n, s, _ in active),
            1000 * (time.perf_counter() - started),
        )

    def _peft_adapter_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    @compute_bound
    def _clear_slots(self) -> None:
        self.slots.clear()

    # -- textual inversion ----------------------------------------------------------------------------------------------

    def _encoders(self):
        return ((self.pipe.text_encoder, self.pipe.tokenizer), (self.pipe.text_encoder_2, self.pipe.tokenizer_2))

    def _te_widths(self) -> tuple[int, int]:
        return tuple(encoder.get_input_embeddings().weight.shape[1] for encoder, _ in self._encoders())

    @compute_bound
    def _load_tokens(self, names: list[str], rows: dict[str, torch.Tensor]) -> None:
        started = time.perf_counter()
        for (encoder, tokenizer), key in zip(self._encoders(), EMBEDDING_KEYS):
            self.pipe.load_textual_inversion(rows[key], token=names, text_encoder=encoder, tokenizer=tokenizer)
        log.info("loaded %d trained tokens into both text encoders in %.2fs", len(names), time.perf_counter() - started)

    @compute_bound
    def _unload_tokens(self, names: list[str]) -> None:
        """Remove these tokens from both tokenizers and embedding tables, also after a half-finished load."""
        for encoder, tokenizer in self._encoders():
            present = [name for name in names if name in tokenizer.get_vocab()]
            if present:
                self.pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
            if encoder.get_input_embeddings().weight.shape[0] != len(tokenizer):
                encoder.resize_token_embeddings(len(tokenizer))  # rows a cancelled load added without their tokens
            encoder.config.vocab_size = len(tokenizer)  # unload_textual_inversion leaves the resized count there
        if names is self._request_tokens:
            self._request_tokens = []

    # -- full fine-tune -------------------------------------------------------------------------------------------------

    def _unet_tensors(self) -> dict[str, torch.Tensor]:
        """The UNet's own parameters and buffers under diffusers' key names, peft adapter layers aside."""
        return {
            key.replace(".base_layer.", "."): tensor
            for key, tensor in self.pipe.unet.state_dict(keep_vars=True).items()
            if "lora_" not in key
        }

    def _check_unet_file(self, path: Path, field: str) -> Path:
        expected = self._unet_tensors()
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

    @compute_bound
    def _take_unet_snapshot(self) -> None:
        if self._unet_snapshot is None:
            started = time.perf_counter()
            self._unet_snapshot = {k: t.detach().to("cpu", copy=True) for k, t in self._unet_tensors().items()}
            log.info("base UNet snapshot kept in CPU memory for full fine-tunes (%.1fs)", time.perf_counter() - started)

    @compute_bound
    @torch.no_grad()
    def _copy_into_unet(self, path: Path) -> None:
        targets = self._unet_tensors()
        with safe_open(path, framework="pt") as file:
            for key in file.keys():
                targets[key].copy_(file.get_tensor(key))

    @compute_bound
    @torch.no_grad()
    def _restore_unet(self) -> None:
        started = time.perf_counter()
        targets = self._unet_tensors()
        for key, tensor in self._unet_snapshot.items():
            targets[key].copy_(tensor)
        self._unet_dirty = False
        log.info("base UNet restored in %.2fs", time.perf_counter() - started)

    # -- the model's own weights (setup) ------------------------------------------------------------------------------

    @compute_bound
    def load_own_weights(self, source: str | Path) -> None:
        """Make a trained tar (a URL, a local .tar or its extracted folder) this model's own weights, for good."""
        started = time.perf_counter()
        with self._lock, contextlib.ExitStack() as stack:
            folder = self._own_folder(stack, source)
            trained = Trained(folder, OWN_TAG, OWN_FIELD)
            if trained.file(wc.UNET_FILE):
                self._copy_into_unet(self._check_unet_file(trained.file(wc.UNET_FILE), OWN_FIELD))
                self._unet_snapshot = None  # the fine-tune is the base now
            if trained.file(wc.EMBEDDINGS_FILE):
                rewrites, names, rows = trained.tokens(self._te_widths())
                self._load_tokens(names, rows)
                self._own_rewrites = rewrites
            if trained.file(wc.LORA_FILE):
                # A private copy for the process's life: it reloads from there if the adapters are ever reset.
                self._own_lora = Path(tempfile.mkdtemp(prefix="sdxl-own-lora-")) / wc.LORA_FILE
                shutil.copyfile(trained.file(wc.LORA_FILE), self._own_lora)
                self._ensure_lora(f"trained_{OWN_TAG}", self._own_lora, OWN_FIELD)
                self._set_lora_layers(enabled=False)
        log.info("own weights from %s loaded in %.1fs", remote.redact(source), time.perf_counter() - started)

    def _own_folder(self, stack: contextlib.ExitStack, source: str | Path) -> Path:
        path = Path(source)
        if isinstance(source, Path) or path.exists():
            if path.is_dir():
                wc.check_trained_files(path, OWN_FIELD)
                return path
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdxl-own-weights-")))
            wc.extract_trained_tar(path, folder, OWN_FIELD, max_bytes=self.cache.limits.max_trained_bytes)
            return folder
        return stack.enter_context(self.cache.open("trained", str(source), OWN_FIELD))


def _first_line(error: BaseException) -> str:
    """The line of a library error that says what is wrong: torch's load_state_dict puts a bare header first and
    the useful "size mismatch for ..." / "Missing key(s) ..." lines after it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(error).__name__)[:300]
