"""Your own PyTorch network with easgd-mpi, through the Python API.

    mpiexec -n 5 python examples/pytorch_model.py [key=value ...]

Everything here is what a user writes: a ``torch.nn.Module`` (a small convnet with BatchNorm and
dropout), a training set as a ``torch.utils.data.Dataset``, a held-out set as tensors, a loss.
``TorchProblem.factory`` turns them into a problem; the package does the rest: rank 0 holds the
center and evaluates it (on its CPU, in eval mode), the other ranks train (on a GPU each where
there is one), and the module's parameters are views of the flat buffers the fused EASGD
kernels update, so no step copies anything. The data is scikit-learn's 8×8 handwritten digits
(shipped with it), seen as 1×8×8 images.
"""

import sys

import numpy as np
import torch

import easgd_mpi as ea
from easgd_mpi.comm import run_or_abort
from easgd_mpi.data import load_dataset


class SmallConvNet(torch.nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),  # running statistics: averaged with the center
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(32 * 4 * 4, classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class DigitImages(torch.utils.data.Dataset):
    """A map-style Dataset, as users already have for their own data."""

    def __init__(self, features, labels):
        self.images = torch.from_numpy(features).reshape(-1, 1, 8, 8)
        self.labels = torch.from_numpy(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def build_model(cfg):
    return SmallConvNet()


def main() -> int:
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
    overrides = {
        "algorithm": "eamsgd",
        "momentum": 0.9,
        "lr": 0.01,
        "steps": 400,
        "batch_size": 32,
        "eval_interval": 1.0,
        **overrides,
    }
    cfg = ea.Config.from_toml(None, overrides=overrides)
    digits = load_dataset(cfg.data)  # features in [0, 1], a fixed train/test split
    train_set = DigitImages(digits.x_train, digits.y_train)
    test_pair = (digits.x_test.reshape(-1, 1, 8, 8), digits.y_test)
    problem = ea.TorchProblem.factory(
        build_model, train_set, test_pair, loss=torch.nn.functional.cross_entropy
    )
    summary = ea.train(cfg, problem=problem)

    # The trained center as a state_dict any PyTorch code can load (rank 0 only).
    from mpi4py import MPI  # noqa: PLC0415

    if MPI.COMM_WORLD.Get_rank() == 0:
        from easgd_mpi.export import export_checkpoint  # noqa: PLC0415
        from easgd_mpi.rundir import list_checkpoints  # noqa: PLC0415

        newest = list_checkpoints(summary["run_dir"])[-1]
        path = export_checkpoint(newest, f"{summary['run_dir']}/model.pt")
        model = SmallConvNet()
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        with torch.no_grad():
            scores = model(torch.from_numpy(test_pair[0]))
        error = float((scores.argmax(1).numpy() != test_pair[1]).mean())
        print(f"exported {path}: held-out error {100 * error:.2f}% with the loaded model")
        if not np.isclose(error, summary["center_error"]) or error > 0.2:
            print("the exported model does not reproduce the center's evaluation")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_or_abort(main))
