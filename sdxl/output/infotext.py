r"""Generation parameters as AUTOMATIC1111's `parameters` text, which A1111, ComfyUI readers and Civitai parse.

The layout A1111 writes and reads back (modules/infotext_utils.py):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>            (left out when empty)
    Steps: 50, Sampler: Euler, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: ..., ...

The last line is `key: value` pairs; a value holding ',', ':', '"', a backslash, a tab, a newline or a character of
UNSAFE is JSON-quoted (UNSAFE ones as \uXXXX, which A1111's json.loads reads back). Keys A1111 knows are used
where one fits (Steps, Sampler, CFG scale, Seed, Size, Model, Denoising strength, Refiner, Refiner switch at,
Batch size, Batch pos); the others name this model's own inputs.

Reproducing an image: every output of a request comes from one seed. The pipeline draws all num_outputs starting
latents from one generator seeded with it, so output i is reproduced by the same inputs with the same seed and
num_outputs, taking output i: "Batch size" and "Batch pos" say which (as A1111 writes them; they are left out for a
single output). URLs of weights appear only as host and file name: never a query string or credentials.

A client's text must not forge or break the layout, whatever reader parses it (A1111 strips each line and looks for
"Negative prompt:" at its start; other readers split at "\nNegative prompt:", "\nSteps:" or the words anywhere, or at
splitlines()'s line breaks), nor fail to encode after the images were made:
- newlines stay (A1111 prompts are multi-line; a CR or CRLF becomes one); UNSAFE characters are written as visible
  `\x0b` / `\u2028` text (lone surrogates too: no UTF-8 or UTF-16 encoder writes them);
- a label readers look for ("Negative prompt", "Steps", any case, then ':') gets a backslash before its colon,
  wherever it stands: `Negative prompt\: x` reads as prompt text in every reader and shows that it was escaped
  (a leading space would not do, A1111 strips it; an invisible joiner would mislead a person reading the raw text);
- fit() cuts the prompt and negative prompt, each marked with MARKER, so the text fits its container; the parameters
  line, what readers need most, is kept whole (weight names are at most MAX_NAME_CHARS, so it is small).
The escaping is for display, not reversible: a prompt holding the same escapes reads the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from sdxl.guard import remote
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights

# Our scheduler names -> A1111's sampler names (KarrasDPM is DPM++ 2M with Karras sigmas; PNDM is A1111's PLMS).
SAMPLERS = {
    "DDIM": "DDIM",
    "DPMSolverMultistep": "DPM++ 2M",
    "HeunDiscrete": "Heun",
    "KarrasDPM": "DPM++ 2M Karras",
    "K_EULER_ANCESTRAL": "Euler a",
    "K_EULER": "Euler",
    "PNDM": "PLMS",
}
NEGATIVE_PREFIX = "Negative prompt: "
# A1111's pattern for one `key: value` pair of the last line.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# Never written raw: C0 controls but tab and newline, DEL, C1 (NEL among them), the line and paragraph separators
# (splitlines() breaks at these), lone surrogates.
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
LABEL = re.compile(r"(negative prompt|steps)([^\S\n]*):", re.IGNORECASE)
NEEDS_QUOTES = re.compile(r'[,:"\\\n\t]|' + UNSAFE.pattern)
MARKER = "… [truncated]"
PARTIAL_ESCAPE = re.compile(r"\\(x[0-9a-f]?|u[0-9a-f]{0,3})?$")  # what a cut may leave of `\x0b`, `\u2028`, `\:`
MAX_NAME_CHARS = 120  # a weights' host/file name; longer ones keep both ends


@dataclass(frozen=True)
class Weights:
    """The weights a request used, for the record: the base, and URLs the request brought."""

    model: str  # the base model's name
    own_weights: str | None = None  # a trained tar applied at setup (COG_WEIGHTS)
    replicate_weights: str | None = None
    lora_scale: float = 0.6
    loras: tuple[tuple[str, float], ...] = ()  # (url, scale)

    @classmethod
    def of(cls, random_weights: str | None, own_weights: str | None, adapters) -> Weights:
        """From the loaded model and a request's AdapterRequest (replicate_weights, lora_scale, loras)."""
        return cls(
            model=model_name(random_weights),
            own_weights=own_weights,
            replicate_weights=adapters.replicate_weights,
            lora_scale=adapters.lora_scale,
            loras=tuple((lora.url, lora.scale) for lora in adapters.loras),
        )


def model_name(random_weights: str | None) -> str:
    name = weights.BASE.repo_id.rpartition("/")[2]
    return f"{name} (random {random_weights} test weights)" if random_weights else name


def source_name(url: str) -> str:
    """`host/file` of a URL: what identifies the weights without what may authorise fetching them."""
    text = remote.redact(url)
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
    except ValueError:
        return "(unreadable URL)"
    file = parts.path.rstrip("/").rpartition("/")[2]
    name = f"{host}/{file}" if host else file or "(unnamed)"
    if len(name) <= MAX_NAME_CHARS:
        return name
    half = (MAX_NAME_CHARS - 1) // 2
    return f"{name[:half]}…{name[-half:]}"  # the host and the file's extension stay readable


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """A client's text as it may stand in the prompt lines: no unsafe character, no label a reader splits at."""
    text = UNSAFE.sub(_visible, text.replace("\r\n", "\n").replace("\r", "\n"))
    return LABEL.sub(r"\1\2\\:", text)


def quote(value: object) -> str:
    """A value of the last line as it is, or JSON-quoted where it could end its pair or the line."""
    text = str(value)
    if not NEEDS_QUOTES.search(text) and text == text.strip():
        return text
    quoted = json.dumps(text, ensure_ascii=False)  # escapes C0 controls, not DEL, C1, U+2028 or lone surrogates
    return UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", quoted)


def _number(value: float) -> str:
    return f"{value:g}"


def _pairs(request: GenerationRequest, used: Weights, position: int) -> list[tuple[str, object]]:
    pairs = [
        ("Steps", request.num_inference_steps),
        ("Sampler", SAMPLERS.get(request.scheduler, request.scheduler)),
        ("CFG scale", _number(request.guidance_scale)),
        ("Seed", request.seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", used.model),
    ]
    if request.num_outputs > 1:
        pairs += [("Batch size", request.num_outputs), ("Batch pos", position)]
    if request.mode != "text2img":
        pairs += [("Mode", request.mode), ("Denoising strength", _number(request.prompt_strength))]
    if request.refine != "no_refiner":
        pairs += [("Refiner", weights.REFINER.repo_id.rpartition("/")[2]), ("Refine", request.refine)]
        if request.refine == "expert_ensemble_refiner":
            pairs.append(("Refiner switch at", _number(request.high_noise_frac)))
        else:
            pairs.append(("Refine steps", request.refiner_steps))
    if used.replicate_weights or used.own_weights:
        key, url = (
            ("Replicate weights", used.replicate_weights)
            if used.replicate_weights
            else ("Own weights", used.own_weights)
        )
        pairs += [(key, source_name(url)), ("LoRA scale", _number(used.lora_scale))]
    if used.loras:
        pairs.append(("LoRAs", ", ".join(f"{source_name(url)}: {_number(scale)}" for url, scale in used.loras)))
    if request.prompt_weighting:
        pairs.append(("Prompt weighting", "compel"))
    if request.inpaint_model != "base":
        pairs.append(("Inpaint model", weights.INPAINTING_UNET.repo_id.rpartition("/")[2]))
    if request.uses_image_prompt:  # the image itself is not recorded: only that one steered, and how strongly
        pairs += [("IP-Adapter", weights.IP_ADAPTER_FILE.rpartition("/")[2]),
                  ("IP-Adapter scale", _number(request.ip_adapter_scale))]  # fmt: skip
    return pairs


def parameters(request: GenerationRequest, used: Weights, position: int = 0) -> str:
    """The `parameters` text of output `position` (its index among the request's generated images)."""
    lines = [escape(request.prompt)]
    if request.negative_prompt:
        lines.append(NEGATIVE_PREFIX + escape(request.negative_prompt))
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in _pairs(request, used, position)))
    return "\n".join(lines)


def _cut(block: str, keep: int, prefix: str = "") -> str:
    """`block` with at most `keep` characters after its prefix, MARKER where it was cut (never inside an escape)."""
    body = block[len(prefix) :]
    return block if len(body) <= keep else prefix + PARTIAL_ESCAPE.sub("", body[:keep]) + MARKER


def _longest(fits: Callable[[str], bool], make: Callable[[int], str], high: int) -> str:
    """make(n) for the largest n in [0, high) found by halving where make(n) fits; make(high) does not."""
    low = 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(make(middle)) else (low, middle)
    return make(low)


def fit(text: str, fits: Callable[[str], bool]) -> str:
    """The text, or where fits() refuses it, its prompt and negative prompt cut to the longest length that fits
    (the same for both) and marked; the parameters line stays whole. Never raises: a text without that layout, or
    whose last line alone does not fit, is cut as a whole."""
    text = UNSAFE.sub(_visible, text)  # parameters() leaves none; other callers' texts must encode too
    if fits(text):
        return text
    *lines, last = text.split("\n")
    split = next((i for i, line in enumerate(lines) if line.startswith(NEGATIVE_PREFIX)), len(lines))
    prompt, negative = "\n".join(lines[:split]), "\n".join(lines[split:])

    def cut(keep: int) -> str:
        blocks = [_cut(prompt, keep), _cut(negative, keep, NEGATIVE_PREFIX)] if negative else [_cut(prompt, keep)]
        return "\n".join([*blocks, last])

    if lines and fits(cut(0)):
        return _longest(fits, cut, max(len(prompt), len(negative)))
    return _longest(fits, lambda keep: _cut(text, keep), len(text)) if fits(MARKER) else ""


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from a `parameters` text, read as A1111's parse_generation_parameters
    reads it: each line stripped, the negative prompt from the first line starting "Negative prompt:"."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:  # A1111: a last line with fewer than 3 pairs is part of the prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative, {key: _unquote(value) for key, value in PAIR.findall(last)}


def _unquote(value: str) -> str:
    """A1111's unquote: a value in double quotes is JSON, if it reads as JSON."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def for_outputs(request: GenerationRequest, used: Weights, nsfw: list[bool]) -> list[str]:
    """One text per output that survived the safety checker, each with its position among all generated images."""
    flags = nsfw or [False] * request.num_outputs
    return [parameters(request, used, position) for position, flagged in enumerate(flags) if not flagged]
