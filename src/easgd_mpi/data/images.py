"""Image data sets read from their published files (CIFAR-10, MNIST), and the memory check that
every loader makes before it allocates what a file's header claims.

Images stay ``uint8`` in ``(N, C, H, W)`` order here: a quarter of the memory of float32, and the
model decides how to scale them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

__all__ = ["ImageSet", "available_memory_bytes", "check_allocation", "human_bytes"]

# When neither /proc/meminfo nor sysconf answers, assume a big machine rather than refuse
# every data set; a real shortage then shows up as a MemoryError instead of a DataError.
_FALLBACK_MEMORY = 1 << 40


@dataclass
class ImageSet:
    """A labelled image data set with a training and a held-out test split."""

    name: str
    x_train: np.ndarray  # uint8, (N, C, H, W)
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray  # uint8, (M, C, H, W)
    y_test: np.ndarray  # int64, (M,)
    n_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def n_features(self) -> int:
        """Values per image once flattened: ``C * H * W``."""
        c, h, w = self.image_shape
        return c * h * w


def available_memory_bytes() -> int:
    """Memory this machine can still hand out, in bytes.

    ``MemAvailable`` counts reclaimable page cache, which is what a fresh allocation can really
    use; physical memory is the fallback where /proc is missing (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    return int(fields[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return int(pages) * int(page_size)
    except (OSError, ValueError, AttributeError):
        pass
    return _FALLBACK_MEMORY


def human_bytes(n: int) -> str:
    """``n`` bytes in decimal units with one decimal: ``784.0 GB``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def check_allocation(nbytes: int, what: str, source) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` (e.g. ``"header claims 10 images of 28×28"``)
    read from ``source`` when this machine does not have that much memory available.

    Called before the allocation, so a damaged or hostile header is a one-line error rather than
    a MemoryError, or the kernel's OOM killer taking down the whole MPI job."""
    available = available_memory_bytes()
    if nbytes > available:
        raise DataError(
            f"{source}: {what} ({human_bytes(nbytes)}), more than this machine's "
            f"{human_bytes(available)} of available memory; is this the right file?"
        )
