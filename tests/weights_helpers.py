"""Test helpers for trained weights; they live in sdxl.testing so that scripts can use them too."""

from sdxl.testing.trained import (  # noqa: F401
    TARGETS,
    embeddings,
    lora_config,
    lora_state,
    save_safetensors,
    tar_bytes,
    te_lora_state,
    to_kohya,
    trained_tar,
    write_lora,
)
from sdxl.testing.weights_server import WeightsServer, loopback_weights_server  # noqa: F401
