"""One run per run folder: a lock file that works on NFS and Lustre and never outlives its run.

The master takes ``<run_dir>/easgd.lock`` before it writes anything in the folder and removes it
when the run ends. Why a lock *file* and not ``fcntl``/``flock`` (docs/CHECKPOINT.md, "The run
folder lock"): whether POSIX or BSD locks are seen by other nodes depends on mount options
(NFS ``nolock``, Lustre ``localflock``/``noflock``), and where they are not, two runs on two
nodes would both get "their" lock without a word. Creating a name that must not exist is
decided by the file server (NFS) or the metadata server (Lustre) under every mount option.

- Taking it: the holder's description (host, pid, boot id, pid namespace, process start time,
  a random token) is written and fsynced under a unique name, then hard-linked to
  ``easgd.lock``; ``link`` fails if the name exists, atomically, on NFS v2-v4 and Lustre (the
  lock-file recipe of ``open(2)``). A lost NFS reply is recognised by the unique file's link
  count. Where hard links are not supported, ``O_CREAT | O_EXCL`` is used instead.
- While the run lives, a daemon thread of the master touches the file every ``HEARTBEAT``
  seconds (and checks it still holds its token).
- A lock left by a run that is gone is recognised and taken over: on the same machine (same
  host name, boot id and pid namespace) at once, when the pid is not alive or belongs to a
  process started later (SIGKILL, crash, ``MPI_Abort``); from another machine (node death), when
  its heartbeat is more than ``STALE_AFTER`` seconds old. Ages are measured against the
  modification time of a file this process has just written in the same folder, so the file
  system's clock is compared with itself, never with this node's. A younger heartbeat from
  another machine is watched until it beats (the holder lives: refused) or goes stale.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from .errors import RunFolderError, os_reason

__all__ = ["LOCK_NAME", "HEARTBEAT", "STALE_AFTER", "RunLock", "acquire", "release", "holder_of"]

#: The lock file's name inside the run folder.
LOCK_NAME = "easgd.lock"
#: Seconds between two refreshes of the lock file's modification time.
HEARTBEAT = 10.0
#: A lock from another machine whose heartbeat is older than this is abandoned (seconds).
#: Six beats: a master held up by a long checkpoint write or a slow file server is not "gone".
STALE_AFTER = 60.0

_LINK_UNSUPPORTED = {errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
#: Locks this process holds, by folder (absolute path).
_HELD: dict[str, RunLock] = {}


class RunLock:
    """A held run-folder lock; :meth:`release` (or interpreter exit) gives it back."""

    def __init__(self, folder: Path, raw: bytes, heartbeat: float):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.raw = raw
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat,), name="easgd-lock-heartbeat", daemon=True
        )
        self._thread.start()
        atexit.register(self.release)

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                with open(self.path, "rb") as fh:
                    current = fh.read()
                if current != self.raw:
                    self._warn_once(f"was taken by another run ({_describe(_parse(current))})")
                    continue
                os.utime(self.path)
            except FileNotFoundError:
                self._warn_once("was removed")
            except OSError as exc:
                self._warn_once(f"cannot be refreshed ({os_reason(exc)})")

    def _warn_once(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            _stderr(
                f"easgd: warning: the run folder lock {self.path} {what}: this run no longer "
                f"owns {self.folder}"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        atexit.unregister(self.release)
        _HELD.pop(str(self.folder), None)
        try:
            with open(self.path, "rb") as fh:
                ours = fh.read() == self.raw
            if ours:
                self.path.unlink()
        except OSError:
            pass  # gone with its folder, or taken over: nothing of ours to remove


def acquire(
    folder, *, heartbeat: float = HEARTBEAT, stale_after: float = STALE_AFTER, note=None
) -> RunLock:
    """Take ``folder``'s lock or raise :class:`RunFolderError` naming the folder and holder.

    ``note`` (default: stderr) gets a line when a lock that is gone is taken over, or while a
    lock from another machine is watched.
    """
    folder = Path(folder).absolute()
    note = note or _stderr
    earlier = _HELD.get(str(folder))
    if earlier is not None:  # an earlier train() of this process that ended without releasing
        earlier.release()
    me = _identity()
    raw = (json.dumps(me) + "\n").encode()
    mine = folder / f".{LOCK_NAME}.{me['host']}.{me['pid']}.{me['token'][:8]}"
    try:
        _write_synced(mine, raw)
    except OSError as exc:
        with contextlib.suppress(OSError):
            mine.unlink(missing_ok=True)
        raise RunFolderError(
            f"run folder {folder} cannot be locked: cannot write {mine}: {os_reason(exc)}"
        ) from None
    try:
        for _ in range(10):  # each pass: one attempt, or one lock that is gone taken away
            if _link(mine, folder / LOCK_NAME, raw):
                lock = RunLock(folder, raw, heartbeat)
                _HELD[str(folder)] = lock
                return lock
            verdict, holder, current = _judge(folder, mine, me, stale_after, note)
            if verdict == "retry":
                continue
            if verdict == "alive":
                raise RunFolderError(_refusal(folder, holder))
            if _break(folder, current, me):
                note(
                    f"easgd: note: run folder {folder} was locked by a run that is gone "
                    f"({_describe(holder)}): lock taken over"
                )
        raise RunFolderError(
            f"run folder {folder} cannot be locked: other runs keep taking it; start one run "
            f"per run_dir"
        )
    except OSError as exc:
        raise RunFolderError(
            f"run folder {folder} cannot be locked: {getattr(exc, 'filename', None) or folder}: "
            f"{os_reason(exc)}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            mine.unlink(missing_ok=True)


def release(folder) -> None:
    """Release this process's lock on ``folder`` (nothing if it holds none)."""
    lock = _HELD.get(str(Path(folder).absolute()))
    if lock is not None:
        lock.release()


def holder_of(folder) -> dict | None:
    """The description in ``folder``'s lock file (None: no lock, or unreadable)."""
    try:
        return _parse((Path(folder) / LOCK_NAME).read_bytes())
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------


def _identity() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "start": _start_ticks(os.getpid()),
        "token": secrets.token_hex(16),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_synced(path: Path, raw: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(mine: Path, lock: Path, raw: bytes) -> bool:
    """Create ``lock`` holding ``raw`` if it does not exist; True when this process has it."""
    try:
        os.link(mine, lock)
        return True
    except FileExistsError:
        # NFS may retransmit a link whose reply was lost: then the link exists and is ours.
        return os.stat(mine).st_nlink == 2
    except OSError as exc:
        if exc.errno not in _LINK_UNSUPPORTED:
            raise
    try:  # no hard links here: an exclusive create, decided by the server as well
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _judge(folder: Path, mine: Path, me: dict, stale_after: float, note):
    """("alive" | "gone" | "retry", holder, raw content) for the lock that is in the way."""
    lock = folder / LOCK_NAME
    seen = _look(lock, mine)
    if seen is None:
        return "retry", None, b""  # released meanwhile: try again
    current, age, mtime = seen
    holder = _parse(current)
    if holder is not None and _same_machine(holder, me):
        if holder.get("pid") == me["pid"]:
            # This process: a lock an earlier train() here did not release, unless held now.
            live = any(h.raw == current for h in _HELD.values())
            return ("alive" if live else "gone"), holder, current
        return ("alive" if _alive(holder) else "gone"), holder, current
    # Another machine (or an unreadable lock): only its heartbeat tells.
    if age > stale_after:
        return "gone", holder, current
    note(
        f"easgd: run folder {folder} is locked by {_describe(holder)}, heartbeat {age:.0f}s "
        f"ago: waiting up to {stale_after - age:.0f}s for it to beat again or go stale"
    )
    while True:
        time.sleep(min(1.0, max(0.05, stale_after / 60)))
        seen = _look(lock, mine)
        if seen is None or seen[0] != current:
            return "retry", holder, current  # released, or taken by another run
        if seen[2] != mtime:
            return "alive", holder, current
        if seen[1] > stale_after:
            return "gone", holder, current


def _look(lock: Path, mine: Path) -> tuple[bytes, float, int] | None:
    """(content, heartbeat age in s, mtime in ns) of ``lock``; None if it does not exist.

    Opening the file (not only stat) makes an NFS client revalidate its cached attributes
    (close-to-open consistency); "now" is the mtime of ``mine`` touched just before, a time
    stamped by the same file system.
    """
    try:
        with open(lock, "rb") as fh:
            content = fh.read()
            mtime = os.fstat(fh.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None
    os.utime(mine)
    now = os.stat(mine).st_mtime_ns
    return content, max(0.0, (now - mtime) / 1e9), mtime


def _break(folder: Path, stale: bytes, me: dict) -> bool:
    """Remove a lock judged gone; True if it was that lock (not one a third run just took)."""
    lock = folder / LOCK_NAME
    aside = folder / f".{LOCK_NAME}.gone-{me['token'][:8]}"
    try:
        os.rename(lock, aside)  # atomic: of two runs breaking it, one gets it
    except FileNotFoundError:
        return False
    try:
        if aside.read_bytes() == stale:
            return True
        # A new lock replaced the stale one between the look and the rename: give it back.
        try:
            os.link(aside, lock)
        except OSError:
            pass  # yet another run holds it now; the one moved aside will warn
        return False
    finally:
        aside.unlink(missing_ok=True)


def _same_machine(holder: dict, me: dict) -> bool:
    return all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")) and bool(
        me["boot_id"]
    )


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    fields = _stat_fields(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # a zombie: dead, only not reaped (an init that never reaps, a container)
    start = holder.get("start")
    return start is None or _start_ticks(pid) in (None, start)  # a reused pid started later


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; [] where there is no /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if ")" in text else []


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        return int(_stat_fields(pid)[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _parse(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "an unknown run (the lock file is unreadable)"
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
        f"{holder.get('since', '?')}"
    )


def _refusal(folder: Path, holder: dict | None) -> str:
    return (
        f"run folder {folder} is in use by another run ({_describe(holder)}): wait for it to "
        f"end or choose another run_dir; if that run is gone, delete {folder / LOCK_NAME}"
    )


def _stderr(line: str) -> None:
    # On stderr, as it always was: a lock taken over or waited for is worth a user's notice.
    logging.getLogger(__name__).warning(line)
