"""Harness for tests and scripts (never imported by the serving code): the real Cog server on 127.0.0.1, a loopback
HTTP file server, builders of trained weights, and /proc readings of the server's processes."""
