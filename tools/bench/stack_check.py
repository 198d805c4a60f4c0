"""Check, in seconds, that the Python stack here can run the benchmark: every package imports, at versions this
code works with, next to each other; on a GPU machine, that CUDA runs a kernel. Exits non-zero with one line per
problem and what to do about it.

    python3 -m tools.bench.stack_check [--cpu]
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

# (module, distribution, lowest version known to work here, where it comes from when missing)
NEEDED = (
    ("torch", "torch", "2.11", "the machine's image"),
    ("transformers", "transformers", "5.17", "the machine's image"),
    ("accelerate", "accelerate", "1.0", "the machine's image"),
    ("safetensors", "safetensors", "0.8", "the machine's image"),
    ("huggingface_hub", "huggingface_hub", "1.32", "the machine's image"),
    ("cv2", "opencv-python(-headless)", "4.1", "the machine's image"),
    ("diffusers", "diffusers", "0.42", "a carried wheel: bash scripts/device_wheels.sh, carry .whl"),
    ("peft", "peft", "0.21", "a carried wheel: bash scripts/device_wheels.sh, carry .whl"),
    ("pywt", "PyWavelets", "1.1", "a carried wheel: bash scripts/device_wheels.sh, carry .whl"),
    ("imwatermark", "invisible-watermark", "0.2", "a carried wheel: bash scripts/device_wheels.sh, carry .whl"),
)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_imports() -> tuple[list[str], list[str]]:
    found, problems = [], []
    for module, dist, lowest, source in NEEDED:
        try:
            version = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as error:  # noqa: BLE001 - any import failure is the message
            problems.append(f"{dist}: does not import ({type(error).__name__}: {error}); it comes from {source}")
            continue
        found.append(f"{module} {version}")
        if version != "?" and _version_tuple(version) < _version_tuple(lowest):
            problems.append(f"{dist} {version} is older than {lowest}; it comes from {source}")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz").is_file():
        problems.append("open-clip-torch's CLIP vocabulary is missing (the tokenizers need it): carry .whl")
    return found, problems


def check_project() -> list[str]:
    try:
        import sdxl.inference.generation  # noqa: F401
        import sdxl.model.loading  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return [f"the project's modules do not import with this stack: {type(error).__name__}: {error}"]
    return []


def check_cuda() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["torch sees no CUDA device (torch.cuda.is_available() is False)"]
    a = torch.ones(256, 256, device="cuda", dtype=torch.float16)
    if float((a @ a)[0, 0]) != 256.0:
        return ["a 256x256 fp16 matmul on the GPU gave a wrong result"]
    return []


def main() -> None:
    started = time.perf_counter()
    found, problems = check_imports()
    if not problems:
        problems += check_project()
    if not problems and "--cpu" not in sys.argv:
        problems += check_cuda()
    print(f"stack ({time.perf_counter() - started:.1f} s): python {sys.version.split()[0]}, " + ", ".join(found))
    for problem in problems:
        print(f"STACK PROBLEM: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
