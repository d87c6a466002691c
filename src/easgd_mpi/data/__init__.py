"""Data sets for the built-in problems (features, or CIFAR-10 / MNIST images), and per-worker
minibatch sampling."""

from .builtin import Dataset, load_dataset, load_images
from .images import ImageSet
from .sampling import worker_rng

__all__ = ["Dataset", "ImageSet", "load_dataset", "load_images", "worker_rng"]
