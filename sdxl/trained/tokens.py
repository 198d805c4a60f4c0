"""Trained tokens (textual inversion) in and out of both text encoders, and the prompt rewriter that uses them.

Loading: load_textual_inversion into both text encoders and tokenizers under names unique to the weights (see
Trained.tokens); unloading: unload_textual_inversion, also after a half-finished load. The rewriter replaces each
trained word as a whole word (TOK, not inside "TOKyo") and literal <sN> tokens.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace

import torch

from sdxl.errors import InputError
from sdxl.formats import EMBEDDING_KEYS, whole_word
from sdxl.inputs.request import MAX_PROMPT_CHARS, GenerationRequest

log = logging.getLogger(__name__)
LOG_CHARS = 500  # of a rewritten prompt in the log


@dataclass(frozen=True)
class Applied:
    """What a request sees while its weights are applied: the prompt rewriter."""

    rewrites: dict[str, str] = field(default_factory=dict)

    def rewrite_text(self, text: str) -> str:
        if not self.rewrites:
            return text
        words = sorted(self.rewrites, key=len, reverse=True)
        pattern = "|".join(re.escape(w) if w.startswith("<") else whole_word(w) for w in words)
        return re.sub(pattern, lambda m: self.rewrites[m.group(0)], text)

    def rewrite(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its trained words written as their tokens; the longer texts are checked again (and only
        then logged, cut to LOG_CHARS)."""
        prompt, negative = self.rewrite_text(request.prompt), self.rewrite_text(request.negative_prompt)
        for name, text in (("prompt", prompt), ("negative_prompt", negative)):
            if len(text) > MAX_PROMPT_CHARS:
                raise InputError(
                    name,
                    f"is {len(text):,} characters long once its trained words are written as their tokens; "
                    f"at most {MAX_PROMPT_CHARS:,} are accepted",
                )
        if prompt != request.prompt:
            cut = f"... ({len(prompt):,} characters)" if len(prompt) > LOG_CHARS else ""
            log.info("prompt with trained tokens: %r%s", prompt[:LOG_CHARS], cut)
        return replace(request, prompt=prompt, negative_prompt=negative)


class TokenSwap:
    """The tokens of one request at a time in both text encoders of `pipe` (the model's own tokens stay)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.request_tokens: list[str] = []  # loaded for the current request: what a reset takes out

    def _encoders(self):
        pipe = self.pipe
        return ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))

    def widths(self) -> tuple[int, int]:
        return tuple(encoder.get_input_embeddings().weight.shape[1] for encoder, _ in self._encoders())

    def load(self, names: list[str], rows: dict[str, torch.Tensor], for_request: bool = True) -> None:
        if for_request:
            self.request_tokens = names  # before loading: a half-finished load is unloaded too
        started = time.perf_counter()
        for (encoder, tokenizer), key in zip(self._encoders(), EMBEDDING_KEYS):
            self.pipe.load_textual_inversion(rows[key], token=names, text_encoder=encoder, tokenizer=tokenizer)
        log.info("loaded %d trained tokens into both text encoders in %.2fs", len(names), time.perf_counter() - started)

    def unload(self) -> None:
        """Take the request's tokens out of both tokenizers and embedding tables, also after a half-finished load."""
        for encoder, tokenizer in self._encoders():
            present = [name for name in self.request_tokens if name in tokenizer.get_vocab()]
            if present:
                self.pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
            if encoder.get_input_embeddings().weight.shape[0] != len(tokenizer):
                encoder.resize_token_embeddings(len(tokenizer))  # rows a cancelled load added without their tokens
            encoder.config.vocab_size = len(tokenizer)  # unload_textual_inversion leaves the resized count there
        self.request_tokens = []
