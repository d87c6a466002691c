"""``easgd check``'s text: ranks that report the same thing share one line, so a world of a
thousand ranks fits on a screen, and each cause is stated once (--json keeps every rank)."""

import pytest

from easgd_mpi.diagnostics import _ranges, format_report

KERNELS = "/opt/easgd/kernels"
H200 = {"id": 0, "name": "NVIDIA H200", "total_memory_bytes": 141 * 2**30}
MPI = {"mpi_library": "MPICH 4.2", "mpi_standard": "4.1", "mpi4py": "4.0.1"}
TORCH = {"version": "2.5.1", "cuda": True}


def rank_report(rank, size, host, local_rank, servers=1, gpu="ok"):
    """What describe_rank (plus `easgd check`'s binding fields) gives for one rank."""
    if rank < servers:
        role = "master" if servers == 1 else ("master, server 0" if rank == 0 else f"server {rank}")
    else:
        role = f"worker {rank - servers}"
    info = {
        "rank": rank,
        "world_size": size,
        "role": role,
        "host": host,
        "local_rank": local_rank,
        **MPI,
        "cuda_mpi_mode": "auto",
        "cuda_aware_mpi": False,
        "mpi_cuda_support": True,
        "torch": TORCH,
        "cuda_visible_devices": "",
        "gpu_binding": f"world rank {rank}, local rank {local_rank} (Slurm srun): {role}",
    }
    cupy = {"cupy_version": "13.3.0", "kernel_source_dir": KERNELS, "kernel_error": ""}
    if rank < servers:  # bound to no GPU
        reason = "no CUDA device visible (CUDA_VISIBLE_DEVICES is empty)"
        info["gpu"] = {**cupy, "reason": reason, "devices": [], "kernels_compile": None}
        info["backend"] = "numpy (the master evaluates on the host and holds no GPU)"
        return info
    device = (local_rank - 1) % 4
    info["cuda_visible_devices"] = str(device)
    info["gpu_binding"] += f" on this node -> GPU {device} of 0,1,2,3"
    info["is_gpu"] = gpu in ("ok", "kernels")
    if gpu == "ok":
        info["gpu"] = {**cupy, "reason": "", "devices": [H200], "kernels_compile": True}
        info["backend"] = "cupy (GPU 0: NVIDIA H200)"
    elif gpu == "kernels":
        error = "nvrtc: error: invalid value for --gpu-architecture (-arch)"
        info["gpu"] = {**cupy, "reason": "", "devices": [H200], "kernels_compile": False}
        info["gpu"]["kernel_error"] = error
        info["backend"] = f"numpy ({error})"
    else:  # the driver is gone on this node: one cause, four symptoms
        reason = "CUDA driver error: cudaErrorNoDevice"
        info["gpu"] = {**cupy, "reason": reason, "devices": [], "kernels_compile": None}
        info["gpu"]["kernel_error"] = reason
        info["backend"] = f"numpy ({reason})"
    info["transfers"] = {"center": "host", "allreduce": "device", "states": "host"}
    info["cuda_aware_mpi"] = True
    return info


def thousand_ranks():
    """1,000 ranks, 4 per node on 250 nodes: the master, then workers on 4 GPUs per node;
    node 100's driver is gone (ranks 400-403), rank 17's kernels do not compile."""
    infos = []
    for rank in range(1000):
        node, local = divmod(rank, 4)
        trouble = "driver" if node == 100 else ("kernels" if rank == 17 else "ok")
        infos.append(rank_report(rank, 1000, f"node{node + 1:03d}", local, gpu=trouble))
    return infos


def test_a_thousand_ranks_fit_on_a_screen():
    text = format_report(thousand_ranks())
    lines = text.splitlines()
    assert len(lines) <= 8, text
    assert lines[0] == "MPI: MPICH 4.2 (MPI 4.1, mpi4py 4.0.1), world size 1000"
    assert lines[1].startswith("rank 0 (master) on node001, local rank 0: no GPU (no CUDA device")
    assert lines[2].startswith(
        "ranks 1-16, 18-399, 404-999 (workers 0-15, 17-398, 403-998) on 249 hosts (node001, "
        "node002, ..., node250): GPU 0: NVIDIA H200 141 GiB; CuPy 13.3.0; kernels from "
        "/opt/easgd/kernels compile; "
    )
    assert lines[2].endswith(
        "CUDA_VISIBLE_DEVICES=0 | 1 | 2 | 3; GPU binding: every rank bound (each rank's "
        "record: --json)"
    )
    assert lines[3].startswith("rank 17 (worker 16) on node005, local rank 1: GPU 0: ")
    assert "FAIL to compile (nvrtc: error: invalid value" in lines[3]
    assert lines[3].endswith(
        "CUDA_VISIBLE_DEVICES=0; GPU binding: world rank 17, local rank 1 "
        "(Slurm srun): worker 16 on this node -> GPU 0 of 0,1,2,3"
    )
    assert lines[4].startswith("ranks 400-403 (workers 399-402) on node101: no GPU (CUDA driver")
    rows = sum(-(-len(line) // 120) for line in lines)  # on a terminal 120 columns wide
    assert rows <= 25, text


def test_every_rank_is_on_exactly_one_line():
    infos = thousand_ranks()
    named = []
    for line in format_report(infos).splitlines()[1:]:
        who = line.split(" (")[0].split(" ", 1)[1]  # "0", "1-16, 18-399, ..."
        for part in who.split(", "):
            lo, _, hi = part.partition("-")
            named.extend(range(int(lo), int(hi or lo) + 1))
    assert sorted(named) == list(range(1000))


def test_each_cause_is_stated_once():
    lines = format_report(thousand_ranks()).splitlines()
    driver = next(line for line in lines if "CUDA driver error" in line)
    assert driver.count("cudaErrorNoDevice") == 1, driver
    assert "kernels from /opt/easgd/kernels not compiled;" in driver
    assert "backend: numpy;" in driver  # not "numpy (CUDA driver error ...)" again
    kernels = next(line for line in lines if "FAIL to compile" in line)
    assert kernels.count("invalid value for --gpu-architecture") == 1, kernels


def test_cupy_missing_is_said_once_per_line():
    info = rank_report(1, 2, "vm", 1, gpu="driver")
    reason = "CuPy is not installed"
    info["gpu"].update(cupy_version=None, reason=reason, kernel_error=reason)
    info["backend"] = f"numpy ({reason})"
    line = format_report([rank_report(0, 2, "vm", 0), info]).splitlines()[2]
    assert line.count("CuPy") == 1 and f"no GPU ({reason})" in line, line


def test_servers_keep_a_line_each_with_their_slice():
    infos = [rank_report(r, 6, "vm", r, servers=2) for r in range(6)]
    lines = format_report(infos, slices=[(0, 2432), (2432, 4812)]).splitlines()
    assert lines[0].endswith("world size 6; the center on 2 servers")
    assert lines[1].startswith("rank 0 (master, server 0: center [0, 2,432), 9.5 KiB) on vm, ")
    assert lines[2].startswith("rank 1 (server 1: center [2,432, 4,812), 9.3 KiB) on vm, ")
    assert lines[3].startswith("ranks 2-5 (workers 0-3) on vm: GPU 0")
    assert len(lines) == 4


@pytest.mark.parametrize(
    "numbers, text",
    [([0], "0"), ([3, 1, 2], "1-3"), ([0, 1, 2, 3, 5, 7, 8], "0-3, 5, 7-8"), ([4, 6], "4, 6")],
)
def test_rank_ranges(numbers, text):
    assert _ranges(numbers) == text
