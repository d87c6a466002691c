"""What each rank would use: MPI library, GPU, CuPy, CUDA-aware mode, kernels, PyTorch
(`easgd check`)."""

from __future__ import annotations

import socket

from .comm import CUDA_MPI_VAR

__all__ = ["describe_rank", "format_report"]


def describe_rank(comm) -> dict:
    """Facts about this rank; collective only in the node split used for the local rank.

    A bad ``EASGD_CUDA_MPI`` raises :class:`LaunchError` before anything collective (``easgd
    check`` agrees on it first, so every rank fails alike)."""
    from .backend import select_backend  # noqa: PLC0415
    from .comm import (  # noqa: PLC0415
        cuda_aware_mpi,
        cuda_mpi_mode,
        gpu_transfer_plan,
        library_versions,
        local_rank,
        rank_and_size,
    )

    mode = cuda_mpi_mode()
    rank, size = rank_and_size(comm)
    node_local = local_rank(comm)
    info = {
        "rank": rank,
        "world_size": size,
        "role": "master" if rank == 0 else f"worker {rank - 1}",
        "host": socket.gethostname(),
        "local_rank": node_local,
        **library_versions(),
        # What EASGD_CUDA_MPI says (auto, off, on) and whether this rank's all-reduce will
        # take device buffers (the plan's decision; never on the master or a CPU worker).
        "cuda_mpi_mode": mode.value,
        "cuda_aware_mpi": False,
        "mpi_cuda_support": cuda_aware_mpi(),
    }
    try:
        from .backend import cupy_backend  # noqa: PLC0415

        gpu = cupy_backend.describe()
    except ImportError as exc:
        gpu = {
            "cupy_version": None,
            "gpu_available": False,
            "reason": f"CuPy not importable ({exc.__class__.__name__})",
            "devices": [],
            "kernels_compile": None,
            "kernel_error": "",
            "kernel_source_dir": None,
        }
    info["gpu"] = gpu
    info["torch"] = _torch_info()
    if rank == 0:
        info["backend"] = "numpy (the master evaluates on the host and holds no GPU)"
    else:
        backend, why = select_backend(prefer_gpu=True, device_id=None)
        info["backend"] = backend.name if not why else f"{backend.name} ({why})"
        info["transfers"] = gpu_transfer_plan(backend.is_gpu, mode, info["mpi_cuda_support"])
        info["cuda_aware_mpi"] = info["transfers"]["allreduce"].startswith("device")
    return info


def _torch_info() -> dict:
    """PyTorch's version and whether it can use the GPU (it is optional: the torch extra)."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("torch") is None:
        return {"version": None, "cuda": False}
    try:
        import torch  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001  (a broken install is reported, not fatal)
        return {"version": None, "cuda": False, "error": f"{exc.__class__.__name__}: {exc}"}
    return {"version": torch.__version__, "cuda": bool(torch.cuda.is_available())}


def _torch_text(t: dict) -> str:
    if t.get("error"):
        return f"PyTorch broken ({t['error']})"
    if not t.get("version"):
        return "PyTorch not installed (torch models need the torch extra)"
    return f"PyTorch {t['version']} ({'CUDA' if t['cuda'] else 'CPU only'})"


#: How ``easgd check`` names each setting of EASGD_CUDA_MPI.
_MODE_TEXT = {"auto": "unset: the library decides", "off": "= 0", "on": "= 1"}


def _support(flag: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[flag]


def format_report(infos: list[dict]) -> str:
    lines = []
    first = infos[0]
    lines.append(
        f"MPI: {first['mpi_library']} (MPI {first['mpi_standard']}, mpi4py "
        f"{first['mpi4py']}), world size {first['world_size']}"
    )
    for info in infos:
        gpu = info["gpu"]
        if gpu.get("devices"):
            devs = ", ".join(
                f"GPU {d['id']}: {d['name']} {d['total_memory_bytes'] / 2**30:.0f} GiB"
                for d in gpu["devices"]
            )
        else:
            devs = f"no GPU ({gpu.get('reason') or 'none found'})"
        kern = {True: "compile", False: "FAIL to compile", None: "not compiled"}[
            gpu.get("kernels_compile")
        ]
        lines.append(
            f"rank {info['rank']} ({info['role']}) on {info['host']}, local rank "
            f"{info['local_rank']}: {devs}; CuPy {gpu.get('cupy_version') or 'not installed'}; "
            f"CUDA-aware MPI {'on' if info['cuda_aware_mpi'] else 'off'} "
            f"({CUDA_MPI_VAR} {_MODE_TEXT[info.get('cuda_mpi_mode', 'auto')]}; "
            f"library support: {_support(info['mpi_cuda_support'])}); "
            f"kernels from {gpu.get('kernel_source_dir')} {kern}"
            + (f" ({gpu['kernel_error']})" if gpu.get("kernel_error") else "")
            + f"; {_torch_text(info.get('torch', {}))}"
            + f"; backend: {info['backend']}"
            + (
                "; transfers: " + ", ".join(f"{k} {v}" for k, v in info["transfers"].items())
                if "transfers" in info
                else ""
            )
        )
    return "\n".join(lines)
