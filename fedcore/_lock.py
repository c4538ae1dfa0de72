"""One process per store or state folder: an exclusive ``flock`` on a lock file beside it.

The lock file is the tool's own (created 0600, holding the holder's PID as text; a file of
that name holding anything else is refused, never overwritten). It is never deleted, since
removing it while another process waits on it would let two in. The kernel drops the lock
when its holder exits, however it exits (SIGKILL too), so a crashed gateway or agent never
leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path


class AlreadyLocked(Exception):
    """Another live process holds the lock: ``pid`` (``None`` if it wrote none yet)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is locked by PID {pid}")
        self.path = path
        self.pid = pid


class ProcessLock:
    """Hold ``path`` exclusively until :meth:`release` (or the process ends)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyLocked(self.path, int(raw) if raw.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        held = os.read(fd, 64).decode(errors="replace").strip()
        if held and not held.isdigit():  # not a lock file of ours: never overwrite it
            os.close(fd)
            raise FileExistsError(f"{self.path} exists and is not a lock file (it holds no PID)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_beside(
    path: str | os.PathLike[str], *, holder: str, error: Callable[[str], Exception]
) -> ProcessLock:
    """Hold ``<path>.lock`` for the one process that may own ``path``; ``holder`` names its
    kind ("a gateway") in the refusal, raised as ``error(message)``."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    try:
        return ProcessLock(lock)
    except AlreadyLocked as exc:
        message = f"{holder} is already running on {path} (PID {exc.pid}; lock {lock})"
        raise error(message) from None
    except OSError as exc:
        raise error(f"cannot lock {path}: {exc}") from None
