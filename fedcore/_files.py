"""Writing files without destroying anyone else's.

Two rules hold everywhere fedledger writes:

- A file is replaced atomically: the bytes go to a new file beside it (``O_EXCL``, so an
  existing file of that name is never reused), are flushed to disk, and the new file is
  renamed over the old one. A reader never sees half a file; a crash leaves the old one.
- A folder is emptied or recreated only when fedledger made it: such a folder carries a
  marker file (``.fedledger-site``) naming the command that created it. A folder without the
  marker is a user's folder, whatever it holds; fedledger may add to an empty one, and refuses
  anything else with :class:`UnsafePathError`. ``/``, the home directory, the current
  directory and its parents are refused even when they carry a marker.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ._errors import FedledgerError

MARKER = ".fedledger-site"


class UnsafePathError(FedledgerError):
    """fedledger refuses to empty, replace or write into ``path``; ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}; nothing was changed")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically, the new file created with ``mode``
    (private keys pass ``0o600``: no moment of wider permissions, whatever the umask)."""
    target = Path(path)
    if target.is_dir():
        raise UnsafePathError(target, "is a folder, expected a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widened
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def read_marker(folder: str | os.PathLike[str]) -> dict | None:
    """The marker of a folder fedledger made, or ``None`` (no marker, or not one of ours)."""
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return None
    return data


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be emptied or replaced, whatever it carries."""
    if path == Path(path.anchor):
        return "is the file system root"
    homes = {Path.home().resolve()}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]).resolve())
    if path in homes:
        return "is a home directory"
    cwd = Path.cwd().resolve()
    if path == cwd:
        return "is the current directory"
    if path in cwd.parents:
        return "holds the current directory"
    return None


def check_folder(path: str | os.PathLike[str], *, kind: str, fresh: bool = False) -> Path:
    """``path`` resolved, if fedledger may make it a folder of ``kind`` (emptied first with
    ``fresh``); else :class:`UnsafePathError`, and nothing is touched.

    Allowed: a missing path, an empty folder, or a folder carrying fedledger's marker of the
    same ``kind``. Refused: a file, a symbolic link, a folder with content but no marker, a
    folder of another kind, and (when it would be emptied, or when it is not ours yet) ``/``,
    a home directory, the current directory or one of its parents.
    """
    folder = Path(path).expanduser().absolute()
    resolved = folder.resolve()
    if folder.is_symlink():
        raise UnsafePathError(folder, f"is a symbolic link (to {resolved}); name the folder itself")
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise UnsafePathError(folder, "is a file, not a folder")
    marker = read_marker(resolved)
    if (marker is None or fresh) and (reason := _protected(resolved)):
        raise UnsafePathError(folder, reason)
    if marker is None and any(resolved.iterdir()):
        raise UnsafePathError(
            folder, f"is not empty and was not made by fedledger (no {MARKER} marker)"
        )
    if marker is not None and marker["kind"] != kind:
        raise UnsafePathError(
            folder,
            f"was made by {marker.get('created_by', 'fedledger')} as a {marker['kind']},"
            f" not a {kind}",
        )
    return resolved


def claim_folder(
    path: str | os.PathLike[str], *, kind: str, created_by: str, fresh: bool = False
) -> Path:
    """Make ``path`` a folder of ``kind`` that fedledger owns (see :func:`check_folder` for
    what is refused) and return it resolved: created and marked when missing or empty, kept
    as it is when already marked, or emptied first with ``fresh``."""
    folder = check_folder(path, kind=kind, fresh=fresh)
    if folder.is_dir() and read_marker(folder) is not None:
        if fresh:
            _empty_owned(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind=kind, created_by=created_by)
    return folder


@contextlib.contextmanager
def fresh_folder(path: str | os.PathLike[str], *, kind: str, created_by: str) -> Iterator[Path]:
    """An empty folder of ``kind`` at ``path`` for the block to fill. An older folder of the
    same kind is moved aside, removed once the block succeeds, and put back if it fails, so a
    failed run never costs the previous results. Refusals are those of :func:`check_folder`."""
    target = check_folder(path, kind=kind, fresh=True)
    aside = None
    if target.is_dir() and read_marker(target) is not None:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    try:
        yield claim_folder(target, kind=kind, created_by=created_by)
    except BaseException:
        if aside is not None:
            remove_owned_folder(target, kind=kind)
            os.replace(aside, target)
        raise
    if aside is not None:
        remove_owned_folder(aside, kind=kind)


def write_marker(folder: Path, *, kind: str, created_by: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    atomic_write_text(
        folder / MARKER,
        json.dumps({"kind": kind, "created_by": created_by, "created": stamp}, indent=1) + "\n",
    )


def _empty_owned(folder: Path) -> None:
    """Remove what a marked folder holds, the marker last (a crash midway keeps the claim).
    Symbolic links are removed, never followed."""
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_owned_folder(path: str | os.PathLike[str], *, kind: str) -> None:
    """Remove a folder that carries fedledger's marker of ``kind``; refuse anything else."""
    folder = Path(path).absolute()
    marker = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if marker is None or marker["kind"] != kind:
        raise UnsafePathError(folder, f"is not a {kind} fedledger made")
    if reason := _protected(folder.resolve()):
        raise UnsafePathError(folder, reason)
    _empty_owned(folder)
    (folder / MARKER).unlink()
    folder.rmdir()
