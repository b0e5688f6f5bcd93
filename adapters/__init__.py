"""Model adapters: one per Hugging Face ``config.model_type``, found by name, imported on first use.

An adapter finds a model's visual spans, computes the signals a compressor asks for, splices a
:class:`mmtok.TokenPlan` into the model's inputs and fixes their positions, then hands the shorter
inputs to the model's own ``generate()``. This module stays light: the registry holds module paths,
so ``import mmtok.adapters`` imports neither transformers nor any adapter.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmtok.adapters.base import Adapter

# model_type -> the module that holds its Adapter subclass (the class whose ``model_types`` names it).
_ADAPTERS: dict[str, str] = {
    "llava": "mmtok.adapters.llava",
    "llava_next": "mmtok.adapters.llava_next",
    "llava_onevision": "mmtok.adapters.llava_onevision",
    "qwen2_vl": "mmtok.adapters.qwen2_vl",
    "qwen2_5_vl": "mmtok.adapters.qwen2_vl",
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an adapter."""
    return sorted(_ADAPTERS)


def register_adapter(model_type: str, module: str) -> None:
    """Register the module (``"package.module"``) whose Adapter subclass serves ``model_type``.

    Raises:
        ValueError: if ``model_type`` or ``module`` is not a non-empty string.
    """
    if not (isinstance(model_type, str) and model_type and isinstance(module, str) and module):
        raise ValueError(f"register_adapter takes a model_type and a module path, got {model_type!r}, {module!r}")
    _ADAPTERS[model_type] = module


def adapter_class(model_type: str) -> type[Adapter]:
    """The adapter class registered for ``model_type``.

    Raises:
        ValueError: for a model type without an adapter, naming the supported ones.
    """
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"no mmtok adapter for model_type {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    from mmtok.adapters.base import Adapter

    try:
        module = importlib.import_module(_ADAPTERS[model_type])
    except ModuleNotFoundError as err:
        if err.name != _ADAPTERS[model_type]:
            raise
        raise ValueError(f"the adapter module {_ADAPTERS[model_type]} for {model_type!r} is not installed") from err
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Adapter) and model_type in cls.model_types:
            return cls
    raise ValueError(f"{_ADAPTERS[model_type]} defines no Adapter whose model_types include {model_type!r}")


def get_adapter(model: Any, processor: Any = None) -> Adapter:
    """The adapter for a loaded model (chosen by ``model.config.model_type``).

    Args:
        model: a Hugging Face ``*ForConditionalGeneration`` model.
        processor: its processor (needed to turn prompts and media into inputs).

    Raises:
        ValueError: if the model has no config or its model type has no adapter.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__}")
    return adapter_class(model_type)(model, processor)


__all__ = ["adapter_class", "get_adapter", "register_adapter", "supported_model_types"]
