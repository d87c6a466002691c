"""PyTorch models on a GPU worker: the module views the CuPy buffers (DLPack, no copies), the
fused CUDA kernels update it, and it learns what the CPU run learns.

Skipped without a usable GPU and a CUDA build of PyTorch (tests/gpu/conftest.py names what is
missing), unless EASGD_TEST_GPU=1 turns that into a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from launching import run, train_command

# PyTorch comes from the torch_on_gpu fixture (tests/gpu/conftest.py), which skips every test
# and says why when it is missing: imported when these tests run, never at collection.
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("torch_on_gpu")]


def _problem(torch, xp, batchnorm=False):
    from easgd_mpi.config import Config
    from easgd_mpi.data import load_dataset
    from easgd_mpi.models import TorchProblem

    data = load_dataset(Config().data)
    layers = [torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    if batchnorm:
        layers.insert(1, torch.nn.BatchNorm1d(32))
    torch.manual_seed(0)
    module = torch.nn.Sequential(*layers)
    pair = (data.x_train, data.y_train)
    return TorchProblem(module, pair, (data.x_test, data.y_test), batch_size=32, xp=xp)


def test_module_views_the_cupy_buffers_and_matches_the_cpu(torch_on_gpu):
    import cupy

    from easgd_mpi.algorithms import make_algorithm
    from easgd_mpi.backend import NumpyBackend
    from easgd_mpi.backend.cupy_backend import CupyBackend
    from easgd_mpi.config import Config
    from easgd_mpi.data.sampling import worker_rng
    from local_center import LocalCenter

    cfg = Config()
    for key, value in {"algorithm": "eamsgd", "momentum": 0.9, "lr": 0.05, "tau": 3}.items():
        cfg.set(key, value)
    runs = []
    for backend in (NumpyBackend(), CupyBackend(device_id=0)):
        prob = _problem(torch_on_gpu, backend.xp, batchnorm=True)
        x0 = prob.layout.zeros()
        prob.init_params(x0, 0)
        center = LocalCenter(x0, chunk=1000)
        algo = make_algorithm(cfg, prob, backend, center, 0.5, worker_rng(0, 0))
        algo.pull_center()
        for t in range(30):
            algo.step(t)
        backend.synchronize()
        runs.append((prob, algo, center))
    (_, cpu, cpu_center), (prob, gpu, gpu_center) = runs
    assert isinstance(gpu.x, cupy.ndarray)
    lo, size = gpu.y.data.ptr, gpu.y.nbytes
    for name, p in prob.module.named_parameters():
        assert p.is_cuda and lo <= p.data_ptr() < lo + size, name
        assert gpu.g.data.ptr <= p.grad.data_ptr() < gpu.g.data.ptr + gpu.g.nbytes, name
    # FMA contraction and cuDNN reductions differ in the last bits: close, not identical.
    np.testing.assert_allclose(cupy.asnumpy(gpu.x), cpu.x, atol=2e-3)
    np.testing.assert_allclose(gpu_center.value, cpu_center.value, atol=2e-3)


def test_torch_and_cupy_share_one_real_stream_and_steps_never_synchronise(torch_on_gpu):
    """PyTorch's current stream is the worker's compute stream (a real stream, not CuPy's
    default), and a worker's steps, CIFAR-style crops included, run under PyTorch's sync debug
    mode "error": any synchronising PyTorch call in a step raises."""
    torch = torch_on_gpu
    import cupy

    from easgd_mpi.algorithms import make_algorithm
    from easgd_mpi.backend.cupy_backend import CupyBackend
    from easgd_mpi.config import Config
    from easgd_mpi.data.sampling import worker_rng
    from easgd_mpi.models import TorchProblem
    from easgd_mpi.models.cifar_convnet import build_cifar_convnet
    from easgd_mpi.models.torch_data import ImageBatches
    from image_files import synthetic_images
    from local_center import LocalCenter

    backend = CupyBackend(device_id=0)
    x, y = synthetic_images(256)
    mean, std = np.full(3, 128, np.float32), np.full(3, 64, np.float32)

    def images(train):
        return lambda dev: ImageBatches(torch, x, y, dev, mean, std, 24, train, 32)

    torch.manual_seed(0)
    module = build_cifar_convnet(torch, 3, 24)
    prob = TorchProblem(module, images(True), images(False), xp=cupy)
    stream = torch.cuda.current_stream()
    assert stream.cuda_stream == cupy.cuda.get_current_stream().ptr == backend.stream.ptr
    assert stream.cuda_stream not in (0, 1, 2)  # a real stream, not a default stream's handle
    x0 = prob.layout.zeros()
    prob.init_params(x0, 0)
    cfg = Config()
    cfg.set("tau", 4)
    algo = make_algorithm(cfg, prob, backend, LocalCenter(x0, chunk=1 << 16), 0.5, worker_rng(0, 0))
    algo.pull_center()
    algo.step(1)  # warm-up: cuDNN's algorithm choice and the allocator may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(2, 12):
            if t % 4:  # local steps (an exchange waits for its chunks, by design)
                algo.step(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    backend.synchronize()
    assert np.all(np.isfinite(cupy.asnumpy(algo.x)))


def test_cifar_convnet_trains_on_gpu_workers(mpiexec, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from easgd_mpi.metrics import read_metrics
    from image_files import write_cifar_folder

    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=100, test=100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    sets = [
        "model.name=cifar-convnet",
        "data.name=cifar10",
        f"data.path={folder}",
        "algorithm=eamsgd",
        "momentum=0.9",
        "lr=0.02",
        "batch_size=32",
        "steps=150",
        "eval_interval=1",
    ]
    proc = run(train_command(mpiexec, 3, tmp_path / "run", *sets), env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on GPU" in proc.stdout.splitlines()[0], proc.stdout
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["center_error"] < 0.3
