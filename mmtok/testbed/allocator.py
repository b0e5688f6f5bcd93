"""Keep freed memory inside the process on glibc, so that CPU training does not fault its tensors in again.

glibc serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB on 64-bit Linux) with a fresh
``mmap`` and returns it to the kernel on ``free``; the next step's tensor of the same size is then faulted in
page by page and zeroed by the kernel. A ``testbed-qwen2vl`` step of 8 images and 8 videos allocates several
such tensors (its video pixels alone are 173 MB), and on the 2-core CPU it took 20 s with ~130k page faults
per second and the CPU mostly in the kernel; with :func:`keep_freed_memory` it took 8 s with no faults after
the first steps (2026-11-28, ``docs/testbed.md``). The same settings as environment variables
(``MALLOC_MMAP_MAX_=0`` ...) work for any process; this applies them from inside ``mmtok testbed train``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# mallopt takes a C int: the largest trim threshold it can set (2 GiB).
_MAX_INT = 2**31 - 1


def keep_freed_memory(top_pad: int = 512 * 2**20, trim_threshold: int = _MAX_INT) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Sets ``M_MMAP_MAX`` to 0 (large blocks come from the heap, not from one ``mmap`` each),
    ``M_TRIM_THRESHOLD`` (free memory at the top of the heap kept before trimming) and ``M_TOP_PAD``
    (extra heap grown per request). The process's resident size then stays near its peak use.

    Args:
        top_pad: bytes of extra heap grown with each ``sbrk`` (0 .. 2**31 - 1).
        trim_threshold: bytes of free heap top kept before returning memory (0 .. 2**31 - 1).

    Returns:
        True when the settings were applied; False on a platform without glibc's ``mallopt`` (macOS,
        Windows, musl) or when the user already chose malloc settings through ``MALLOC_*_`` or
        ``GLIBC_TUNABLES`` environment variables, which are left in force.

    Raises:
        ValueError: ``top_pad`` or ``trim_threshold`` outside ``0 .. 2**31 - 1``.
    """
    for name, value in (("top_pad", top_pad), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise ValueError(f"{name} must be an int in 0 .. {_MAX_INT} (bytes), got {value!r}")
    if not sys.platform.startswith("linux") or _user_chose_malloc_settings():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))


def _user_chose_malloc_settings() -> bool:
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
