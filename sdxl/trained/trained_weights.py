"""Trained weights at inference: apply them for one request and leave nothing behind (the steps are in applied()).

The model's own weights (Cog's COG_WEIGHTS / setup(weights)): load_own_weights applies a trained tar for good: its
full fine-tune becomes the base, its tokens stay, its LoRA is resident and active (at lora_scale) in every request
that does not bring replicate_weights of its own.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sdxl.errors import InputError
from sdxl.guard.request_deadline import RequestDeadline
from sdxl.guard.url_policy import redact
from sdxl.model.compute import stop_if_cancelled
from sdxl.trained import weights_cache as wc
from sdxl.trained.lora_store import MAX_RESIDENT, LoraStore, inpainting_lora_store_for, lora_store_for
from sdxl.trained.request import LORAS_FIELD, MAX_LORAS, OWN_FIELD, TRAINED_FIELD, AdapterRequest, LoraInput
from sdxl.trained.tokens import Applied, TokenSwap
from sdxl.trained.trained_tar import OWN_TAG, Trained
from sdxl.trained.unet_swap import UnetSwap

log = logging.getLogger(__name__)

Active = tuple[str, float, str]  # (LoRA name, scale, input field)


class TrainedWeights:
    """Applies trained weights to `pipes` per request; one request at a time (the model's modules are shared).
    `loras` defaults to the store the fast-path settings call for (sdxl.trained.lora_store.lora_store_for)."""

    def __init__(self, pipes, cache: wc.WeightsCache | None = None, loras: LoraStore | None = None):
        pipe = pipes.text2img  # its modules are every base view's modules
        self.pipes = pipes
        self.cache = cache or wc.WeightsCache.from_env()
        # A request's own LoRAs are never evicted mid-request: room for all of them and two more.
        resident = max(MAX_RESIDENT, MAX_LORAS + 2)
        self.loras = loras or lora_store_for(pipes, resident)
        # The LoRAs' UNet parts on the inpainting UNet too, for requests that inpaint with it (None without that UNet)
        self.inpainting_loras = inpainting_lora_store_for(pipes, resident)
        self.tokens = TokenSwap(pipe)
        self.unet = UnetSwap(pipe.unet)
        self._lock = threading.Lock()
        self._own_rewrites: dict[str, str] = {}
        self._own_lora: tuple[str, Path] | None = None  # (name, a private copy: no cache eviction can remove it)
        self._own_unet = False  # the model's own full fine-tune is the base UNet

    @property
    def has_own_weights(self) -> bool:
        """The model's own LoRA or fine-tuned UNet is part of every request."""
        return self._own_lora is not None or self._own_unet

    @property
    def has_own_full_finetune(self) -> bool:
        """The model's own weights replaced the base UNet's (the inpainting UNet cannot take them)."""
        return self._own_unet

    @contextlib.contextmanager
    def applied(
        self,
        request: AdapterRequest,
        cancelled: threading.Event | None = None,
        deadline: RequestDeadline | None = None,
        inpainting: bool = False,
    ) -> Iterator[Applied]:
        """Apply the request's weights for the with-block; on exit (also on error or cancel) the base is back.
        Every fetch ends by the request's `deadline` (when given), and a cancel stops a running one. `inpainting`:
        the request denoises with the inpainting UNet, so its LoRAs go onto that UNet too.

        1. undo whatever an interrupted request may have left;
        2. replicate_weights: fetch through the WeightsCache (a hit uses no network), then its full fine-tune, its
           tokens and its LoRA; without them, the model's own LoRA;
        3. loras: fetch each and make it resident;
        4. turn the request's LoRAs on at their scales;
        5. yield the prompt rewriter.
        What steps 2-4 change is undone when the with-block exits; a cancel is checked between steps."""
        with self._lock, contextlib.ExitStack() as stack:
            self._reset()  # 1
            rewrites, active = dict(self._own_rewrites), []
            if request.replicate_weights:  # 2
                trained_rewrites, active = self._apply_trained(stack, request, cancelled, deadline, inpainting)
                rewrites.update(trained_rewrites)
            elif self._own_lora is not None:
                active = [(self._ensure(*self._own_lora, OWN_FIELD, inpainting), request.lora_scale, OWN_FIELD)]
            for i, lora in enumerate(request.loras):  # 3
                stop_if_cancelled(cancelled, "while loading LoRAs")
                active.append(self._extra_lora(stack, f"{LORAS_FIELD}[{i}]", lora, deadline, inpainting))
            stop_if_cancelled(cancelled, "before the LoRAs were turned on")
            if active:  # 4
                stack.callback(self._deactivate)
                self.loras.activate(active)  # the base UNet's and the (shared) text encoders' parts
                if inpainting:
                    self.inpainting_loras.activate(active)
            yield Applied(rewrites)  # 5

    def _ensure(self, name: str, path: Path, field: str, inpainting: bool) -> str:
        """The LoRA resident in the base's store (text encoders and base UNet), and with `inpainting` on the
        inpainting UNet too."""
        self.loras.ensure(name, path, field)
        if inpainting:
            self.inpainting_loras.ensure(name, path, field)
        return name

    def _deactivate(self) -> None:
        self.loras.deactivate()
        if self.inpainting_loras is not None:
            self.inpainting_loras.deactivate()

    def _reset(self) -> None:
        """Whatever an interrupted request may have left: LoRAs off, request tokens out, base UNet back."""
        self._deactivate()
        if self.tokens.request_tokens:
            self.tokens.unload()
        self.unet.restore()

    def _apply_trained(
        self,
        stack: contextlib.ExitStack,
        request: AdapterRequest,
        cancelled: threading.Event | None,
        deadline: RequestDeadline | None,
        inpainting: bool,
    ) -> tuple[dict[str, str], list[Active]]:
        """Step 2 for a request's trained weights: (prompt rewrites, its LoRA to turn on)."""
        url = request.replicate_weights
        folder = stack.enter_context(self.cache.open("trained", url, TRAINED_FIELD, deadline))
        trained = Trained(folder, wc.url_key(url)[:12], TRAINED_FIELD, adapter_key=wc.url_key(url))
        if inpainting and trained.file(wc.UNET_FILE):  # the weights are sound (they stay cached); the mix is not
            raise InputError(
                TRAINED_FIELD,
                f"holds a full fine-tune of the base UNet ({wc.UNET_FILE}), which the inpainting UNet cannot take; "
                "use inpaint_model 'base' with these weights",
            )
        with self._discard_on_input_error("trained", url):
            stop_if_cancelled(cancelled, "after the trained weights were fetched")
            if trained.file(wc.UNET_FILE):
                checked = self.unet.check(trained.file(wc.UNET_FILE), TRAINED_FIELD)
                stack.callback(self.unet.restore)
                self.unet.apply(checked)
                log.info("full fine-tune UNet from %s applied", TRAINED_FIELD)
            rewrites = self._apply_tokens(stack, trained)
            if not trained.file(wc.LORA_FILE):
                return rewrites, []
            stop_if_cancelled(cancelled, "before the trained LoRA was loaded")
            adapter = self._ensure(trained.adapter_name, trained.file(wc.LORA_FILE), TRAINED_FIELD, inpainting)
        return rewrites, [(adapter, request.lora_scale, TRAINED_FIELD)]

    def _apply_tokens(self, stack: contextlib.ExitStack, trained: Trained) -> dict[str, str]:
        if not trained.file(wc.EMBEDDINGS_FILE):
            return {}
        rewrites, names, rows = trained.tokens(self.tokens.widths())
        stack.callback(self.tokens.unload)
        self.tokens.load(names, rows)
        return rewrites

    def _extra_lora(
        self,
        stack: contextlib.ExitStack,
        field: str,
        lora: LoraInput,
        deadline: RequestDeadline | None,
        inpainting: bool,
    ) -> Active:
        folder = stack.enter_context(self.cache.open("lora", lora.url, field, deadline))
        with self._discard_on_input_error("lora", lora.url):
            # the full digest: a resident adapter is reused by name, so a name must stand for one URL only
            adapter = self._ensure(f"lora_{wc.url_key(lora.url)}", folder / wc.LORA_FILE, field, inpainting)
        return adapter, lora.scale, field

    @contextlib.contextmanager
    def _discard_on_input_error(self, kind: str, url: str):
        """Weights that do not fit this model leave the cache too (nothing left on disk after a refused request)."""
        try:
            yield
        except InputError:
            self.cache.discard(kind, url)
            raise

    def load_own_weights(self, source: str | Path) -> None:
        """Make a trained tar (a URL, a local .tar or its extracted folder) this model's own weights, for good."""
        started = time.perf_counter()
        with self._lock, contextlib.ExitStack() as stack:
            trained = Trained(self._own_folder(stack, source), OWN_TAG, OWN_FIELD)
            if trained.file(wc.UNET_FILE):
                self.unet.make_base(self.unet.check(trained.file(wc.UNET_FILE), OWN_FIELD))
                self._own_unet = True
            if trained.file(wc.EMBEDDINGS_FILE):
                self._own_rewrites, names, rows = trained.tokens(self.tokens.widths())
                self.tokens.load(names, rows, for_request=False)
            if trained.file(wc.LORA_FILE):
                # A private copy for the process's life: it reloads from there if the LoRAs are ever reset.
                copy = Path(tempfile.mkdtemp(prefix="sdxl-own-lora-")) / wc.LORA_FILE
                shutil.copyfile(trained.file(wc.LORA_FILE), copy)
                self._own_lora = (trained.adapter_name, copy)
                self.loras.ensure(*self._own_lora, OWN_FIELD)
                self.loras.deactivate()
        log.info("own weights from %s loaded in %.1fs", redact(source), time.perf_counter() - started)

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
