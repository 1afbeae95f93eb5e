"""Process memory: give freed weight buffers back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # glibc malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (with errno kept for madvise); None where it cannot be found."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


@functools.cache
def return_freed_buffers(threshold: int = 1 << 20) -> bool:
    """Allocate buffers over `threshold` bytes with their own mappings, returned to the system when
    freed. glibc otherwise raises its threshold to the largest buffer freed so far, so after the
    first weights a pass reads and drops, later ones come from the heap and stay in the process:
    `optimize --tp 2` on a 2.2 GB model peaked at 3.3 GB where its live arrays were 1.1 GB.
    False where the C library is not glibc (nothing changes)."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim): before a phase that
    starts other processes, so this one's high-water mark from the phase before does not stay
    resident beside them. False where the C library is not glibc."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    return malloc_trim is not None and bool(malloc_trim(0))


_MADV_DONTNEED = 4  # linux/mman.h
_PAGE = 4096


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files whose names end with `suffix`."""
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(suffix):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def drop_mapped_pages(spans: list[tuple[int, int]], suffix: str = ".safetensors") -> int:
    """Drop from this process the resident pages of (address, length) spans that lie in a mapping
    of a `suffix` file: they stay in the page cache and fault back in if read again, so nothing is
    lost; only spans inside such file mappings are touched (never anonymous memory, which would be
    zeroed). Returns the bytes dropped."""
    mappings = _file_mappings(suffix)
    libc = _libc()
    if not mappings or libc is None:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for addr, length in spans:
        start, end = -(-addr // _PAGE) * _PAGE, (addr + length) // _PAGE * _PAGE
        inside = end > start and any(lo <= start and end <= hi for lo, hi in mappings)
        if inside and madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped
