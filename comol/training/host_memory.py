"""Keep freed host memory in the process for reuse (glibc ``mallopt``): CPU training without page-fault storms.

By default glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a
fresh ``mmap`` and returns it to the kernel on ``free``, and it trims the heap top above 128 KiB. A CPU
training step allocates and frees the same activations every step (a [tokens, 49152] logits tensor alone is
140 MiB at 716 tokens on SmolLM2), so every step faults all of them in again, page by page: on the project's
2-core machine, 170k-400k minor faults per step once a batch holds more than ~1,000 tokens, 30-40% of the step
(docs/benchmarks.md, "Host memory"). ``keep_freed_memory`` turns mmap off (``M_MMAP_MAX=0``: every block
comes from the heap) and the trimming off (``M_TRIM_THRESHOLD``): freed blocks stay in the process and the
next step reuses them without a fault.

The cost: the process never hands freed memory back to the kernel, so its resident size stays at its peak.
That is what a training process wants, but not a GPU run, whose host memory peaks while the weights are
loaded, before they move to the device. The job applies it only to fits that run on the CPU
(``trainer.reuse_host_memory``, default true). Other C libraries (musl, macOS) have no ``mallopt``: nothing
is changed there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: the trim threshold set: larger than any heap this process will have (glibc takes an int)
NEVER_TRIM = 2**31 - 1

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()   # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (process-wide, irreversible); True if it is in effect."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        log.info("not glibc: host memory allocation left as it is")
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not _applied:
        log.warning("mallopt refused: host memory allocation left as it is")
    return _applied


def keeps_freed_memory() -> bool:
    """Whether ``keep_freed_memory`` is in effect in this process."""
    return _applied
