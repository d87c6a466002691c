"""What each rank would use: MPI library, GPU, CuPy, CUDA-aware mode, kernels, PyTorch, and
which slice of the center each server holds (`easgd check`)."""

from __future__ import annotations

import socket

from .comm import CUDA_MPI_VAR

__all__ = ["describe_rank", "format_report", "center_slices", "role_of"]


def role_of(rank: int, servers: int = 1) -> str:
    """``master`` (``master, server 0`` with several servers), ``server s`` or ``worker i``."""
    if rank == 0:
        return "master" if servers == 1 else "master, server 0"
    if rank < servers:
        return f"server {rank}"
    return f"worker {rank - servers}"


def describe_rank(comm, servers: int = 1) -> dict:
    """Facts about this rank (ranks 0..servers−1 serve the center); collective only in the
    node split used for the local rank.

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
        "role": role_of(rank, servers),
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
    elif rank < servers:
        info["backend"] = "numpy (a server of the center holds no GPU)"
    else:
        # Reported, not enforced: a GPU that cannot run the kernels is named with its reason
        # (training stops there unless device = 'cpu-fallback').
        backend, why = select_backend(prefer_gpu=True, device_id=None, mode="cpu-fallback")
        info["backend"] = backend.name if not why else f"{backend.name} ({why})"
        info["is_gpu"] = bool(backend.is_gpu)
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


def center_slices(cfg, infos: list[dict]) -> list[tuple[int, int]] | str | None:
    """With ``cfg.servers`` > 1, each server's [lo, hi) of the center of the model ``cfg``
    describes, cut as training cuts it (on the largest exchange chunk of any rank), also stored
    as ``slice`` in the servers' ``infos``. A string says why they are unknown (the model
    cannot be built here); None with one server. Builds the model: call on one rank."""
    if cfg.servers <= 1:
        return None
    from .center import round_chunk, shard_slices  # noqa: PLC0415
    from .errors import EasgdError  # noqa: PLC0415
    from .models import make_problem  # noqa: PLC0415

    try:
        n = make_problem(cfg).layout.size
    except EasgdError as exc:
        return f"the model cannot be built here: {exc}"
    gpu_off = cfg.device == "off"
    widest = max(
        round_chunk(cfg.resolve_chunk(bool(i.get("is_gpu")) and not gpu_off)) for i in infos
    )
    slices = shard_slices(n, cfg.servers, widest)
    for info in infos:
        if info["rank"] < cfg.servers:
            info["slice"] = list(slices[info["rank"]])
            info["center_size"] = n
    return slices


def format_report(infos: list[dict], slices: list[tuple[int, int]] | str | None = None) -> str:
    """One line for the MPI library, then one line per group of ranks that report the same
    thing (``ranks 1-4, 6 (workers 0-3, 5) on node1: ...``), in rank order, so that a world of
    a thousand ranks fits on a screen; each cause is stated once per line (--json keeps every
    rank's full report). ``slices`` from :func:`center_slices`."""
    first = infos[0]
    servers = sum(1 for i in infos if i["role"].startswith(("master, server", "server")))
    lines = [
        f"MPI: {first['mpi_library']} (MPI {first['mpi_standard']}, mpi4py "
        f"{first['mpi4py']}), world size {first['world_size']}"
        + (f"; the center on {servers} servers" if servers > 1 else "")
        + (f" (slices unknown: {slices})" if isinstance(slices, str) else "")
    ]
    groups: dict[tuple, list[dict]] = {}
    for info in sorted(infos, key=lambda i: i["rank"]):
        groups.setdefault(_report_key(info, slices), []).append(info)
    for members in sorted(groups.values(), key=lambda m: m[0]["rank"]):
        lines.append(f"{_who(members, slices)}: {_facts(members[0])}; {_bindings(members)}")
    return "\n".join(lines)


def _report_key(info: dict, slices) -> tuple:
    """What a rank reports, without what tells ranks apart (rank, role's number, host, local
    rank, its own GPU binding): ranks with equal keys share a line. A server's slice is its
    own, so every server has a line."""
    own_slice = isinstance(slices, list) and info["rank"] < len(slices)
    return (
        info["role"].split(" ")[0],
        info["rank"] if own_slice else None,
        _facts(info),
        (info.get("cuda_visible_devices"), info.get("gpu_binding")) == (None, ""),
    )


def _who(members: list[dict], slices) -> str:
    """``rank 0 (master) on vm, local rank 0`` or ``ranks 1-4, 6 (workers 0-3, 5) on vm``."""
    from .center import describe_slice  # noqa: PLC0415

    if len(members) == 1:
        info = members[0]
        role = info["role"]
        if isinstance(slices, list) and info["rank"] < len(slices):
            role += f": center {describe_slice(*slices[info['rank']])}"
        return f"rank {info['rank']} ({role}) on {info['host']}, local rank {info['local_rank']}"
    kind = members[0]["role"].split(" ")[0]  # worker or server: each role numbered
    numbers = _ranges(int(m["role"].split(" ")[-1]) for m in members)
    ranks = _ranges(m["rank"] for m in members)
    return f"ranks {ranks} ({kind}s {numbers}) on {_hosts(members)}"


def _hosts(members: list[dict]) -> str:
    hosts = list(dict.fromkeys(m["host"] for m in members))
    if len(hosts) <= 4:
        return ", ".join(hosts)
    return f"{len(hosts)} hosts ({hosts[0]}, {hosts[1]}, ..., {hosts[-1]})"


def _ranges(numbers) -> str:
    """``0-3, 5, 7-8`` for 0, 1, 2, 3, 5, 7, 8."""
    out: list[str] = []
    numbers = sorted(numbers)
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def _facts(info: dict) -> str:
    """What a rank would use, each cause said once: a missing CuPy or driver explains the
    missing GPU, the kernels not compiled and the NumPy backend, and is written only where the
    GPU is; a kernel that fails to compile explains the NumPy backend."""
    gpu = info["gpu"]
    reason = gpu.get("reason") or "none found"
    if gpu.get("devices"):
        parts = [
            ", ".join(
                f"GPU {d['id']}: {d['name']} {d['total_memory_bytes'] / 2**30:.0f} GiB"
                for d in gpu["devices"]
            )
        ]
    else:
        parts = [f"no GPU ({reason})"]
    if gpu.get("cupy_version"):
        parts.append(f"CuPy {gpu['cupy_version']}")
    elif "CuPy" not in reason or gpu.get("devices"):
        parts.append("CuPy not installed")
    kernels = {True: "compile", False: "FAIL to compile", None: "not compiled"}[
        gpu.get("kernels_compile")
    ]
    error = gpu.get("kernel_error")
    said = error and not gpu.get("devices") and error == reason
    parts.append(
        f"kernels from {gpu.get('kernel_source_dir')} {kernels}"
        + (f" ({error})" if error and not said else "")
    )
    parts.append(
        f"CUDA-aware MPI {'on' if info['cuda_aware_mpi'] else 'off'} "
        f"({CUDA_MPI_VAR} {_MODE_TEXT[info.get('cuda_mpi_mode', 'auto')]}; "
        f"library support: {_support(info['mpi_cuda_support'])})"
    )
    parts.append(_torch_text(info.get("torch", {})))
    backend = info["backend"]
    said_above = [error] + ([] if gpu.get("devices") else [reason])
    for why in filter(None, said_above):
        backend = backend.removesuffix(f" ({why})")  # the GPU's or the kernels' cause
    parts.append(f"backend: {backend}")
    if "transfers" in info:
        parts.append("transfers: " + ", ".join(f"{k} {v}" for k, v in info["transfers"].items()))
    return "; ".join(parts)


def _bindings(members: list[dict]) -> str:
    """Each rank's CUDA_VISIBLE_DEVICES and GPU binding record (``easgd check`` adds them to
    the reports): as they are for one rank; for several, the distinct values and how many
    ranks are bound (each rank's own record is in --json)."""
    shown = [
        "(unset)" if v is None else v
        for v in dict.fromkeys(m.get("cuda_visible_devices") for m in members)
    ]
    records = [m.get("gpu_binding") or "" for m in members]
    if len(members) == 1:
        binding = records[0] or "none"
    elif not any(records):
        binding = "none"
    else:
        bound = sum(1 for r in records if r)
        who = "every rank" if bound == len(members) else f"{bound} of {len(members)} ranks"
        binding = f"{who} bound (each rank's record: --json)"
    return f"CUDA_VISIBLE_DEVICES={' | '.join(shown)}; GPU binding: {binding}"
