"""One training run per workdir: a lock file that process 0 holds while it trains.

`<workdir>/run.lock` is created exclusively (`O_CREAT | O_EXCL`, which shared filesystems such as NFS honour) and
holds the owner's host, process id and start time; the owner refreshes its modification time as it runs
(`heartbeat`). A second run refuses to start with one line naming the holder. A lock left behind by a run that
was killed is taken over: on the same host when its process no longer exists, from any host when its heartbeat is
older than `stale_after` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("eomt_jax")

LOCK_FILE = "run.lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike, *, stale_after: float = 600.0):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self.stale_after = stale_after
        self.held = False

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                reason = self._stale(holder)
                if reason is None or attempt:
                    raise WorkdirBusy(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on host "
                        f"{holder.get('host')}, started {holder.get('started')}); wait for it to finish or use "
                        f"another --workdir (if that run is dead, delete {self.path})"
                    ) from None
                log.warning("taking over %s: %s", self.path, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            return self
        raise AssertionError("unreachable")

    def heartbeat(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def _stale(self, holder: dict) -> str | None:
        """Why the lock of `holder` is stale, or None when its run may still be alive."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} on this host no longer exists"
            except PermissionError:
                return None  # alive, owned by another user
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        if age > self.stale_after:
            return f"its owner has not refreshed it for {age:.0f} s (more than {self.stale_after:.0f} s)"
        return None
