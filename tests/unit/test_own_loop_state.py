"""A user loop's own state (easgd_mpi.torch.state, workerstate.UserState): what an optimizer, a
schedule, a gradient scaler and a user's dict hold goes through JSON and plain arrays, a
message and an HDF5 checkpoint, and comes back exactly; what cannot be stored safely is
refused when it is saved, naming where it is; a damaged state never loads."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import (  # noqa: E402
    CheckpointData,
    format_summary,
    load_checkpoint,
    save_checkpoint,
    summarize,
)
from easgd_mpi.errors import CheckpointError, ConfigError  # noqa: E402
from easgd_mpi.flat import Layout  # noqa: E402
from easgd_mpi.torch.state import decode_state, encode_state  # noqa: E402
from easgd_mpi.workerstate import UserState, WorkerStates  # noqa: E402


def trained_state():
    """The state of a few AdamW steps with a one-cycle schedule and a gradient scaler."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        loss = model(torch.randn(5, 3)).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    return {
        "optimizer": opt.state_dict(),
        "schedulers": [sched.state_dict()],
        "scaler": scaler.state_dict(),
        "mine": {
            1: (1.5, float("nan"), -math.inf),
            "deep": [None, True, "text", torch.tensor([1.0, 2.0], dtype=torch.bfloat16)],
            "ints": torch.arange(4),
            "array": np.array([[1, 2], [3, 4]], np.int16),
            "size": torch.Size([2, 3]),
            "scalar": np.float64(0.25),
        },
        "rng": torch.get_rng_state(),
    }


def assert_same(a, b, path="state"):
    """Equal, bit for bit, and of the same types (tuples stay tuples, int keys stay ints)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
            b.view(torch.uint8) if b.dtype == torch.bfloat16 else b,
        ), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b and type(a) is type(b), path


def test_a_trained_state_comes_back_exactly_through_a_message():
    state = trained_state()
    assert state["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    message = encode_state(state).to_bytes()
    back = decode_state(UserState.from_bytes(message))
    expected = dict(state)
    expected["mine"] = dict(state["mine"], size=(2, 3), scalar=0.25)  # as plain values
    assert_same(back, expected)
    # and it still drives the objects it came from
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(back["optimizer"])
    assert_same(opt.state_dict()["state"], state["optimizer"]["state"])


def test_the_structure_is_json_and_the_arrays_are_numbers():
    state = encode_state({"w": torch.ones(3), 2: [1, 2.5]})
    assert state.structure.startswith('{"dict": ')
    assert [a.dtype for a in state.arrays] == [np.float32]


@pytest.mark.parametrize(
    ("leaf", "named"),
    [
        (lambda: 1, "state['fn'] is a function"),
        (object(), "state['fn'] is a object"),
        (torch.ones(2, dtype=torch.complex64), "state['fn'] is a torch.complex64 tensor"),
        (np.array(["a"], dtype=object), "state['fn'] is a ndarray"),
    ],
)
def test_what_cannot_be_stored_safely_is_refused_by_name(leaf, named):
    with pytest.raises(
        ConfigError,
        match="cannot save the schedule: " + named.replace("[", r"\[").replace("]", r"\]"),
    ):
        encode_state({"fn": leaf}, "the schedule")


@pytest.mark.parametrize(
    "structure",
    [
        '{"dict": [["a", {"tensor": 5, "dtype": "float32", "shape": [1]}]]}',  # no array 5
        '{"dict": [["a", {"pickle": "x"}]]}',  # no such tag
        '{"a": 1}',  # an untagged object
        '{"dict": [["a", {"tensor": 0, "dtype": "float32", "shape": [1]}]]}',  # int64 stored
        "not json",
    ],
)
def test_a_damaged_state_is_a_checkpoint_error(structure):
    with pytest.raises(CheckpointError, match="the user state in the checkpoint is not readable"):
        decode_state(UserState(structure, [np.zeros(1, np.int64)]))


def test_a_message_holds_numbers_only():
    good = UserState('{"list": []}', [np.arange(3, dtype=np.int32)]).to_bytes()
    assert UserState.from_bytes(good).arrays[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        UserState.from_bytes(good[:-10])  # truncated (the last 4 bytes are padding)
    with pytest.raises(ValueError):
        UserState.from_bytes(b"garbage!" + good[8:])
    with pytest.raises(ValueError):
        UserState("{}", [np.array([object()])])


def checkpoint_with(user):
    layout = Layout([("w", (3,))])
    states = WorkerStates.starting(
        2, [np.random.default_rng(i) for i in range(2)], {"x": np.ones(layout.size, np.float32)}
    )
    states.user = user
    return CheckpointData(
        config_toml="",
        algorithm="sync-easgd",
        layout=layout,
        center=np.zeros(layout.size, np.float32),
        states=states,
    )


def test_user_states_in_a_checkpoint_come_back_and_are_checksummed(tmp_path):
    mine = encode_state(trained_state())
    path = save_checkpoint(tmp_path / "checkpoint-000001.h5", checkpoint_with([mine, None]))
    back = load_checkpoint(path)
    assert back.format_version == 3  # older readers refuse it by its version
    assert back.states.user[1] is None
    assert back.states.user[0].structure == mine.structure
    assert all(
        np.array_equal(a, b) for a, b in zip(back.states.user[0].arrays, mine.arrays, strict=True)
    )
    summary = summarize(back, path)  # easgd inspect
    assert summary["user_states"] == [mine.nbytes, None]
    assert "own states (your loop: optimizer, schedules, sampler, ...): 1 of 2 saved" in (
        format_summary(summary)
    )
    plain = save_checkpoint(tmp_path / "checkpoint-000002.h5", checkpoint_with(None))
    assert load_checkpoint(plain).format_version == 2 and load_checkpoint(plain).states.user is None

    import h5py  # noqa: PLC0415

    with h5py.File(path, "r+") as f:
        data = f["workers/user/0/0"]
        data[...] = data[()] + 1
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_checkpoint(path)
