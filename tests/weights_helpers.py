"""Test helpers for trained weights and the loopback file server; they live in sdxl.testing so that scripts can use
them too."""

from sdxl.testing.file_server import FileServer, loopback_file_server  # noqa: F401
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
