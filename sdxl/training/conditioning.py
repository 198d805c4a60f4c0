"""SDXL's text conditioning, as StableDiffusionXLPipeline.encode_prompt computes it, but differentiable.

Both encoders read the caption; their penultimate hidden states are concatenated, and the second encoder's projected
pooled output is the `text_embeds` added condition.
"""

from __future__ import annotations

import torch


def tokenize(tokenizers, captions: list[str]) -> list[torch.Tensor]:
    return [
        tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in tokenizers
    ]


def encode(text_encoders, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, te1 + te2 width], pooled_prompt_embeds [B, te2 projection])."""
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        output = encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled
