"""mmtok: multimodal token reduction for vision-language models.

The public surface (see docs and DESIGN.md): ``VisualTokens``, ``TokenPlan``, ``Budget``,
``list_compressors``, ``create_compressor``, and (from the model adapters) ``load`` and
``compress_then_generate``.
"""

from mmtok.compressors import Compressor, create_compressor, list_compressors, register
from mmtok.core import Budget, RowPlan, TokenPlan, VisualTokens

__version__ = "0.1.0"

# Heavy names load on first use, so ``import mmtok`` imports neither transformers nor PIL.
_LAZY = {"load": "mmtok.api", "compress_then_generate": "mmtok.api", "Result": "mmtok.result"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmtok' has no attribute {name!r}")


__all__ = [
    "Budget",
    "Compressor",
    "Result",
    "RowPlan",
    "TokenPlan",
    "VisualTokens",
    "__version__",
    "compress_then_generate",
    "create_compressor",
    "list_compressors",
    "load",
    "register",
]
