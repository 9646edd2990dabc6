"""The C library's allocator, set for a CPU prefill's large tensors.

glibc hands a block past its mmap threshold (128 KiB at first, raised as such blocks are freed,
to 32 MiB at most) to ``mmap``, and gives freed memory at the top of its heap back to the system
past its trim threshold. A 32k prompt's activations are 38–100 MB a tensor: every one of them
was mapped afresh and its pages faulted in as the pass that fills it first wrote them, which
took about as long as the pass. With both thresholds at 1 GiB, freed blocks are reused from the
heap instead: the default model's 32k prefill in bfloat16 on the 2-core Xeon took 29.4 s
against 37.5 s, and peaked at 2.41 against 2.49 GB (BENCHMARKS.md).
"""

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
HEAP_BLOCKS_UP_TO = 1 << 30  # bytes
# Set, glibc reads them at start-up: the user's own choice stands.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_blocks_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds to ``HEAP_BLOCKS_UP_TO``, unless the environment
    sets either; whether they were raised (False off glibc)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    raised = mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO) == 1
    return raised and mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCKS_UP_TO) == 1
