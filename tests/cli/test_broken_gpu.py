"""A worker that sees a GPU which cannot run the kernels stops the run with one line per rank,
exit code 2, unless the config asked for the CPU fallback.

A stand-in ``cupy`` package (first on PYTHONPATH) reports one usable CUDA device whose NVRTC
refuses to compile, as a CUDA set-up with a compiler newer than the driver would; the run is
the real ``mpiexec -n 2 python -m easgd_mpi train``.
"""

import os

from launching import assert_one_line_per_rank, run, train_command, with_path

FAKE_CUPY = '''
"""One CUDA device that CuPy sees, whose kernels NVRTC cannot compile."""
__version__ = "0.0-broken-nvrtc"


class _Runtime:
    getDeviceCount = staticmethod(lambda: 1)
    getDevice = staticmethod(lambda: 0)
    getDeviceProperties = staticmethod(lambda i: {"multiProcessorCount": 1})


class _Device:
    def __init__(self, index=0):
        self.id = index

    def use(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _Stream:
    ptr = 0x1000

    def __init__(self, non_blocking=False):
        pass

    def use(self):
        return self


class cuda:
    runtime = _Runtime
    Device = _Device
    Stream = _Stream
    is_available = staticmethod(lambda: True)


class RawModule:
    def __init__(self, code):
        raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture (-arch)\\nlog")
'''


def _env(tmp_path):
    fake = tmp_path / "fake-cupy"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    return with_path(env, fake)


def test_a_gpu_that_cannot_compile_the_kernels_stops_the_run(mpiexec, tmp_path):
    proc = run(train_command(mpiexec, 2, tmp_path / "run", "steps=20"), _env(tmp_path))
    assert_one_line_per_rank(proc, 2, "cannot be built for GPU 0")
    assert "device = 'cpu-fallback'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_cpu_fallback_trains_on_numpy_and_says_why(mpiexec, tmp_path):
    cmd = train_command(mpiexec, 2, tmp_path / "run", "steps=20", "device=cpu-fallback")
    proc = run(cmd, _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.splitlines()[0]
    assert "1 on NumPy, no GPU: a GPU is visible but the CUDA kernels" in head, head
