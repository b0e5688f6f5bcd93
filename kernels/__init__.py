"""Fast versions of the hot primitives, with the torch references in ``mmtok.core`` as their spec.

Each function here has exactly the signature of its reference plus ``impl=``. The dispatcher picks
Triton for CUDA tensors when Triton imports, else the torch reference; ``MMTOK_KERNELS=torch|triton``
or ``impl="torch"|"triton"`` overrides it. Importing this package never imports triton.
"""

from mmtok.kernels.dispatch import available_impls, best_match, kcenter, merge_tokens, resolve_impl

__all__ = ["available_impls", "best_match", "kcenter", "merge_tokens", "resolve_impl"]
