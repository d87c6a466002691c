"""Data sets for the built-in classification problems, and per-worker minibatch sampling."""

from .builtin import Dataset, load_dataset
from .sampling import worker_rng

__all__ = ["Dataset", "load_dataset", "worker_rng"]
