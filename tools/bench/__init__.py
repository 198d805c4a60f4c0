"""The benchmark: `python -m tools.bench --mode cpu|gpu`."""
