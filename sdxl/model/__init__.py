"""The model: the weights registry, loading, device placement, the fast path, LoRA slots, schedulers, the compute thread."""
