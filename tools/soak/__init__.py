"""The soak: `python -m tools.soak`, a long mixed stream of requests to the real server."""
