"""One writer per output folder: a lock that two runs of a job on the same output take in turn.

``{out}/_prepare.lock`` holds the owner as JSON (run id, host, pid, start time, heartbeat). Two kinds:

* Local folder (also NFS v4, which Linux maps ``flock`` onto): an exclusive ``flock`` on the file. The
  kernel drops it when the owner dies, however it dies, so there is no stale lock to clean up; the file's
  content names the last owner, whose temp files the next owner may delete (that run is over).
* Object stores (``s3://`` …) have no locks, and pyarrow's S3 client cannot send a conditional PUT, so the
  lock object is best-effort: a run refuses when the object names another owner whose heartbeat is
  fresh; otherwise it writes its own record, waits ``settle`` seconds and reads it back, and refuses if
  another run's record replaced it (both wrote at once: the later write wins, the earlier one backs off).
  Two runs starting within less than the PUT's latency of each other could still both proceed; a run
  that finds later that its record was replaced stops (see :meth:`RunLock.check`). The owner refreshes
  the heartbeat every ``heartbeat`` seconds; a record older than ``stale_after`` belongs to a dead run and
  is taken over. ``break_lock=True`` takes it over at once (the user says the other run is dead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from typing import Any

import pyarrow.fs as pafs

from pipeline import shards

LOCK_NAME = "_prepare.lock"


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (so a reused pid is not mistaken for its predecessor)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclasses.dataclass
class RunLock:
    """Hold the lock of ``base`` on ``filesystem`` for run ``run_id``: ``with RunLock(...) as lock:``.

    After :meth:`acquire`, ``previous`` is the record of the run that held it before (None if none):
    that run is over, so its temp files may go.
    """

    filesystem: pafs.FileSystem
    base: str
    run_id: str
    stale_after: float = 300.0
    heartbeat: float = 30.0
    settle: float = 1.0
    break_lock: bool = False
    previous: dict[str, Any] | None = dataclasses.field(default=None, init=False)
    _fd: int | None = dataclasses.field(default=None, init=False, repr=False)
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = dataclasses.field(default=None, init=False, repr=False)
    _lost: str | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def path(self) -> str:
        return shards.join(self.base, LOCK_NAME)

    def record(self, state: str = "running") -> dict[str, Any]:
        pid = os.getpid()
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _process_start(pid),
            "heartbeat": time.time(),
            "state": state,
        }

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ local

    def acquire(self) -> RunLock:
        self.filesystem.create_dir(self.base, recursive=True)
        local = shards.local_path(self.filesystem, self.path)
        if local is not None:
            self._acquire_local(local)
        else:
            self._acquire_object()
        return self

    def probe(self) -> None:
        """Raise :class:`OutputLocked` if another run holds the lock now; takes and changes nothing."""
        local = shards.local_path(self.filesystem, self.path)
        if local is not None:
            import fcntl

            try:
                fd = os.open(local, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputLocked(self._refusal(_parse(_read_fd(local)), local)) from None
            finally:
                os.close(fd)  # closing drops the probe's lock
            return
        current = self._read_object()
        if self._held_by_other(current):
            raise OutputLocked(self._refusal(current or {}, self.path))

    def _held_by_other(self, current: dict[str, Any] | None) -> bool:
        if current is None or current.get("state") != "running" or self.break_lock:
            return False
        return time.time() - float(current.get("heartbeat") or 0) < self.stale_after

    def _acquire_local(self, path: str) -> None:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLocked(self._refusal(_parse(_read_fd(path)), path)) from None
        self.previous = _parse(os.pread(fd, 1 << 16, 0))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _acquire_object(self) -> None:
        current = self._read_object()
        if self._held_by_other(current):
            raise OutputLocked(self._refusal(current or {}, self.path))
        self.previous = current
        shards.write_json_atomic(self.filesystem, self.path, self.record(), run_id=self.run_id)
        time.sleep(self.settle)
        back = self._read_object()
        if back is None or back.get("run_id") != self.run_id:
            raise OutputLocked(self._refusal(back or {}, self.path, raced=True))
        self._thread = threading.Thread(target=self._beat, name="prepare-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read_object(self) -> dict[str, Any] | None:
        try:
            return _parse(shards.read_bytes(self.filesystem, self.path))
        except (FileNotFoundError, OSError):
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.refresh():
                return

    def refresh(self) -> bool:
        """Object stores: renew the heartbeat if the lock still names this run; False (and :meth:`check`
        raises from then on) when another run took it over."""
        current = self._read_object()
        if current is None or current.get("run_id") != self.run_id:
            self._lost = f"the lock {self.path} now names run {(current or {}).get('run_id')}"
            return False
        shards.write_json_atomic(self.filesystem, self.path, self.record(), run_id=self.run_id)
        return True

    def check(self) -> None:
        """Raise :class:`OutputLocked` if another run took the (object store) lock over meanwhile."""
        if self._lost:
            raise OutputLocked(f"lost the output lock: {self._lost}; stopping so two runs do not mix")

    def release(self, state: str = "released") -> None:
        if self._fd is not None:
            import fcntl

            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.record(state)).encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            current = self._read_object()
            if current is not None and current.get("run_id") == self.run_id:
                shards.write_json_atomic(self.filesystem, self.path, self.record(state), run_id=self.run_id)

    def _refusal(self, owner: dict[str, Any], path: str, raced: bool = False) -> str:
        who = (
            f"run {owner.get('run_id', '?')} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')}"
            + (
                f", heartbeat {time.time() - float(owner['heartbeat']):.0f} s ago)"
                if owner.get("heartbeat")
                else ")"
            )
        )
        if raced:
            return f"{path}: another run took the output at the same moment: {who}; not starting"
        hint = (
            "wait for it to finish"
            if shards.local_path(self.filesystem, path) is not None
            else f"wait for it to finish, or if it is dead, for {self.stale_after:.0f} s without heartbeat "
            "(or pass --break-lock)"
        )
        return f"{path}: the output is being written by {who}; {hint}"


def _read_fd(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError:
        return b""


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
