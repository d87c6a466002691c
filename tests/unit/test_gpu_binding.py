"""Binding each rank to its GPU before MPI starts (src/easgd_mpi/gpu_binding.py, and the same
logic in the jobs/ templates' RANK_WRAPPER).

The mapping must give every worker the GPU that ``session._choose_backend`` picked before the
binding existed (its index among the workers on its node, round-robin over the node's GPUs), the
master none, and must leave the environment alone when switched off, when the launcher is
unknown, when no GPU is visible, or when a worker already sees one GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from easgd_mpi import gpu_binding as gb
from easgd_mpi.gpu_binding import RECORD_VAR, bind_gpu, bound_gpu, detect_launch, plan

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = [
    ROOT / "jobs" / name
    for name in ("easgd-single-node.sbatch", "easgd-multi-node.sbatch", "easgd-preemptible.sbatch")
]


def hydra(rank, local, **env):
    return {"PMI_RANK": str(rank), "MPI_LOCALRANKID": str(local), "PMI_SIZE": "9", **env}


def srun(rank, local, gtids=None, **env):
    base = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_STEP_ID": "0"}
    if gtids is not None:
        base["SLURM_GTIDS"] = gtids
    return {**base, "PMI_RANK": str(rank), **env}


def ompi(rank, local, **env):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(local), **env}


def no_count():
    raise AssertionError("the GPUs were counted although CUDA_VISIBLE_DEVICES is set")


def gpu_of(env, count=no_count):
    return plan(env, count)[0]


# ---- the mapping --------------------------------------------------------------------------
def test_single_node_hydra_master_and_workers():
    four = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert gpu_of(hydra(0, 0, **four)) == ""  # the master holds no GPU
    assert [gpu_of(hydra(r, r, **four)) for r in (1, 2, 3, 4)] == ["0", "1", "2", "3"]


def test_more_workers_than_gpus_round_robin():
    two = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert [gpu_of(hydra(r, r, **two)) for r in (1, 2, 3, 4)] == ["0", "1", "0", "1"]


def test_other_nodes_number_workers_from_their_local_rank():
    # block placement: node 0 holds ranks 0..4 (master + 4 workers), node 1 ranks 5..8
    four = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert [gpu_of(hydra(5 + k, k, **four)) for k in range(4)] == ["0", "1", "2", "3"]
    assert [gpu_of(ompi(5 + k, k, **four)) for k in range(4)] == ["0", "1", "2", "3"]


def test_srun_uses_gtids_for_the_master_node():
    two = {"CUDA_VISIBLE_DEVICES": "0,1"}
    # what srun --distribution=arbitrary exported on the test cluster: n1 = 0,1,2; n2 = 3,4
    assert gpu_of(srun(0, 0, "0,1,2", **two)) == ""
    assert [gpu_of(srun(r, r, "0,1,2", **two)) for r in (1, 2)] == ["0", "1"]
    assert [gpu_of(srun(3 + k, k, "3,4", **two)) for k in (0, 1)] == ["0", "1"]
    # a cyclic placement (ranks 0, 2, 4 on one node): SLURM_GTIDS still finds the master
    assert gpu_of(srun(2, 1, "0,2,4", **two)) == "0"
    assert gpu_of(srun(4, 2, "0,2,4", **two)) == "1"
    assert gpu_of(srun(3, 1, "1,3", **two)) == "1"
    # without SLURM_GTIDS: block placement assumed
    assert gpu_of(srun(2, 2, **two)) == "1"
    assert gpu_of(srun(6, 1, **two)) == "1"


def test_hydra_started_by_slurm_ignores_the_proxies_slurm_variables():
    # Hydra's ranks inherit their proxy's SLURM_* (measured on the test cluster): node n2's
    # ranks 3 and 4 both have SLURM_LOCALID=0, SLURM_PROCID=1, SLURM_GTIDS=1
    proxy = {"SLURM_LOCALID": "0", "SLURM_PROCID": "1", "SLURM_GTIDS": "1", "SLURM_STEP_ID": "0"}
    two = {"CUDA_VISIBLE_DEVICES": "0,1", **proxy}
    assert gpu_of(hydra(3, 0, **two)) == "0"
    assert gpu_of(hydra(4, 1, **two)) == "1"
    n1 = {**two, "SLURM_PROCID": "0", "SLURM_GTIDS": "0"}
    assert gpu_of(hydra(2, 2, **n1)) == "1"
    assert detect_launch(hydra(4, 1, **two)).launcher == "MPICH Hydra"


def test_gpus_counted_when_unset():
    assert gpu_of(hydra(3, 3), count=lambda: 4) == "2"
    assert gpu_of(hydra(0, 0), count=lambda: 4) == ""
    assert plan(hydra(3, 3), lambda: 0) == (None, "")  # no GPU: nothing to do
    assert plan(hydra(0, 0), lambda: 0) == (None, "")


def test_left_alone():
    two = {"CUDA_VISIBLE_DEVICES": "0,1"}
    # a worker that already sees one GPU (a job template, --gpus-per-task=1): never remapped
    assert plan(hydra(2, 2, CUDA_VISIBLE_DEVICES="1"), no_count) == (None, "")
    # no GPU visible (the master's, emptied by a template; or none at all)
    assert plan(hydra(0, 0, CUDA_VISIBLE_DEVICES=""), no_count) == (None, "")
    assert plan(hydra(1, 1, CUDA_VISIBLE_DEVICES=" , "), no_count) == (None, "")
    # switched off
    for off in ("0", "no", "False", " off "):
        assert plan(hydra(1, 1, EASGD_BIND_GPUS=off, **two), no_count) == (None, "")
    assert gpu_of(hydra(1, 1, EASGD_BIND_GPUS="1", **two)) == "0"
    # unknown launcher, a plain start, the batch shell of a Slurm job (no SLURM_STEP_ID)
    assert plan(two, no_count) == (None, "")
    batch = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_GTIDS": "0", **two}
    assert plan(batch, no_count) == (None, "")
    assert plan(hydra("x", 1, **two), no_count) == (None, "")


def test_uuids_and_a_single_gpu_master():
    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa, GPU-bbbb"}
    assert gpu_of(hydra(2, 2, **uuids)) == "GPU-bbbb"
    assert gpu_of(hydra(0, 0, CUDA_VISIBLE_DEVICES="3")) == ""  # the master never holds one


def test_record_names_rank_launcher_and_gpu():
    gpu, record = plan(hydra(3, 3, CUDA_VISIBLE_DEVICES="4,5,6,7"), no_count)
    assert gpu == "6"
    assert record == (
        "world rank 3, local rank 3 (MPICH Hydra): worker 2 on this node -> GPU 6 of 4,5,6,7"
    )
    _, record = plan(srun(0, 0, "0,1,2", CUDA_VISIBLE_DEVICES="0,1"), no_count)
    assert record == "world rank 0, local rank 0 (Slurm srun): master -> no GPU (hides 0,1)"


@pytest.mark.parametrize(
    "nodes, n_gpus, servers",
    [
        ([0] * 5, 4, 1),  # one node, master + 4 workers
        ([0] * 3 + [1] * 2, 2, 1),  # the multi-node template on 2 nodes with 2 GPUs each
        ([0] * 5 + [1] * 4 + [2] * 4, 4, 1),  # 3 nodes, 4 workers each
        ([0] * 7 + [1] * 3, 4, 1),  # more workers than GPUs on the first node
        ([0] * 10, 8, 2),  # the layout: 2 servers and 8 workers on one node of 8 GPUs
        ([0] * 6 + [1] * 6, 4, 3),  # servers 0..2 on the first node
        ([0] * 2 + [1] * 5, 4, 3),  # server 2 on the second node
    ],
)
@pytest.mark.parametrize("launcher", [hydra, ompi, srun])
def test_same_gpu_as_choose_backend(nodes, n_gpus, servers, launcher):
    """Ranks placed in blocks by node: the bound GPU is the one _choose_backend's numbering
    (index among the workers on the node, from the workers-only communicator, modulo the GPUs)
    picked without the binding; the servers (ranks 0..servers-1, the master first) get none."""
    gpus = [str(10 + i) for i in range(n_gpus)]  # names, not positions
    for rank, node in enumerate(nodes):
        local = nodes[:rank].count(node)
        visible = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        if launcher is srun:
            gtids = ",".join(str(r) for r, n in enumerate(nodes) if n == node)
            env = srun(rank, local, gtids, **visible)
        else:
            env = launcher(rank, local, **visible)
        gpu, record = plan(env, no_count, servers=servers)
        if rank < servers:
            assert gpu == "" and ("master" if rank == 0 else f"server {rank} ") in record
            continue
        workers_before = sum(1 for r in range(servers, rank) if nodes[r] == node)
        assert gpu == gpus[workers_before % n_gpus], (rank, node)


def test_servers_from_the_environment_and_one_by_default():
    env = hydra(1, 1, CUDA_VISIBLE_DEVICES="0,1,2")
    assert gpu_of(env) == "0"  # servers = 1: rank 1 is worker 0
    assert gpu_of({**env, "EASGD_SERVERS": "2"}) == ""  # rank 1 serves
    assert plan({**env, "EASGD_SERVERS": "2"}, no_count, servers=1)[0] == "0"  # the caller wins
    assert gpu_of({**hydra(3, 3, CUDA_VISIBLE_DEVICES="0,1,2"), "EASGD_SERVERS": "2"}) == "1"
    assert gpu_of({**env, "EASGD_SERVERS": "x"}) == "0"  # not a number: the default


# ---- applying it ---------------------------------------------------------------------------
def test_bind_gpu_sets_and_records():
    env = hydra(2, 2, CUDA_VISIBLE_DEVICES="0,1,2")
    record = bind_gpu(env, no_count)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env[RECORD_VAR] == record
    assert "-> GPU 1 of 0,1,2" in record
    assert bound_gpu(env) == "1"
    # a second call (a nested start) leaves the single GPU and its record as they are
    assert bind_gpu(env, no_count) == "" and env["CUDA_VISIBLE_DEVICES"] == "1"
    assert bound_gpu(env) == "1"


def test_bind_gpu_master_and_opt_out():
    env = hydra(0, 0)
    bind_gpu(env, lambda: 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "master -> no GPU" in env[RECORD_VAR]
    assert bound_gpu(env) is None
    off = hydra(1, 1, CUDA_VISIBLE_DEVICES="0,1", EASGD_BIND_GPUS="0")
    off[RECORD_VAR] = "world rank 1, ...: worker 0 on this node -> GPU 0 of 0,1"  # stale
    assert bind_gpu(off, no_count) == ""
    assert off["CUDA_VISIBLE_DEVICES"] == "0,1" and RECORD_VAR not in off


def test_bind_gpu_never_raises():
    def broken():
        raise OSError("nvidia-smi hung")

    env = hydra(1, 1)
    assert bind_gpu(env, broken) == ""
    assert "CUDA_VISIBLE_DEVICES" not in env and RECORD_VAR not in env


def test_bound_gpu_ignores_stale_records():
    record = "world rank 1, local rank 1 (MPICH Hydra): worker 0 on this node -> GPU 0 of 0,1"
    assert bound_gpu({RECORD_VAR: record, "CUDA_VISIBLE_DEVICES": "0,1"}) is None
    assert bound_gpu({RECORD_VAR: record, "CUDA_VISIBLE_DEVICES": "1"}) is None
    assert bound_gpu({RECORD_VAR: record}) is None
    assert bound_gpu({"CUDA_VISIBLE_DEVICES": "0"}) is None
    assert bound_gpu({RECORD_VAR: record, "CUDA_VISIBLE_DEVICES": "0"}) == "0"


def test_count_node_gpus_without_a_driver_is_a_number():
    n = gb._count_node_gpus()
    assert isinstance(n, int) and n >= 0


FAKE_DRIVER = r"""
#include <stdlib.h>
int cuInit(unsigned int flags) { return getenv("FAKE_CUINIT_FAILS") ? 100 : 0; }
int cuDeviceGetCount(int *count) { *count = atoi(getenv("FAKE_USABLE_GPUS")); return 0; }
"""


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    """A libcuda.so.1 whose cuDeviceGetCount says $FAKE_USABLE_GPUS, found first by the child
    process that counts (as the real driver would be), and the control device it looks for."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the fake CUDA driver (installed with g++)"
    src = tmp_path / "fake_cuda.c"
    src.write_text(FAKE_DRIVER)
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(src)], check=True
    )
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    control = tmp_path / "nvidiactl"
    control.write_text("")
    return control


def test_count_node_gpus_counts_what_the_driver_can_use(fake_driver, monkeypatch):
    # /proc/driver/nvidia/gpus may list 8 GPUs of which the job's cgroup lets it open 2: the
    # driver, asked in a child process, counts the 2.
    monkeypatch.setenv("FAKE_USABLE_GPUS", "2")
    assert gb._count_node_gpus(control=fake_driver) == 2
    monkeypatch.setenv("FAKE_CUINIT_FAILS", "1")
    assert gb._count_node_gpus(control=fake_driver) == 0
    assert gb._count_node_gpus(control=fake_driver.parent / "absent") == 0  # no driver here


def test_bind_before_mpi_binds_only_while_it_still_works():
    env = hydra(2, 2, CUDA_VISIBLE_DEVICES="0,1")
    assert gb.bind_before_mpi(1, modules={"mpi4py.MPI": object()}, environ=env) == ""
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # MPI started: too late, left alone
    torch_in_use = SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: True))
    assert gb.bind_before_mpi(1, modules={"torch": torch_in_use}, environ=env) == ""
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"  # CUDA initialised: it would not apply
    record = gb.bind_before_mpi(1, modules={}, environ=env)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and record == env[RECORD_VAR]


# ---- the training side ---------------------------------------------------------------------
def test_choose_backend_uses_device_0_when_bound(monkeypatch):
    from easgd_mpi import session as training

    calls = []

    class FakeGPU:
        is_gpu = True
        device_id = 0

    def fake_select(prefer_gpu=True, device_id=None, mode="auto"):
        calls.append(device_id)
        return FakeGPU(), ""

    monkeypatch.setattr(training, "select_backend", fake_select)
    monkeypatch.setattr(training, "node_position", lambda comm: (3, 4))
    roles = SimpleNamespace(is_master=False, is_server=False, workers=None)
    cfg = SimpleNamespace(device="auto")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv(RECORD_VAR, "world rank 4, ...: worker 3 on this node -> GPU 1 of 0,1")
    _, why, label = training._choose_backend(cfg, roles)
    assert calls == [0] and label == 1 and why == ""  # device 0 inside; GPU 1 of the node

    monkeypatch.delenv(RECORD_VAR)  # not bound: the worker index picks the device, as before
    _, _, label = training._choose_backend(cfg, roles)
    assert calls == [0, 3] and label == 0


# ---- the CLI binds before mpi4py is imported -----------------------------------------------
def test_cli_binds_before_mpi_is_imported():
    code = """
import sys
import easgd_mpi.cli as cli
import easgd_mpi.gpu_binding as gb
seen = []
gb.bind_gpu = lambda *a, **k: seen.append("mpi4py.MPI" in sys.modules) or ""
cli.run_or_abort = lambda func: 0
for argv in (["train"], ["check"], ["inspect", "none.h5"]):
    try:
        cli.main(argv)
    except Exception:
        pass
print(seen)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[False, False]"  # train, check; not inspect


def test_check_text_ends_each_rank_line_with_its_binding():
    from easgd_mpi.diagnostics import format_report

    gpu = {"reason": "CuPy is not installed", "devices": [], "kernel_source_dir": "k"}
    base = {"world_size": 2, "host": "h", "mpi_library": "x", "mpi_standard": "4", "mpi4py": "4"}
    base |= {"cuda_aware_mpi": False, "mpi_cuda_support": False, "gpu": gpu, "backend": "numpy"}
    infos = [
        {**base, "rank": 0, "role": "master", "local_rank": 0}
        | {"cuda_visible_devices": "", "gpu_binding": "world rank 0, ...: master"},
        {**base, "rank": 1, "role": "worker 0", "local_rank": 1}
        | {"cuda_visible_devices": None, "gpu_binding": ""},
    ]
    lines = format_report(infos).splitlines()
    assert lines[1].startswith("rank 0 (master) ")
    assert lines[1].endswith("; CUDA_VISIBLE_DEVICES=; GPU binding: world rank 0, ...: master")
    assert lines[2].startswith("rank 1 (worker 0) ")
    assert lines[2].endswith("; CUDA_VISIBLE_DEVICES=(unset); GPU binding: none")


def _launch_recording(tmp_path, n, code, *args) -> dict:
    """``code`` on ``n`` ranks of the venv's MPICH Hydra, with two GPUs visible and no
    launcher variables inherited; returns what each rank wrote to rank-<r>.json."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("no mpiexec next to this Python")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "SLURM_", "EASGD_"))
    }
    env.update(
        CUDA_VISIBLE_DEVICES="0,1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]),
    )
    res = subprocess.run(
        [str(mpiexec), "-n", str(n), sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    return {r: json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(n)}


_RECORD = (
    "rank = MPI.COMM_WORLD.Get_rank()\n"
    "seen = [os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('EASGD_GPU_BINDING')]\n"
    "open(f'rank-{rank}.json', 'w').write(json.dumps(seen + extra))\n"
)


def test_real_mpiexec_environment(tmp_path):
    """The venv's MPICH Hydra: what it really exports gives master none, workers one each."""
    code = (
        "import json, os\n"
        "from easgd_mpi.gpu_binding import bind_gpu\n"
        "bind_gpu()\n"
        "from mpi4py import MPI\n"
        "extra = []\n" + _RECORD
    )
    seen = _launch_recording(tmp_path, 4, code)
    assert seen[0][0] == "" and "master -> no GPU (hides 0,1)" in seen[0][1]
    assert [seen[r][0] for r in (1, 2, 3)] == ["0", "1", "0"]
    assert seen[3][1] == (
        "world rank 3, local rank 3 (MPICH Hydra): worker 2 on this node -> GPU 0 of 0,1"
    )


def test_a_scripts_train_binds_like_the_cli(tmp_path):
    """A user's script under the venv's mpiexec, calling easgd_mpi.train() (no CLI): each rank
    is bound before MPI starts, the master to none, the workers to one GPU each."""
    code = (
        "import json, os, sys\n"
        "import easgd_mpi as ea\n"
        "cfg = ea.Config.from_toml(None, environ={}, overrides={'steps': '5', "
        "'eval_interval': '60', 'checkpoint.interval': '0', 'output': sys.argv[1]})\n"
        "extra = [ea.train(cfg)['steps']]\n"
        "from mpi4py import MPI\n" + _RECORD
    )
    seen = _launch_recording(tmp_path, 3, code, str(tmp_path / "runs"))
    assert seen[0][0] == "" and "master -> no GPU (hides 0,1)" in seen[0][1]
    assert [seen[r][0] for r in (1, 2)] == ["0", "1"]
    assert seen[2][1].endswith("worker 1 on this node -> GPU 1 of 0,1")
    assert seen[0][2] == 10  # it trained (on NumPy here: no CuPy)


# ---- the job templates do the same in bash -------------------------------------------------
def _wrapper(template: Path) -> str:
    m = re.search(r"^RANK_WRAPPER='(.*?)'$", template.read_text(), flags=re.S | re.M)
    assert m, f"no RANK_WRAPPER='...' in {template}"
    return m.group(1)


def test_templates_share_one_wrapper():
    texts = {t.name: _wrapper(t) for t in TEMPLATES}
    assert len(set(texts.values())) == 1, "the templates' RANK_WRAPPERs differ"
    subprocess.run(["bash", "-n", "-c", next(iter(texts.values()))], check=True)


def _template_rank(env) -> str | None:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if env.get(var):
            return env[var]
    return None


ENVS = [
    hydra(0, 0, CUDA_VISIBLE_DEVICES="0,1,2,3"),
    hydra(3, 3, CUDA_VISIBLE_DEVICES="0,1,2,3"),
    hydra(6, 1, CUDA_VISIBLE_DEVICES="0,1,2,3"),
    hydra(4, 4, CUDA_VISIBLE_DEVICES="0,1"),
    hydra(
        4,
        1,
        CUDA_VISIBLE_DEVICES="0,1",
        SLURM_LOCALID="0",
        SLURM_PROCID="1",
        SLURM_GTIDS="1",
        SLURM_STEP_ID="0",
    ),  # fmt: skip
    srun(0, 0, "0,1,2", CUDA_VISIBLE_DEVICES="0,1"),
    srun(2, 2, "0,1,2", CUDA_VISIBLE_DEVICES="0,1"),
    srun(4, 1, "3,4", CUDA_VISIBLE_DEVICES="0,1"),
    srun(4, 2, " 0, 2,4", CUDA_VISIBLE_DEVICES="0,1"),
    srun(5, 1, None, CUDA_VISIBLE_DEVICES="0,1"),
    srun(3, 1, "", CUDA_VISIBLE_DEVICES="0,1"),
    ompi(2, 2, CUDA_VISIBLE_DEVICES="GPU-a,GPU-b,GPU-c"),
    {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"},
    {"PMI_RANK": "3", "PMI_LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,,1,"},
    hydra(2, 2, CUDA_VISIBLE_DEVICES="1"),  # already one GPU
    hydra(2, 2, CUDA_VISIBLE_DEVICES=""),  # none
    hydra(2, 2),  # unset: the machine's own GPUs (none here)
    hydra(0, 0),
    hydra(2, 2, CUDA_VISIBLE_DEVICES="0,1", EASGD_BIND_GPUS="0"),
    hydra(0, 0, CUDA_VISIBLE_DEVICES="0,1", EASGD_BIND_GPUS="off"),
    {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1"},  # batch shell
    {"CUDA_VISIBLE_DEVICES": "0,1"},  # unknown launcher
    {"PMIX_RANK": "0", "CUDA_VISIBLE_DEVICES": "0,1"},  # pmix rank 0 without a local rank
]


@pytest.mark.parametrize("env", ENVS, ids=[str(i) for i in range(len(ENVS))])
def test_template_wrapper_matches_python(env, tmp_path):
    """The templates' bash wrapper narrows exactly as gpu_binding does (and, as before, always
    empties the master's CUDA_VISIBLE_DEVICES)."""
    probe = 'printf "%s\\n%s\\n" "${CUDA_VISIBLE_DEVICES-<unset>}" "${EASGD_GPU_BINDING-<unset>}"'
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    res = subprocess.run(
        ["bash", "-c", _wrapper(TEMPLATES[0]), "easgd-rank", "bash", "-c", probe],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    got_visible, got_record = res.stdout.split("\n")[:2]

    want = dict(env)
    bind_gpu(want)  # the Python side, with this machine's real GPU count like the wrapper
    if _template_rank(env) == "0":
        want["CUDA_VISIBLE_DEVICES"] = ""
    assert got_visible == want.get("CUDA_VISIBLE_DEVICES", "<unset>"), (env, res.stdout)
    assert got_record == want.get(RECORD_VAR, "<unset>"), (env, res.stdout)
