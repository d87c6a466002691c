"""Configs that cannot mean what the user wants are refused before anything starts.

In-process: each check's boundary (the last accepted value and the first refused one) and that
the config's split arithmetic is the data loader's. Under the venv's ``mpiexec -n 3``: every
such error is one line per rank, exit code 2, no traceback, no run folder.
"""

import subprocess

import numpy as np
import pytest

from easgd_mpi.comm import check_layout
from easgd_mpi.config import ALGORITHMS, ELASTIC_ALGORITHMS, Config
from easgd_mpi.data import load_dataset
from easgd_mpi.errors import ConfigError, DataError
from launching import assert_one_line_per_rank, run, train_command, with_path


def config(**values) -> Config:
    cfg = Config()
    for key, value in values.items():
        cfg.set(key.replace("__", "."), value)
    return cfg


def refused(cfg, workers=None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(workers=workers)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- in-process: the boundaries ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tau_up_to_steps_is_accepted_beyond_is_refused(algorithm):
    lr = {} if algorithm in ELASTIC_ALGORITHMS else {"lr": 0.05}
    config(algorithm=algorithm, tau=20, steps=20, **lr).validate(workers=2)
    message = refused(config(algorithm=algorithm, tau=21, steps=20, **lr))
    assert "tau = 21 is larger than steps = 20" in message and "set tau <= steps" in message


def test_empty_hidden_layers_mean_softmax():
    message = refused(config(model__hidden=[]))
    assert "model.hidden = []" in message and "model.name = 'softmax'" in message
    config(model__name="softmax", model__hidden=[]).validate(workers=2)  # hidden unused there
    config(model__hidden=[8]).validate(workers=2)


def test_synthetic_held_out_split_of_one_sample_is_the_least():
    config(
        data__name="synthetic", data__samples=20, data__test_fraction=0.05, batch_size=8
    ).validate()
    message = refused(config(data__name="synthetic", data__samples=20, data__test_fraction=0.02))
    assert "round(data.samples*data.test_fraction) = round(20*0.02) = 0" in message
    assert "nothing to evaluate" in message


def test_synthetic_training_split_must_hold_a_minibatch():
    # 160 samples, 20 % held out: 128 to train on, exactly the default batch.
    config(data__name="synthetic", data__samples=160).validate(workers=2)
    message = refused(config(data__name="synthetic", data__samples=159))
    assert "training split has 127 samples" in message and "batch_size = 128" in message
    message = refused(config(data__name="synthetic", data__samples=10, data__test_fraction=0.96))
    assert "leaving none to train on" in message


def test_synthetic_needs_a_sample_per_class():
    config(data__name="synthetic", data__samples=12, data__classes=12, batch_size=4).validate()
    message = refused(config(data__name="synthetic", data__samples=11, data__classes=12))
    assert "data.samples = 11 is fewer than data.classes = 12" in message


def test_data_checks_do_not_apply_to_the_quadratic():
    config(model__name="quadratic", data__name="synthetic", data__samples=10).validate(workers=2)


@pytest.mark.parametrize("samples", [10, 11, 19, 20, 21, 50, 99])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99])
def test_config_split_arithmetic_is_the_loaders(samples, fraction):
    """Refused for an empty split exactly when the loader would fail; otherwise the loader's
    training split is the one the config checked against batch_size."""
    cfg = config(data__name="synthetic", data__samples=samples, data__test_fraction=fraction)
    cfg.set("data.classes", 2)
    cfg.set("batch_size", 1)
    try:
        cfg.validate()
        empty_split = False
    except ConfigError as exc:
        assert "nothing to evaluate" in str(exc) or "none to train on" in str(exc)
        empty_split = True
    if empty_split:
        with pytest.raises(DataError, match="too few"):
            load_dataset(cfg.data)
        return
    data = load_dataset(cfg.data)
    n_train = len(data.y_train)
    cfg.set("batch_size", n_train)
    cfg.validate()
    cfg.set("batch_size", n_train + 1)
    assert f"training split has {n_train} samples" in refused(cfg)


def test_servers_must_leave_a_worker():
    check_layout(3, 1)
    check_layout(3, 2)  # the last that leaves a worker
    for servers, fragment in [
        (3, "servers = 3 leaves no worker in a world of 3 ranks"),
        (0, "servers = 0 must be an integer >= 1"),
        (1.5, "servers = 1.5 must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_layout(3, servers)
        assert fragment in str(info.value) and "\n" not in str(info.value)
    assert "servers = 0 must be >= 1" in refused(config(servers=0))


# ---- the command line --------------------------------------------------------------------------

QUADRATIC = ["model.name=quadratic"]

CLI_ERRORS = [
    ("tau > steps", ["tau=30", "steps=20"], "tau = 30 is larger than steps = 20"),
    (
        "tau > steps, downpour",
        ["algorithm=downpour", "tau=30", "steps=20"],
        "push its updates to the center only once",
    ),
    (
        "tau > steps, allreduce-sgd",
        ["algorithm=allreduce-sgd", "tau=30", "steps=20"],
        "only after the last step",
    ),
    ("empty hidden layers", ["model.hidden=[]"], "model.hidden = [] gives model.name = 'mlp'"),
    (
        "no held-out sample",
        ["data.name=synthetic", "data.samples=10", "data.test_fraction=0.01"],
        "round(10*0.01) = 0 samples",
    ),
    (
        "no training sample",
        ["data.name=synthetic", "data.samples=10", "data.test_fraction=0.99"],
        "leaving none to train on",
    ),
    (
        "training split < batch",
        ["data.name=synthetic", "data.samples=100"],
        "training split has 80 samples",
    ),
    (
        "fewer samples than classes",
        ["data.name=synthetic", "data.samples=10", "data.classes=12", "batch_size=4"],
        "data.samples = 10 is fewer than data.classes = 12",
    ),
    (
        "nesterov bound (issue 10)",
        ["algorithm=eamsgd", "momentum=0.9", "lr=1.9", *QUADRATIC],
        "lr*h < 2*(1 + momentum)/(1 + 2*momentum) = 1.357 for momentum = 0.9",
    ),
    (
        "nesterov bound, allreduce-sgd",
        ["algorithm=allreduce-sgd", "momentum=0.99", "lr=1.34", *QUADRATIC],
        "= 1.336 for momentum = 0.99",
    ),
    (
        "elastic bound with momentum",
        ["algorithm=eamsgd", "momentum=0.9", "lr=0.5", "tau=1", "alpha=0.95", *QUADRATIC],
        "stable for alpha <= 0.9057",
    ),
    (
        "sync-easgd bound",
        ["algorithm=sync-easgd", "lr=1.0", "tau=1", "beta=1.2", *QUADRATIC],
        "stable for alpha <= 0.5, beta <= 1",
    ),
    ("servers = world size", ["servers=3"], "servers = 3 leaves no worker in a world of 3 ranks"),
    ("servers > world size", ["servers=7"], "servers = 7 leaves no worker"),
    ("servers < 1", ["servers=0"], "servers = 0 must be >= 1"),
    ("servers not an integer", ["servers=1.5"], "'servers' must be an integer, got 1.5"),
    (
        "sync-easgd alpha + beta",
        ["algorithm=sync-easgd", "alpha=0.7"],
        "alpha + beta = 0.7 + 2*0.7 = 2.1",
    ),
]


@pytest.mark.parametrize("label, sets, fragment", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_refused_on_every_rank_with_one_line_and_exit_2(
    label, sets, fragment, mpiexec, easgd_cmd, clean_env, tmp_path
):
    args = [arg for pair in sets for arg in ("--set", pair)]
    proc = subprocess.run(
        [mpiexec, "-n", "3", *easgd_cmd, "train", *args],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=tmp_path,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3, proc.stderr  # one per rank, nothing else
    assert sorted(ln.split("]")[0] for ln in lines) == [
        f"easgd: error: [rank {r}" for r in range(3)
    ], proc.stderr
    assert all(fragment in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize("command", ["train", "check"])
def test_a_bad_cuda_mpi_setting_is_one_line_per_rank(
    command, mpiexec, easgd_cmd, clean_env, tmp_path
):
    args = ["--set", "steps=20"] if command == "train" else []
    proc = run(
        [mpiexec, "-n", "3", *easgd_cmd, command, *args],
        {**clean_env, "EASGD_CUDA_MPI": "yes"},
        cwd=tmp_path,
    )
    assert_one_line_per_rank(proc, 3, "EASGD_CUDA_MPI='yes' is not a setting: use 1")
    assert not (tmp_path / "runs").exists()


# ---- data that cannot mean what the user wants: the real cause, one line per rank ------------


def _labels_far_beyond(n):
    y = np.arange(n) % 3
    y[5] = 65_000_000_000  # a raw identifier where a class index belongs
    return y


DATA_ERRORS = [
    # (label, samples, labels, fragment)
    (
        "a label far beyond the class count",
        600,
        _labels_far_beyond,
        "'y' holds label 65000000000, i.e. 65,000,000,001 classes for 600 samples",
    ),
    ("too small for both splits", 2, lambda n: np.arange(n) % 2, "has 2 samples: too few"),
    (
        "training split under a batch",
        5,
        lambda n: np.arange(n) % 2,
        "the training split has 4 samples, fewer than batch_size = 128",
    ),
]


@pytest.mark.parametrize(
    "label, samples, labels, fragment", DATA_ERRORS, ids=[d[0] for d in DATA_ERRORS]
)
def test_bad_data_names_the_real_cause_on_every_rank(
    label, samples, labels, fragment, mpiexec, clean_env, tmp_path
):
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.random.default_rng(0).random((samples, 10)), y=labels(samples))
    cmd = train_command(mpiexec, 3, tmp_path / "run", "data.name=file", f"data.path={path}")
    proc = run(cmd, clean_env, cwd=tmp_path)
    assert_one_line_per_rank(proc, 3, f"data file {path}")
    assert fragment in proc.stderr and "parameters" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder


def test_a_torch_model_with_too_few_outputs_is_refused_at_start_up(mpiexec, clean_env, tmp_path):
    """5 outputs on the 10 digit classes: the start-up check used to try 2 samples and pass,
    and training died in a worker with an IndexError traceback."""
    pytest.importorskip("torch", reason="the torch extra is installed by `make test`")
    (tmp_path / "five_outputs.py").write_text(
        "import torch\n\n\ndef build(cfg):\n    return torch.nn.Linear(64, 5)\n"
    )
    sets = ["model.name=torch", "model.factory=five_outputs:build", "steps=50"]
    cmd = train_command(mpiexec, 3, tmp_path / "run", *sets)
    proc = run(cmd, with_path(clean_env, tmp_path), timeout=180, cwd=tmp_path)
    assert_one_line_per_rank(
        proc, 3, "the model gives 5 outputs per sample but the training data has label 9"
    )
    assert not (tmp_path / "run").exists()
