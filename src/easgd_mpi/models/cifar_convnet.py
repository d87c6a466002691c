"""The convolutional network of the paper's CIFAR-10 experiment (Zhang, Choromanska & LeCun,
"Deep learning with Elastic Averaging SGD", NIPS 2015, Section 5.1), as a PyTorch module.

As we read the paper: 28×28 random crops of the 32×32 images for training, the centre crop for
testing, per-channel normalisation; three convolutional layers (64 filters 5×5, 128 filters
5×5, 64 filters 3×3), each followed by ReLU and 2×2 max pooling, then fully connected layers of
256 and 256 units and a 10-way softmax output (seven layers with the pooling stages counted as
part of their convolution and the softmax as its own layer). Where the paper leaves a choice
open we chose, and docs/MODELS.md says so: "same" padding, PyTorch's default initialisation,
no local response normalisation, no dropout.
"""

from __future__ import annotations

__all__ = ["build_cifar_convnet", "PAPER_CROP"]

#: The paper's training crop of CIFAR-10's 32×32 images.
PAPER_CROP = 28


def build_cifar_convnet(torch, in_channels: int = 3, image_size: int = PAPER_CROP, classes=10):
    """The network for ``in_channels`` × ``image_size`` × ``image_size`` inputs."""
    nn = torch.nn
    side = image_size
    for _ in range(3):  # each 2×2 pooling halves the side (rounding down)
        side //= 2
    if side < 1:
        raise ValueError(f"images of {image_size}×{image_size} are too small for 3 poolings")
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, classes),
    )
