"""`easgd export`: a checkpoint's center as a state_dict (.pt) or arrays (.npz), and its errors."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import CheckpointData, save_checkpoint  # noqa: E402
from easgd_mpi.models.torch_binding import layout_of  # noqa: E402
from easgd_mpi.workerstate import COUNTERS, WorkerStates  # noqa: E402


def write_checkpoint(path, module):
    layout, trainable, local = layout_of(torch, module)
    center = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32)
    data = CheckpointData(
        config_toml='algorithm = "easgd"\n',
        algorithm="easgd",
        layout=layout,
        center=center,
        states=WorkerStates(
            counters={k: np.zeros(1, np.int64) for k in COUNTERS}, rng_words=np.zeros((1, 6))
        ),
        trainable_size=trainable,
        local_tensors={k: v.numpy() + 7 for k, v in local.items()},
    )
    save_checkpoint(path, data)
    return layout, center


def export(*args):
    return subprocess.run(
        [sys.executable, "-m", "easgd_mpi", "export", *map(str, args)],
        capture_output=True,
        text=True,
    )


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )


def test_pt_and_npz_hold_the_center_under_the_modules_names(tmp_path):
    ckpt = tmp_path / "checkpoint-000001.h5"
    layout, center = write_checkpoint(ckpt, model())
    assert export(ckpt, "-o", tmp_path / "m.pt").returncode == 0
    assert export(ckpt, "-o", tmp_path / "c.npz").returncode == 0
    fresh = model()
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert not fresh.load_state_dict(state).missing_keys
    assert int(fresh[1].num_batches_tracked) == 7  # the stored integer buffer
    for spec in layout.specs:
        expected = center[spec.offset : spec.offset + spec.size].reshape(spec.shape)
        np.testing.assert_array_equal(fresh.state_dict()[spec.name].numpy(), expected)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == set(fresh.state_dict())
        np.testing.assert_array_equal(arrays["1.running_var"], fresh[1].running_var.numpy())
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed


@pytest.mark.parametrize(
    "target, fragment",
    [("model.pkl", "must end in .pt or .pth"), ("no/such/folder/m.pt", "cannot write")],
)
def test_bad_targets_are_one_line(tmp_path, target, fragment):
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    proc = export(ckpt, "-o", tmp_path / target)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])  # a copy cut short
    proc = export(ckpt, "-o", tmp_path / "m.pt")
    assert proc.returncode == 2 and str(ckpt) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.pt").exists()
