"""The run-folder lock (src/easgd_mpi/runlock.py) with real processes and real files."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from easgd_mpi import runlock
from easgd_mpi.errors import RunFolderError

HOLD = """
import sys, time
from easgd_mpi import runlock
runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _other_machine(tmp_path, age: float, **extra) -> bytes:
    """A lock file as a run on another machine left it, its heartbeat ``age`` seconds old."""
    raw = (
        json.dumps({"host": "node-elsewhere", "pid": 4242, "boot_id": "b", "token": "t", **extra})
        + "\n"
    ).encode()
    lock = tmp_path / runlock.LOCK_NAME
    lock.write_bytes(raw)
    then = time.time() - age
    os.utime(lock, (then, then))
    return raw


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    lock = runlock.acquire(tmp_path)
    try:
        holder = runlock.holder_of(tmp_path)
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [runlock.LOCK_NAME]
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_and_a_killed_one_is_taken_over(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError) as refused:
            runlock.acquire(tmp_path)
        text = str(refused.value)
        assert f"run folder {tmp_path} is in use" in text
        assert f"host {socket.gethostname()}, pid {child.pid}" in text
        assert "\n" not in text
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    notes = []
    lock = runlock.acquire(tmp_path, note=notes.append)  # the holder is gone: at once
    try:
        assert runlock.holder_of(tmp_path)["pid"] == os.getpid()
        assert len(notes) == 1 and f"pid {child.pid}" in notes[0] and "taken over" in notes[0]
    finally:
        lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    me = runlock._identity()
    stale = {**me, "pid": os.getppid(), "start": -1, "token": "old"}  # alive, but started later
    (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(stale) + "\n")
    lock = runlock.acquire(tmp_path, note=lambda line: None)
    lock.release()


def test_a_zombie_holder_is_gone(tmp_path):
    # A killed master that nobody reaps (an init that never reaps, in a container) still
    # answers kill(pid, 0): its state says it is dead.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while runlock._stat_fields(child.pid)[:1] != ["Z"] and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        zombie = {
            **runlock._identity(),
            "pid": child.pid,
            "start": runlock._start_ticks(child.pid),
        }
        (tmp_path / runlock.LOCK_NAME).write_text(json.dumps(zombie) + "\n")
        notes = []
        runlock.acquire(tmp_path, note=notes.append).release()
        assert len(notes) == 1 and f"pid {child.pid}" in notes[0]
    finally:
        child.wait()


def test_another_machine_lock_is_judged_by_its_heartbeat(tmp_path):
    _other_machine(tmp_path, age=3600)  # long dead
    notes = []
    lock = runlock.acquire(tmp_path, stale_after=60, note=notes.append)
    lock.release()
    assert "node-elsewhere" in notes[-1] and "taken over" in notes[-1]

    # A fresh heartbeat that stops: watched, then taken over once older than stale_after.
    _other_machine(tmp_path, age=0)
    start = time.monotonic()
    lock = runlock.acquire(tmp_path, stale_after=1.0, note=notes.append)
    lock.release()
    assert 0.8 <= time.monotonic() - start < 10
    assert any("waiting up to" in n for n in notes)

    # A heartbeat that goes on: the holder lives, refused.
    _other_machine(tmp_path, age=0)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            os.utime(tmp_path / runlock.LOCK_NAME)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunFolderError, match="host node-elsewhere, pid 4242"):
            runlock.acquire(tmp_path, stale_after=5.0, note=lambda line: None)
    finally:
        stop.set()
        thread.join()


def test_the_heartbeat_refreshes_and_release_keeps_a_lock_that_is_not_ours(tmp_path, caplog):
    lock = runlock.acquire(tmp_path, heartbeat=0.05)
    path = tmp_path / runlock.LOCK_NAME
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 5
    while path.stat().st_mtime < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > time.time() - 60
    path.write_text(json.dumps({"host": "x", "pid": 1, "token": "other"}) + "\n")
    deadline = time.monotonic() + 5
    while "no longer owns" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    err = caplog.text  # a warning of the easgd_mpi logger (stderr on the console)
    lock.release()
    assert f"the run folder lock {path} was taken by another run (host x, pid 1" in err
    assert path.exists()  # another run's lock is not removed by this one


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(RunFolderError, match=f"run folder {missing} cannot be locked: .*No such"):
        runlock.acquire(missing)
