"""mmtok.testbed.allocator: glibc keeps freed memory, so re-allocating a large block faults no pages in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmtok.testbed.allocator import keep_freed_memory

# mallocs, fills and frees 64 MiB five times and reports the page faults of the last four rounds (through
# libc itself: numpy and torch may ask for huge pages, which hide the faults).
PROBE = """
import ctypes, json, resource, sys
from mmtok.testbed.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def round_trip():
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_trip()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_large_blocks() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert kept["applied"] is True
    # 4 rounds x 64 MiB = 65,536 pages: glibc's default mmaps and faults each round in again.
    assert default["faults"] > 50_000
    assert kept["faults"] < 2_000


def test_keep_freed_memory_leaves_a_users_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert keep_freed_memory() is False


@pytest.mark.parametrize("kwargs", [{"top_pad": -1}, {"trim_threshold": 2**31}, {"top_pad": 1.5}])
def test_keep_freed_memory_rejects_values_mallopt_cannot_take(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="0 .. 2147483647"):
        keep_freed_memory(**kwargs)
