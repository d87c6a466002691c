"""The PyTorch problems the config can name: ``model.name = "cifar-convnet"`` (the paper's
network and preprocessing) and ``model.name = "torch"`` with ``model.factory = "pkg.mod:fn"``
(the user's own module), on any of the configured data sets."""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import ConfigError, DataError
from .cifar_convnet import PAPER_CROP, build_cifar_convnet
from .torch_adapter import TorchProblem, build_module, import_torch
from .torch_data import ImageBatches

__all__ = ["make_torch_problem", "resolve_factory", "IMAGE_DATASETS"]

#: Data sets that come as uint8 images (N, C, H, W) with their own held-out split.
IMAGE_DATASETS = ("cifar10", "mnist")


def make_torch_problem(cfg, xp=np) -> TorchProblem:
    """The torch problem of ``cfg.model`` on ``cfg.data``, computing on the device of ``xp``."""
    name = cfg.model.name
    torch = import_torch(f"model.name = '{name}'")
    if name == "cifar-convnet":
        if cfg.data.name not in IMAGE_DATASETS:
            raise ConfigError(
                f"config: model.name = 'cifar-convnet' needs image data (data.name = "
                f"{' or '.join(repr(d) for d in IMAGE_DATASETS)}), not '{cfg.data.name}'"
            )
        crop = cfg.data.crop or PAPER_CROP
        train, test_source, images = _image_sources(torch, cfg, crop)
        side = crop or images.image_shape[1]

        def build(_cfg):
            return build_cifar_convnet(torch, images.image_shape[0], side, images.n_classes)

        module = build_module(torch, build, cfg, "model 'cifar-convnet'")
    elif name == "torch":
        builder = resolve_factory(cfg.model.factory)
        if cfg.data.name in IMAGE_DATASETS:
            train, test_source, _ = _image_sources(torch, cfg, cfg.data.crop)
        else:
            train, test_source = _feature_sources(cfg)
        module = build_module(torch, builder, cfg, f"model.factory '{cfg.model.factory}'")
    else:
        raise ConfigError(f"config: model.name = '{name}' is not a PyTorch model")
    return TorchProblem(
        module,
        train,
        test_source,
        batch_size=cfg.batch_size,
        xp=xp,
        eval_batch=cfg.model.eval_batch,
    )


def resolve_factory(spec: str):
    """``"pkg.module:function"`` → the function (imported like any Python import: it runs the
    module's code with the job's permissions)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"config: model.factory = '{spec}' must be 'module:function' (e.g. "
            f"'mypkg.nets:build'), a function that takes the config and returns a torch.nn.Module"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (any failure inside the user's module)
        raise ConfigError(
            f"config: model.factory = '{spec}': module '{module_name}' does not import "
            f"({exc.__class__.__name__}: {_first_line(exc)}); is it on PYTHONPATH?"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(
                f"config: model.factory = '{spec}': module '{module_name}' has no '{attr}'"
            )
    if not callable(fn):
        raise ConfigError(f"config: model.factory = '{spec}' is not a function")
    return fn


def _image_sources(torch, cfg, crop):
    from ..data import load_images  # noqa: PLC0415

    images = load_images(cfg.data)
    if crop and crop > min(images.image_shape[1:]):
        raise ConfigError(
            f"config: data.crop = {crop} is larger than the {images.image_shape[1]}×"
            f"{images.image_shape[2]} images of data set '{cfg.data.name}'"
        )
    mean, std = _channel_stats(images.x_train)

    # Built on the problem's device when it knows it; the held-out set only on the master.
    def train_on(dev):
        return ImageBatches(
            torch, images.x_train, images.y_train, dev, mean, std, crop, True, cfg.batch_size
        )

    def test_on(dev):
        return ImageBatches(
            torch, images.x_test, images.y_test, dev, mean, std, crop, False, cfg.model.eval_batch
        )

    return train_on, test_on, images


def _feature_sources(cfg):
    from ..data import load_dataset  # noqa: PLC0415

    data = load_dataset(cfg.data, batch_size=cfg.batch_size)
    return (data.x_train, data.y_train), (data.x_test, data.y_test)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images, in slices (no float copy of
    the whole set)."""
    c = x.shape[1]
    total = np.zeros(c)
    squares = np.zeros(c)
    for lo in range(0, x.shape[0], 4096):
        part = x[lo : lo + 4096].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    if np.any(std == 0):
        raise DataError("the training images are constant in some channel: nothing to learn")
    return mean.astype(np.float32), std.astype(np.float32)


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
