"""An extracted trained_model.tar (sdxl/formats.py has its layout): which parts it holds, and its new tokens read
and checked against this model's text encoders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sdxl.errors import InputError
from sdxl.formats import EMBEDDING_KEYS, NEW_TOKEN
from sdxl.trained import weights_cache as wc

OWN_TAG = "own"  # the tag of the model's own weights (setup): <s0-own>, adapter trained_own


@dataclass(frozen=True)
class Trained:
    folder: Path
    tag: str  # names their tokens (loaded for one request at a time: short is enough)
    field: str
    # names their LoRA adapter, which stays resident across requests and is reused by name: the full digest of the
    # weights' URL, so no other URL's weights can ever be taken for them (OWN_TAG for the model's own)
    adapter_key: str = ""

    def file(self, name: str) -> Path | None:
        path = self.folder / name
        return path if path.is_file() else None

    @property
    def adapter_name(self) -> str:
        return f"trained_{self.adapter_key or self.tag}"

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

    def tokens(self, te_widths: tuple[int, int]) -> tuple[dict[str, str], list[str], dict[str, torch.Tensor]]:
        """(prompt rewrites, new token names, rows per encoder), checked against this model's text encoders.

        Token names are unique to these weights (<s0> becomes <s0-1a2b3c4d5e6f>), so two trained models never
        collide."""
        token_map = wc.read_token_map(self.folder / wc.SPECIAL_PARAMS_FILE, self.field)
        count = self._token_count(te_widths)
        with safe_open(self.folder / wc.EMBEDDINGS_FILE, framework="pt") as file:  # only the rows checked above
            rows = {key: file.get_tensor(key) for key in EMBEDDING_KEYS}
        names = [f"<s{i}-{self.tag}>" for i in range(count)]
        rewrites = {f"<s{i}>": names[i] for i in range(count)}
        for word, value in token_map.items():
            used = NEW_TOKEN.findall(value)
            if NEW_TOKEN.sub("", value).strip() or any(int(i) >= count for i in used):
                raise InputError(
                    self.field,
                    f"{wc.SPECIAL_PARAMS_FILE}: {word!r} -> {value!r} must be made of tokens <s0>..<s{count - 1}>",
                )
            rewrites[word] = NEW_TOKEN.sub(lambda m: names[int(m.group(1))], value)
        return rewrites, names, {key: rows[key] for key in EMBEDDING_KEYS}
