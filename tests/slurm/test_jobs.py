"""The jobs/ templates, submitted unchanged to a real (private, local) Slurm cluster.

Each template is rendered only through sbatch options (which override its #SBATCH lines) and
the environment variables it documents, with small settings for a 2-core machine: a few hundred
steps, 2 to 4 workers, oversubscribed. Checked for every job: Slurm says COMPLETED with exit
0:0; all ranks formed ONE MPI world of the requested size (the master's first line names the
worker count: separate worlds of size 1 would each fail with "world size 1"); the layout the
template prints (master on the first node with no GPU visible, each worker bound to one GPU of
its node, distinct among the node's workers: issue 13, item 7); the run folder's metrics reach
steps x workers; and the final checkpoint.

Checks marked [issue 4] need HDF5 checkpoints, `--resume auto`, the stop-on-signal handling
and the COMPLETED/PREEMPTED markers (the checkpoint work).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV = Path(sys.executable).parent.parent  # the templates run this venv's easgd

# Small settings; sbatch options override the templates' #SBATCH lines.
STEPS = 300
ARGS = f"--set steps={STEPS} --set eval_interval=0.2"
COMMON = ["--time=5", "--cpus-per-task=1"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = list(run_dir.glob("checkpoint-*.h5"))

    def key(p: Path):
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.stat().st_mtime)

    return max(found, key=key) if found else None


def inspect_json(path: Path) -> dict:
    proc = subprocess.run(
        [str(VENV / "bin" / "easgd"), "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"easgd inspect --json {path}: {proc.stderr}"
    return json.loads(proc.stdout)


def describe(cluster, job_id: str, run_dir: Path, submit_dir: Path) -> str:
    """Everything useful when a job check fails."""
    parts = [f"scontrol: {cluster.job(job_id)}"]
    for path in [*sorted(submit_dir.glob(f"slurm-*-{job_id}.out")), run_dir / "job.out"]:
        if path.exists():
            text = path.read_text(errors="replace").splitlines()
            parts.append(f"--- {path}\n" + "\n".join(text[-60:]))
    parts.append(cluster.logs(15))
    return "\n".join(parts)


LAYOUT = re.compile(
    r"^easgd-layout: rank (\d+) node (\S+) CUDA_VISIBLE_DEVICES=(\S*) binding: (.*)$", flags=re.M
)


def layout(job_out: str) -> dict[int, tuple[str, str]]:
    """rank -> (node, CUDA_VISIBLE_DEVICES) from the templates' easgd-layout lines."""
    return {int(r): (node, cvd) for r, node, cvd, _ in LAYOUT.findall(job_out)}


def bindings(job_out: str) -> dict[int, str]:
    """rank -> the GPU binding the templates' wrapper recorded (EASGD_GPU_BINDING)."""
    return {int(r): record for r, _, _, record in LAYOUT.findall(job_out)}


def check_one_gpu_each(ranks: dict[int, tuple[str, str]], gpus=("0", "1")) -> None:
    """[issue 13, item 7] every worker sees exactly one GPU, distinct among the workers of a
    node while the node has enough of them (round-robin after that); the master sees none."""
    assert ranks[0][1] == "", ranks
    by_node: dict[str, list[str]] = {}
    for rank in sorted(ranks):
        if rank:
            by_node.setdefault(ranks[rank][0], []).append(ranks[rank][1])
    for node, seen in by_node.items():
        assert all(v in gpus for v in seen), (node, seen)  # one GPU, not a list
        expected = [gpus[i % len(gpus)] for i in range(len(seen))]
        assert seen == expected, (node, seen)


def check_finished_run(cluster, job_id, info, run_dir, submit_dir, workers, steps, announcements=1):
    why = describe(cluster, job_id, run_dir, submit_dir)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", why
    out = (run_dir / "job.out").read_text()
    # one world of 1 + workers ranks: the master announces exactly that many workers
    starts = re.findall(r"^easgd: \w+, (\d+) workers \(", out, flags=re.M)
    assert starts == [str(workers)] * announcements, why
    assert "world size 1" not in out, why
    assert (run_dir / "config.toml").is_file(), why
    records = read_metrics(run_dir)
    assert records, why
    assert max(r["steps"] for r in records) == steps * workers, why
    # [issue 4] a final checkpoint holding the whole step budget, and the COMPLETED marker
    ckpt = newest_checkpoint(run_dir)
    assert ckpt is not None, f"[issue 4] no checkpoint-*.h5 in {run_dir}\n{why}"
    assert inspect_json(ckpt)["counters"]["steps"] == steps * workers, why
    assert (run_dir / "COMPLETED").exists(), f"[issue 4] no COMPLETED marker\n{why}"
    assert not (run_dir / "PREEMPTED").exists(), why
    return out


def test_single_node(cluster, tmp_path):
    """jobs/easgd-single-node.sbatch: master + 3 workers on n1, which has 2 (fake) GPUs."""
    job = cluster.submit(
        "easgd-single-node.sbatch",
        *COMMON,
        "--ntasks=4",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_ARGS=ARGS,
    )
    info = cluster.wait(job)
    run_dir = tmp_path / "runs" / f"easgd-{job}"
    out = check_finished_run(cluster, job, info, run_dir, tmp_path, workers=3, steps=STEPS)
    ranks = layout(out)
    assert sorted(ranks) == [0, 1, 2, 3], out
    assert ranks[0] == ("n1", ""), out  # the master sees no GPU
    # one GPU per worker, bound before MPI starts; 3 workers on 2 GPUs share round-robin
    assert [ranks[r] for r in (1, 2, 3)] == [("n1", "0"), ("n1", "1"), ("n1", "0")], out
    check_one_gpu_each(ranks)
    records = bindings(out)
    assert records[0].endswith("(Slurm srun): master -> no GPU (hides 0,1)"), out
    assert records[3] == (
        "world rank 3, local rank 3 (Slurm srun): worker 2 on this node -> GPU 0 of 0,1"
    ), out
    # Slurm's own log only points at the run folder
    slurm_log = (tmp_path / f"slurm-easgd-{job}.out").read_text()
    assert f"output in {run_dir}/job.out" in slurm_log


def _multi_node_run(cluster, tmp_path, flavour, **variables):
    """jobs/easgd-multi-node.sbatch on 2 nodes × 3 slots with 2 GPUs each, 4 workers: (job.out,
    scontrol's record, run folder), after the checks every finished run passes."""
    job = cluster.submit(
        "easgd-multi-node.sbatch",
        *COMMON,
        "--nodes=2",
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_ARGS=ARGS,
        MPI_FLAVOUR=flavour,
        **variables,
    )
    info = cluster.wait(job)
    run_dir = tmp_path / "runs" / f"easgd-mn-{job}"
    out = check_finished_run(cluster, job, info, run_dir, tmp_path, workers=4, steps=STEPS)
    return out, info, run_dir


@pytest.mark.parametrize("flavour", ["pmi2", "mpiexec"])
def test_multi_node(cluster, tmp_path, flavour):
    """jobs/easgd-multi-node.sbatch on n1 + n2 (2 GPUs each): master + 2 workers on n1, 2 on n2.

    pmi2: srun with an explicit host file; mpiexec: the venv's Hydra mpiexec in the allocation.
    """
    out, info, _ = _multi_node_run(cluster, tmp_path, flavour)
    assert info.get("NodeList") == "n[1-2]", info
    # each worker bound to its own GPU on its node before MPI starts (issue 13, item 7)
    ranks = layout(out)
    assert ranks == {
        0: ("n1", ""),
        1: ("n1", "0"),
        2: ("n1", "1"),
        3: ("n2", "0"),
        4: ("n2", "1"),
    }, out
    check_one_gpu_each(ranks)
    via = {"pmi2": "Slurm srun", "mpiexec": "MPICH Hydra"}[flavour]
    records = bindings(out)
    assert records[0] == f"world rank 0, local rank 0 ({via}): master -> no GPU (hides 0,1)", out
    assert records[3] == (
        f"world rank 3, local rank 0 ({via}): worker 0 on this node -> GPU 0 of 0,1"
    ), out
    assert records[2] == (
        f"world rank 2, local rank 2 ({via}): worker 1 on this node -> GPU 1 of 0,1"
    ), out


def test_multi_node_with_a_server_per_node(cluster, tmp_path, flavour="pmi2"):
    """SERVERS_PER_NODE=1 on n1 + n2: the center on 2 servers, one per node (rank 0 = master
    and server 0 on n1, rank 1 = server 1 on n2), no GPU for either, then 2 workers per node,
    each bound to its own GPU (issue 11)."""
    out, _, run_dir = _multi_node_run(cluster, tmp_path, flavour, SERVERS_PER_NODE="1")
    assert layout(out) == {
        0: ("n1", ""),
        1: ("n2", ""),
        2: ("n1", "0"),
        3: ("n1", "1"),
        4: ("n2", "0"),
        5: ("n2", "1"),
    }, out
    records = bindings(out)
    assert records[1].endswith("server 1 -> no GPU (hides 0,1)"), out
    assert records[4].endswith("worker 0 on this node -> GPU 0 of 0,1"), out
    assert "the center on 2 servers: rank 0 " in out, out
    config = (run_dir / "config.toml").read_text()
    assert "servers = 2" in config, config


def _venv_whose_srun_fails_once(root: Path, stderr_line: str) -> Path:
    """A venv folder (this venv's easgd and python) whose ``srun`` fails the first training
    launch as MPI_Init does when Slurm's pmi2 cuts a PMI line, printing ``stderr_line``, and
    is the real srun otherwise (the layout launch and every later one): fault injection in
    front of the real launcher, which the template finds first on PATH."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("easgd", "python"):
        (bin_dir / name).symlink_to(VENV / "bin" / name)
    real = subprocess.run(["which", "srun"], capture_output=True, text=True).stdout.strip()
    marker = root / "failed-once"
    script = bin_dir / "srun"
    script.write_text(
        "#!/bin/bash\n"
        f'if [[ " $* " == *" easgd train "* ]] && [ ! -e {marker} ]; then\n'
        f"  touch {marker}\n"
        f"  echo {stderr_line!r} >&2\n"
        "  exit 134\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return root


def test_multi_node_launches_again_when_pmi2_cut_a_line(cluster, tmp_path):
    """MPI_Init failed because Slurm's pmi2 cut a PMI line (its slurmstepd line on the
    launcher's stderr, docs/SLURM.md): the multi-node template launches again and the run
    completes; any other failed launch is not repeated."""
    cut = "slurmstepd: error: mpi/pmi2: value not properly terminated in client request"
    venv = _venv_whose_srun_fails_once(tmp_path / "venv", cut)
    out, _, _ = _multi_node_run(cluster, tmp_path / "job", "pmi2", EASGD_VENV=str(venv))
    assert out.count("launching again") == 1, out
    assert re.search(r"easgd exited with 134\n.*launching again", out), out

    other = _venv_whose_srun_fails_once(tmp_path / "venv2", "srun: error: some other failure")
    job = cluster.submit(
        "easgd-multi-node.sbatch",
        *COMMON,
        "--nodes=2",
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path / "job2",
        EASGD_ARGS=ARGS,
        MPI_FLAVOUR="pmi2",
        EASGD_VENV=str(other),
    )
    info = cluster.wait(job)
    run_out = (tmp_path / "job2" / "runs" / f"easgd-mn-{job}" / "job.out").read_text()
    assert info.get("ExitCode") == "134:0", (info, run_out)
    assert "launching again" not in run_out, run_out


def test_preemptible_launches_again_when_pmi2_cut_a_line(cluster, tmp_path):
    """The preemptible template, too, launches again after a cut PMI line, and the run
    completes in the same start."""
    cut = "slurmstepd: error: mpi/pmi2: value not properly terminated in client request"
    venv = _venv_whose_srun_fails_once(tmp_path / "venv", cut)
    job = cluster.submit(
        "easgd-preemptible.sbatch",
        *COMMON,
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path / "job",
        EASGD_ARGS=ARGS,
        EASGD_VENV=str(venv),
    )
    info = cluster.wait(job)
    run_dir = tmp_path / "job" / "runs" / f"easgd-pre-{job}"
    out = check_finished_run(cluster, job, info, run_dir, tmp_path / "job", workers=2, steps=STEPS)
    assert out.count("launching again") == 1, out
    assert info.get("Restarts") == "0", info


def test_module_lines_and_bad_flavour_do_not_hang(cluster, tmp_path):
    """EASGD_MODULES where there are no modules is a note, not a failure; a bad MPI_FLAVOUR is a
    clear error (exit 2) before anything starts."""
    job = cluster.submit(
        "easgd-single-node.sbatch",
        *COMMON,
        "--ntasks=2",
        "--gpus-per-node=1",
        submit_dir=tmp_path,
        EASGD_MODULES="cuda/12.4",
        MPI_FLAVOUR="mvapich",
        EASGD_ARGS=ARGS,
    )
    info = cluster.wait(job)
    out = (tmp_path / "runs" / f"easgd-{job}" / "job.out").read_text()
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, out)
    assert "MPI_FLAVOUR=mvapich is not one of pmi2, pmix, mpiexec" in out
    slurm_log = (tmp_path / f"slurm-easgd-{job}.out").read_text()
    assert "module" in slurm_log and "skipping EASGD_MODULES" in slurm_log, slurm_log


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"SERVERS_PER_NODE": "1", "MPI_FLAVOUR": "mpiexec"},
            "SERVERS_PER_NODE=1 needs MPI_FLAVOUR=pmi2 or pmix",
        ),
        ({"SERVERS_PER_NODE": "two"}, "SERVERS_PER_NODE=two is not a whole number >= 0"),
    ],
)
def test_multi_node_refuses_a_server_layout_it_cannot_place(cluster, tmp_path, variables, message):
    """A server layout the launcher cannot honour is a clear error (exit 2) before any rank
    starts, never a job that hangs or runs with another layout than asked."""
    job = cluster.submit(
        "easgd-multi-node.sbatch",
        *COMMON,
        "--nodes=2",
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_ARGS=ARGS,
        **variables,
    )
    info = cluster.wait(job)
    out = (tmp_path / "runs" / f"easgd-mn-{job}" / "job.out").read_text()
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, out)
    assert message in out, out


def signal_and_requeue(cluster, job, run_dir, submit_dir, timeout) -> dict:
    """USR1 to the batch shell once the training is visibly under way (an evaluation with
    steps > 0); returns scontrol's record once the job runs again (or is over).

    Slurm holds a requeued job for AuthInfo's cred_expire (10 s on the test cluster, 120 s by
    default) before it starts again. (Releasing it earlier with `scontrol update
    StartTime=now` races with the revoked credential of the first start: "Job credential
    revoked", and the job fails.)
    """
    deadline = time.monotonic() + timeout
    while not any(r["steps"] > 0 for r in read_metrics(run_dir)):
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), describe(
            cluster, job, run_dir, submit_dir
        )
        assert time.monotonic() < deadline, describe(cluster, job, run_dir, submit_dir)
        time.sleep(0.1)
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    def restarted_or_over(info):
        if info.get("JobState") in cluster.FINAL_STATES:
            return True
        return int(info.get("Restarts", 0)) >= 1 and info.get("JobState") == "RUNNING"

    return cluster.wait(job, timeout=timeout, until=restarted_or_over)


def test_preemptible_requeues_and_resumes(cluster, tmp_path):
    """jobs/easgd-preemptible.sbatch: USR1 to the batch shell (what --signal=B:USR1@120 sends)
    mid-run -> checkpoint, requeue (same job id) -> the resumed run finishes from it.

    Everything after the signal depends on [issue 4] (stop on signal, markers, --resume auto).
    """
    steps, workers = 4000, 2
    job = cluster.submit(
        "easgd-preemptible.sbatch",
        *COMMON,
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_ARGS=f"--set steps={steps} --set eval_interval=0.2",
    )
    run_dir = tmp_path / "runs" / f"easgd-pre-{job}"
    info = signal_and_requeue(cluster, job, run_dir, tmp_path, timeout=90)
    assert int(info.get("Restarts", 0)) == 1, "[issue 4] not requeued\n" + describe(
        cluster, job, run_dir, tmp_path
    )
    info = cluster.wait(job, timeout=150)

    out = check_finished_run(
        cluster, job, info, run_dir, tmp_path, workers=workers, steps=steps, announcements=2
    )
    why = describe(cluster, job, run_dir, tmp_path)
    assert int(info.get("Restarts", 0)) == 1, why
    first, second = out.split("easgd-job: stopped before the end: requeueing", 1)
    assert "got SIGUSR1" in first, why
    assert re.search(r"^easgd-job: .* easgd exited with 0$", first, flags=re.M), why
    assert "start 2:" in second and "--resume auto" in second, why
    for start in (first, second):  # both starts bind each worker to its own GPU
        ranks = layout(start)
        assert ranks == {0: ("n1", ""), 1: ("n1", "0"), 2: ("n1", "1")}, why

    # [issue 4] the second start resumed from the checkpoint written on the signal: its first
    # evaluation already counts the first start's steps, and the metrics never go back. (The
    # progress line shows steps per worker, as the records' steps_per_worker.)
    def progress(text):
        return [
            int(n.replace(",", ""))
            for n in re.findall(r"^\[\s*[\d.]+s\] steps\s+([\d,]+)", text, flags=re.M)
        ]

    stopped_at = max(progress(first), default=0)
    assert 0 < stopped_at < steps, why
    resumed = progress(second)
    assert resumed and resumed[0] >= stopped_at, (
        f"[issue 4] resumed run starts at steps {resumed[:1]} < {stopped_at} at the stop\n{why}"
    )
    counts = [r["steps_per_worker"] for r in read_metrics(run_dir)]
    assert any(0 < s <= stopped_at for s in counts), why
    back = [(a, b) for a, b in zip(counts, counts[1:], strict=False) if b < a]
    assert not back, f"[issue 4] metrics steps go back {back} (steps: {counts[:12]}...)\n{why}"


# ---- your own script (EASGD_COMMAND) ---------------------------------------------------------

#: A user's own loop (easgd_mpi.torch) in scripts/ of the submit folder, with a module of its
#: own at the top of it (found through EASGD_PYTHONPATH: Python puts only scripts/ on the path).
OWN_MODEL = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
"""
OWN_SCRIPT = """
import sys
import time

import torch
import torch.nn.functional as F

import easgd_mpi.torch as et
from my_model import build  # in the submit folder: found through EASGD_PYTHONPATH

steps, delay = int(sys.argv[1]), float(sys.argv[2])
run = et.init({"steps": steps, "eval_interval": 0.2})  # run_dir, resume: from the template
if run.serves:
    run.serve()
else:
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elastic = et.ElasticAveraging(model, opt, run)
    g = torch.Generator().manual_seed(run.worker)
    while not run.should_stop:
        x = torch.randn(16, 4, generator=g)
        loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        elastic.step(loss=loss)
        time.sleep(delay)
run.finish()
"""


def own_script(submit_dir: Path) -> None:
    (submit_dir / "scripts").mkdir(parents=True, exist_ok=True)
    (submit_dir / "my_model.py").write_text(OWN_MODEL)
    (submit_dir / "scripts" / "my_train.py").write_text(OWN_SCRIPT)


def test_single_node_runs_your_own_script(cluster, tmp_path):
    """jobs/easgd-single-node.sbatch with EASGD_COMMAND: every rank runs the user's script
    (easgd_mpi.torch), bound to its GPU, in the template's run folder, its modules found."""
    own_script(tmp_path)
    steps = 60
    job = cluster.submit(
        "easgd-single-node.sbatch",
        *COMMON,
        "--ntasks=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_COMMAND=f"python scripts/my_train.py {steps} 0",
    )
    info = cluster.wait(job, timeout=300)  # three ranks import torch on two cores
    run_dir = tmp_path / "runs" / f"easgd-{job}"
    out = check_finished_run(cluster, job, info, run_dir, tmp_path, workers=2, steps=steps)
    assert "your optimizer" in out and "python scripts/my_train.py 60 0" in out, out
    assert layout(out) == {0: ("n1", ""), 1: ("n1", "0"), 2: ("n1", "1")}, out
    assert (run_dir / "center.pt").is_file(), out


def test_preemptible_requeues_and_resumes_your_own_script(cluster, tmp_path):
    """jobs/easgd-preemptible.sbatch with EASGD_COMMAND: USR1 mid-run -> the script's final
    checkpoint and PREEMPTED -> requeue -> the script resumes (EASGD_RESUME=auto) and ends."""
    own_script(tmp_path)
    steps, workers = 400, 2
    job = cluster.submit(
        "easgd-preemptible.sbatch",
        *COMMON,
        "--ntasks-per-node=3",
        "--gpus-per-node=2",
        submit_dir=tmp_path,
        EASGD_COMMAND=f"python scripts/my_train.py {steps} 0.01",
    )
    run_dir = tmp_path / "runs" / f"easgd-pre-{job}"
    signal_and_requeue(cluster, job, run_dir, tmp_path, timeout=120)
    info = cluster.wait(job, timeout=180)
    out = check_finished_run(
        cluster, job, info, run_dir, tmp_path, workers=workers, steps=steps, announcements=2
    )
    why = describe(cluster, job, run_dir, tmp_path)
    first, second = out.split("easgd-job: stopped before the end: requeueing", 1)
    assert "got SIGUSR1" in first and "python exited with 0" in first, why
    assert "resuming from checkpoint" in second, why
