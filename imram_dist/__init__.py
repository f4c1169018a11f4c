"""imram-dist: train and compare IMRAM image-text retrieval models at scale."""

import ctypes
import os
import platform

# Two process-wide memory settings for pair scoring, which allocates ~300 MB temporaries per block
# (the per-pair queries and gate inputs) and frees them a few milliseconds later. With glibc's
# defaults each one is a fresh mmap whose first touch page-faults 4 KB at a time, which cost as
# much as the elementwise pass over it. Both are set on import, so every process started from here
# (CLIs, Ray workers, evaluation workers, benchmarks) has them; each can be turned off with "0".
#
# 1. Transparent huge pages for torch's CPU tensors of 2 MB and more: a documented torch switch,
#    read once at torch's first allocation, so it only takes effect where imram_dist is imported
#    before torch. Ray workers of a cluster get it through the job's runtime_env
#    (train.driver.job_env).
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
# 2. Keep freed memory in the process's heap (glibc mallopt: no mmap for large blocks, no trim), so
#    the next block reuses pages that are already mapped. Peak RSS is then not returned to the OS
#    until the process ends. Together with 1: paper-size training steps ~25-35% faster
#    (benchmarks/bench_model.py prints both settings).
KEEP_FREED_MEMORY_ENV = "IMRAM_KEEP_FREED_MEMORY"

os.environ.setdefault(HUGE_PAGES_ENV, "1")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no-op elsewhere); True when it was applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


if os.environ.setdefault(KEEP_FREED_MEMORY_ENV, "1") == "1":
    keep_freed_memory()

__version__ = "0.1.0"
