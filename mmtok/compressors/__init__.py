"""Compressors: one method per module, each registered by name on import.

Every module of this package is imported here, so dropping a new file in registers its method.
"""

import importlib
import pkgutil

from mmtok.compressors.base import (
    MODALITIES,
    STAGES,
    Compressor,
    compressor_class,
    create_compressor,
    list_compressors,
    register,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "MODALITIES",
    "STAGES",
    "Compressor",
    "compressor_class",
    "create_compressor",
    "list_compressors",
    "register",
]
