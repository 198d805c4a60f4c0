"""Weighted and long prompts (the `prompt_weighting` input): compel's syntax, encoded by compel.

compel's syntax: `word+` / `word-` (x1.1 / x0.9 per sign), `(several words)1.3`, `("a", "b").blend(0.7, 0.3)`,
`("a", "b").and()`; `\\(` and `\\)` are literal parentheses. sdxl/inputs/prompt_syntax.py reads it in time linear in the
length, into the structure compel's own parser returns (proven equal in tests). A prompt longer than CLIP's 77 tokens
is encoded in chunks of 75 tokens (split at a sentence, phrase or word end), each between its own start and end
token, and the chunks' embeddings are concatenated, so every token reaches the UNet instead of being cut off.

What is encoded where (as diffusers' encode_prompt does for plain prompts):
- base: both text encoders' penultimate hidden states side by side, and text_encoder_2's pooled embedding;
- refiner (both refine modes): text_encoder_2 alone, the same encoder object the base uses, so its half of the
  base's embeddings is reused rather than encoded twice.
The pooled embedding reads the prompt's words with the syntax removed, truncated to 77 tokens, and carries no
weights: CLIP pools its end token, which the weights (applied after the encoder) cannot reach. compel itself would
pool the raw text, syntax characters included.

Trained tokens: the prompt arrives with trained words already swapped for their tokens (sdxl/trained/); each
token stands for one embedding row, so no multi-vector expansion is needed, and compel's parser keeps `<s0-...>` as
plain text.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from sdxl.errors import InputError

FIELDS = ("prompt", "negative_prompt")
WEIGHT_RANGE = (0.0, 5.0)  # beyond ~2 images degrade; past 5 the embeddings leave anything the UNet has seen
MAX_CHUNKS = 8  # 8 x 75 = 600 tokens: each chunk costs one text-encoder pass and 77 more cross-attention keys
# Bounded before parsing (the parse is linear in the length: under 50 ms at the caps), and each text is parsed once
# per request (cached).
MAX_CHARS = 3000  # 600 tokens of English run to ~2,500-3,000 characters
MAX_NESTING = 10  # deeper parentheses are refused (compel's own parser overflowed its recursion)
MAX_WORDS = 600  # = MAX_CHUNKS * CHUNK_TOKENS: each word is at least one token, so more are refused before parsing
CHUNK_TOKENS = 75
# A1111's `(word:1.2)` is not compel's syntax; compel would read it as the text "word:1 . 2".
A1111_WEIGHT = re.compile(r"\(([^()]*?):\s*[-+]?(\d+(\.\d*)?|\.\d+)\s*\)")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the syntax


def _unbalanced(text: str) -> str | None:
    depth = 0
    for index, char in enumerate(text):
        if char in "()" and index > 0 and text[index - 1] == "\\":
            continue
        depth += 1 if char == "(" else -1 if char == ")" else 0
        if depth < 0:
            return f"a ')' at character {index + 1} closes nothing"
        if depth > MAX_NESTING:
            return f"parentheses nest more than {MAX_NESTING} deep at character {index + 1}"
    return "a '(' is never closed" if depth > 0 else None


def _fragments(node) -> list:
    """Every weighted fragment of a parsed prompt (Conjunction, Blend, FlattenedPrompt, Fragment)."""
    from compel.prompt_parser import Blend, Conjunction, CrossAttentionControlSubstitute, FlattenedPrompt, Fragment

    if isinstance(node, Fragment):
        return [node]
    if isinstance(node, CrossAttentionControlSubstitute):
        raise ValueError(".swap() (cross-attention control) is not supported here")
    if isinstance(node, Conjunction | Blend | FlattenedPrompt):
        children = node.prompts if isinstance(node, Conjunction | Blend) else node.children
        return [fragment for child in children for fragment in _fragments(child)]
    raise ValueError(f"{type(node).__name__} is not supported here")


def _check_weight(value: float, what: str) -> None:
    low, high = WEIGHT_RANGE
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{what} {value:g} is out of range; allowed: {low:g} to {high:g}")


def parse(text: str, field: str):
    """The compel Conjunction for `text`, or an InputError naming `field` and what is wrong."""
    if len(text) > MAX_CHARS:
        raise InputError(field, f"{len(text)} characters is too long; with prompt_weighting at most {MAX_CHARS}")
    if A1111_WEIGHT.search(text):
        found = A1111_WEIGHT.search(text).group(0)
        raise InputError(field, f"{found!r} is A1111 syntax; with prompt_weighting write (words)1.2 or words++")
    words = len(text.split())
    if words > MAX_WORDS:
        raise InputError(field, f"{words} words is too long; with prompt_weighting at most {MAX_WORDS} tokens are read")
    problem = _unbalanced(text)
    if problem:
        raise InputError(field, f"weighting syntax: {problem} (escape a literal parenthesis as \\( or \\))")
    try:
        return _parse_checked(text)
    except ValueError as error:  # prompt_syntax.Refused or one of the weight checks
        raise InputError(field, f"weighting syntax: {error}") from None


@functools.lru_cache(maxsize=16)
def _parse_checked(text: str):
    """Parsed once per text: a request parses its prompts when checked, again after the trained-token swap, and
    when encoded. Conjunctions are only read afterwards, so sharing them is safe."""
    from compel.prompt_parser import Blend

    from sdxl.inputs import prompt_syntax  # compel loads only for requests that use it

    conjunction = prompt_syntax.parse_conjunction(text, MAX_NESTING)
    for fragment in _fragments(conjunction):
        _check_weight(fragment.weight, f"the weight of {fragment.text!r}")
    for weight in conjunction.weights:
        _check_weight(weight, "an .and() weight")
    for node in conjunction.prompts:
        for weight in node.weights if isinstance(node, Blend) else ():
            _check_weight(weight, "a .blend() weight")
    return conjunction


def clear_parse_cache() -> None:
    """For measurements of the uncached cost."""
    _parse_checked.cache_clear()


def plain_text(conjunction) -> str:
    """The prompt's words without the syntax: what the pooled embedding reads."""
    return " ".join(fragment.text for fragment in _fragments(conjunction) if fragment.text.strip())


def check_syntax(prompt: str, negative_prompt: str) -> None:
    for field, text in zip(FIELDS, (prompt, negative_prompt)):
        parse(text, field)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class PromptEmbeds:
    """What diffusers' SDXL pipelines take instead of prompt strings."""

    prompt_embeds: torch.Tensor  # [batch, tokens (a multiple of 77), width]
    pooled_prompt_embeds: torch.Tensor  # [batch, projection]
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor

    def as_kwargs(self) -> dict:
        return dict(vars(self))

    def repeated(self, count: int) -> PromptEmbeds:
        return PromptEmbeds(
            **{name: value.repeat(count, *([1] * (value.ndim - 1))) for name, value in vars(self).items()}
        )

    def columns(self, start: int) -> PromptEmbeds:
        """The token embeddings from column `start` on (one encoder's half); pooled embeddings as they are."""
        return PromptEmbeds(
            self.prompt_embeds[..., start:],
            self.pooled_prompt_embeds,
            self.negative_prompt_embeds[..., start:],
            self.negative_pooled_prompt_embeds,
        )


def _compel(tokenizer, encoder):
    from compel import Compel, ReturnedEmbeddingsType

    return Compel(
        tokenizer=tokenizer,
        text_encoder=encoder,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        truncate_long_prompts=False,
        dtype_for_device_getter=lambda device: encoder.dtype,
        device=encoder.device,
    )


def _check_length(tokenizer, field: str, text: str) -> None:
    count = len(tokenizer(text, truncation=False, add_special_tokens=False).input_ids)
    if count > MAX_CHUNKS * CHUNK_TOKENS:
        raise InputError(
            field, f"{count} tokens is too long; with prompt_weighting at most {MAX_CHUNKS * CHUNK_TOKENS} are read"
        )


def _pad_to(embeds: torch.Tensor, tokens: int, empty: torch.Tensor) -> torch.Tensor:
    """Pad with the empty prompt's 77-token encoding, as compel pads a shorter prompt to a longer one."""
    while embeds.shape[1] < tokens:
        embeds = torch.cat([embeds, empty.to(embeds.dtype).expand(embeds.shape[0], -1, -1)], dim=1)
    return embeds


def encode(tokenizers, encoders, prompt: str, negative_prompt: str) -> PromptEmbeds:
    """Weighted, chunked embeddings of both prompts through `encoders` (side by side, last one pooled).

    Positive and negative come out with the same token count: the shorter is padded with empty-prompt chunks."""
    conjunctions = [parse(text, field) for field, text in zip(FIELDS, (prompt, negative_prompt))]
    for field, text in zip(FIELDS, (prompt, negative_prompt)):
        _check_length(tokenizers[-1], field, text)
    per_encoder, empties = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        compel = _compel(tokenizer, encoder)
        per_encoder.append([compel.build_conditioning_tensor_for_conjunction(c)[0] for c in conjunctions])
        empties.append(compel.conditioning_provider.empty_z)
    tokens = max(embeds.shape[1] for pair in per_encoder for embeds in pair)
    padded = [[_pad_to(e, tokens, empty) for e in pair] for pair, empty in zip(per_encoder, empties)]
    positive, negative = (torch.cat([pair[i] for pair in padded], dim=-1) for i in (0, 1))
    pooler = _compel(tokenizers[-1], encoders[-1]).conditioning_provider
    # one text per encoder call, as diffusers encodes them: a batch of two rounds differently in the last bits
    pooled = torch.cat([pooler.get_pooled_embeddings([plain_text(c)]) for c in conjunctions])
    dtype = encoders[-1].dtype
    return PromptEmbeds(positive.to(dtype), pooled[:1].to(dtype), negative.to(dtype), pooled[1:].to(dtype))


def encode_base(pipe, prompt: str, negative_prompt: str) -> PromptEmbeds:
    return encode((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), prompt, negative_prompt)


def encode_refiner(refiner, base, base_embeds: PromptEmbeds, prompt: str, negative_prompt: str) -> PromptEmbeds:
    """The refiner reads text_encoder_2 only: the base's second half when the encoder is shared, else its own."""
    if refiner.text_encoder_2 is base.text_encoder_2 and refiner.tokenizer_2 is base.tokenizer_2:
        return base_embeds.columns(base.text_encoder.config.hidden_size)
    return encode((refiner.tokenizer_2,), (refiner.text_encoder_2,), prompt, negative_prompt)
