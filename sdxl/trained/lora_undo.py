"""Taking a LoRA load that failed half-way back out, so the model's module tree and parameter count are exactly what
they were: peft leaves its wrappers in place when an adapter is deleted, so the modules the load wrapped are
unwrapped; if the model still differs, every LoRA is unloaded (resident ones reload on demand)."""

from __future__ import annotations

import logging

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

log = logging.getLogger(__name__)


def tree(modules: dict) -> tuple[dict[str, type], int]:
    """Every module of the adapted models by name with its type, and the parameter count: what a failed load
    must leave exactly as it found."""
    types = {
        f"{root}.{name}": type(module) for root, model in modules.items() for name, module in model.named_modules()
    }
    return types, sum(model.num_parameters() for model in modules.values())


def has_layers(modules: dict, name: str | None = None) -> bool:
    """Whether any module carries adapter layers (for `name`, or at all), listed in peft's config or not."""
    for model in modules.values():
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and (name is None or name in getattr(layer, "lora_A", {})):
                return True
    return False


def undo_failed_load(store, name: str, before: tuple[dict[str, type], int]) -> None:
    """Take the half-loaded LoRA `name` out of `store` (a LoraStore) and check the model is as `before`."""
    try:
        if name in store.peft_adapter_names():
            store.delete_peft_adapter(name)
        for model in store.modules.values():
            for layer in model.modules():
                if isinstance(layer, BaseTunerLayer | AuxiliaryTrainingWrapper):
                    layer.delete_adapter(name, *([None] if isinstance(layer, AuxiliaryTrainingWrapper) else []))
            getattr(model, "peft_config", {}).pop(name, None)
            if hasattr(model, "peft_config") and not model.peft_config:  # no adapter left: as unload_lora leaves it
                del model.peft_config
                model._hf_peft_config_loaded = None
        _unwrap_new_wrappers(store.modules, before[0])
    except Exception:
        log.exception("could not take the failed adapter %s out; unloading every LoRA", name)
    if tree(store.modules) != before:
        log.warning("a failed LoRA load changed the model's modules; unloading every LoRA to restore it")
        store.unload_all()


def _unwrap_new_wrappers(modules: dict, before: dict[str, type]) -> None:
    for root, model in modules.items():
        for module_name, module in list(model.named_modules()):
            was = before.get(f"{root}.{module_name}")
            if was is None or type(module) is was or model.get_submodule(module_name) is not module:
                continue
            if isinstance(module, AuxiliaryTrainingWrapper):
                original = module.original_module
            elif isinstance(module, BaseTunerLayer):
                original = module.get_base_layer()
            else:
                continue
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, original)
