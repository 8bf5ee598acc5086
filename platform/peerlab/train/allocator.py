"""Host memory: keep freed memory for reuse instead of handing it back to the OS every step.

glibc's malloc serves blocks of 32 MiB and more (every table-sized tensor of a PEER step at
N = 1024²: a 1M-row gradient, an optimizer temporary) with a fresh mmap, and gives them back
with munmap when freed. The next step's tensor of the same size then costs new pages, which
the kernel zero-fills on first touch: page faults that scale with the table, not with the
tokens. Turning mmap off for large blocks and never trimming the heap keeps those pages in
the process, so a step reuses the previous step's memory (the process's resident size stays
at its peak rather than falling back between steps). This is glibc's own tuning,
`mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, ...)`, the same as the environment
variables MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_; `benchmarks/step_scaling.py`
measures what it saves. Elsewhere (macOS, musl) it does nothing.

Set PEERLAB_KEEP_FREED_MEMORY=0 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("peerlab.train")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: 2 GiB kept free before a trim


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module's docstring); True where it took."""
    if os.environ.get("PEERLAB_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if not done:
        log.debug("mallopt refused; malloc left as it is")
    return done
