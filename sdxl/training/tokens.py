"""Textual inversion (pivotal tuning): new tokens in both tokenizers and text encoders, and only their rows learn.

Every other row of the embedding matrices stays bit-identical: after each backward pass the gradients of the other
rows are zeroed, and the embeddings' optimizer group has no weight decay, so AdamW leaves those rows exactly as
they were.
"""

from __future__ import annotations

import logging

import torch

from sdxl.formats import EMBEDDING_KEYS

log = logging.getLogger(__name__)


class NewTokens:
    def __init__(self, tokens, tokenizers, text_encoders, generator: torch.Generator):
        self.tokens = list(tokens)
        self.text_encoders = list(text_encoders)
        self.ids = [self._add(tokenizer, encoder, generator) for tokenizer, encoder in zip(tokenizers, text_encoders)]
        log.info(
            "textual inversion: new tokens %s (ids %s) in both text encoders, widths %s",
            "".join(self.tokens),
            self.ids[0].tolist(),
            [w.shape[1] for w in self.weights],
        )

    def _add(self, tokenizer, encoder, generator: torch.Generator) -> torch.Tensor:
        """Add the tokens, grow the embedding matrix and initialise the new rows like the existing ones (seeded)."""
        if tokenizer.add_tokens(self.tokens) != len(self.tokens):
            raise ValueError(f"the tokenizer already has one of the tokens {self.tokens}")
        ids = torch.tensor(tokenizer.convert_tokens_to_ids(self.tokens))
        old_rows = encoder.get_input_embeddings().weight.shape[0]
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            std = weight[:old_rows].std().item()
            weight[ids] = torch.randn(len(ids), weight.shape[1], generator=generator).to(weight) * std
        return ids

    @property
    def weights(self) -> list[torch.nn.Parameter]:
        return [encoder.get_input_embeddings().weight for encoder in self.text_encoders]

    def train_only_new_rows(self) -> None:
        """Make the embedding matrices the only trainable part of the text encoders."""
        for encoder in self.text_encoders:
            encoder.requires_grad_(False)
            encoder.get_input_embeddings().weight.requires_grad_(True)

    def mask_gradients(self) -> None:
        """Zero the gradients of every row except the new tokens' (call after backward, before the optimizer)."""
        for weight, ids in zip(self.weights, self.ids):
            if weight.grad is None:
                continue
            kept = weight.grad[ids].clone()
            weight.grad.zero_()
            weight.grad[ids] = kept

    def rows(self) -> dict[str, torch.Tensor]:
        """The learned rows, in token order: embeddings.pti's content."""
        return {
            key: weight.detach()[ids].to(torch.float32).cpu().contiguous()
            for key, weight, ids in zip(EMBEDDING_KEYS, self.weights, self.ids)
        }

    def load_rows(self, rows: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, weight, ids in zip(EMBEDDING_KEYS, self.weights, self.ids):
                weight[ids] = rows[key].to(weight)
