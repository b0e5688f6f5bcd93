"""mmtok: multimodal token reduction for vision-language models.

The public surface (see docs and DESIGN.md): ``VisualTokens``, ``TokenPlan``, ``Budget``,
``list_compressors``, ``create_compressor``, and (from the model adapters) ``load`` and
``compress_then_generate``.
"""

from mmtok.compressors import Compressor, create_compressor, list_compressors, register
from mmtok.core import Budget, RowPlan, TokenPlan, VisualTokens

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Compressor",
    "RowPlan",
    "TokenPlan",
    "VisualTokens",
    "__version__",
    "create_compressor",
    "list_compressors",
    "register",
]
