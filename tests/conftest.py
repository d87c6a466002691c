"""Shared test set-up.

Under ``mpiexec ... pytest --with-mpi`` (pytest-mpi) every rank runs every test. Two hooks keep
such runs sane: a failure on any rank aborts the whole MPI job at once (otherwise the other
ranks wait forever in the test's next collective), and only rank 0 reports, so the output is
one readable summary.

Optional heavy libraries (PyTorch, matplotlib) come from the fixtures below, imported when a
test first needs them: collecting the suite imports neither (PyTorch alone takes seconds, and
every pytest-xdist worker collects the whole suite).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _mpi_enabled(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not _mpi_enabled(config):
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() != 0:
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the markers
def pytest_collection_modifyitems(items):
    """One GPU, one test on it at a time: under pytest-xdist (``--dist loadgroup``) every
    ``gpu`` test runs in the same worker, while the CPU tests run beside them."""
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.xdist_group("gpu"))


def pytest_runtest_logreport(report):
    if report.failed and "mpi" in report.keywords:
        from mpi4py import MPI

        if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
            rank = MPI.COMM_WORLD.Get_rank()
            sys.stderr.write(f"\n[rank {rank}] {report.nodeid} failed:\n{report.longreprtext}\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)


@pytest.fixture(scope="session")  # session-wide: module fixtures launch runs too
def mpiexec() -> str:
    """The launcher that belongs to this interpreter's mpi4py (never a system one)."""
    path = BIN / "mpiexec"
    if not path.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.fail("no mpiexec next to the interpreter or on PATH")
        return found
    return str(path)


@pytest.fixture
def easgd_cmd() -> list[str]:
    """How to start the CLI with this interpreter."""
    return [sys.executable, "-m", "easgd_mpi"]


@pytest.fixture(scope="session")
def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def torch():
    """PyTorch (the ``torch`` extra), imported on first use; without it the test is skipped."""
    return pytest.importorskip("torch", reason="the torch extra is installed by `make test`")


@pytest.fixture(scope="session")
def matplotlib():
    """matplotlib (the ``plot`` extra), imported on first use; without it the test is skipped."""
    return pytest.importorskip("matplotlib", reason="the plot extra is installed by `make test`")
