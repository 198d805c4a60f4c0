"""Test helpers for the real Cog server; they live in sdxl.testing so that scripts can use them too."""

from sdxl.testing.cog_server import (  # noqa: F401
    HOST,
    ROOT,
    TERMINAL,
    CogServer,
    WebhookReceiver,
    decode_png,
    free_port,
    png_data_uri,
)
