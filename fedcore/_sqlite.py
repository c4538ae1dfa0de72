"""Opening a SQLite file for reading only, without a trace on disk.

``verify``, ``history`` and the other read-only commands get whatever file a user names:
the right one, the gateway's store instead of the ledger, or an unrelated database. None of
them may change it: no table created, no journal mode switched, no ``-wal`` or ``-shm`` file
left beside it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from ._errors import FedledgerError

_HEADER = b"SQLite format 3\x00"


class NotADatabaseError(FedledgerError):
    """The path is missing, or not a SQLite database."""


def connect_readonly(
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[FedledgerError] = NotADatabaseError,
) -> sqlite3.Connection:
    """A read-only connection to the SQLite file ``path``; ``what`` names it in errors,
    raised as ``error`` (a component passes its own root, e.g. ``LedgerError``).

    A database in WAL mode needs its ``-shm`` index to be read; when no other connection has
    one open (no ``-shm`` file beside it), the file is opened ``immutable`` so that none is
    created. When a writer is live, its ``-wal`` and ``-shm`` files are there already and are
    shared, read-only.
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            header = handle.read(100)
    except IsADirectoryError:
        raise error(f"{file} is a folder, not a {what}") from None
    except FileNotFoundError:
        raise error(f"no {what} at {file}") from None
    except OSError as exc:
        raise error(f"cannot read {file}: {exc.strerror}") from None
    if len(header) < 100 or not header.startswith(_HEADER):
        raise error(f"{file} is not a {what} (not a SQLite database)")
    wal = header[18] == 2 or header[19] == 2
    shm = file.with_name(file.name + "-shm")
    immutable = wal and not shm.exists()
    uri = f"file:{quote(str(file.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only=ON")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise error(f"cannot read {file} as a {what}: {exc}") from None
    return db


def table_names(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
