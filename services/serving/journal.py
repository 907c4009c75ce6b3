"""A local write-ahead journal for the prediction log: acknowledged means on disk, not in memory.

The prediction log writes to the database in batches, off the request path. Between a request
being answered and its batch being committed, its record would otherwise live only in this
process's memory, and a crash (``kill -9``, OOM killer, a node lost) would lose it although
the caller got its answer. So each record is first appended to this process's journal file,
one JSON line, before the answer goes out (a ``write`` into the page cache: microseconds, and it
survives the process; no ``fsync``, so a power cut of the whole machine can still lose the last
moments). The writer thread marks how far the database has caught up; a journal whose process
is gone is replayed into the database at the next start, and then deleted.

One journal per process (several worker processes share the folder), held with ``flock``
while its process lives: a journal nobody holds is an orphan, whoever finds it replays it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("shipyard.serving.journal")

_SUFFIX = ".journal"
_MARK_SUFFIX = ".committed"
# A fully committed journal is emptied once it has grown past this, so that it stays small.
_ROTATE_BYTES = 8 * 1024 * 1024


class Journal:
    """This process's journal in ``folder``; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock = threading.Lock()
        self._size = 0

    def append(self, record: dict[str, Any]) -> int:
        """Write ``record``; return the journal offset just past it (for :meth:`committed`)."""
        line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC) + b"\n"
        with self._lock:
            os.write(self._fd, line)
            self._size += len(line)
            return self._size

    def committed(self, offset: int) -> None:
        """Every record up to ``offset`` is in the database."""
        with self._lock:
            if offset >= self._size and self._size > _ROTATE_BYTES:
                # Nothing uncommitted is left: start the file over rather than let it grow.
                os.ftruncate(self._fd, 0)
                self._size = 0
                offset = 0
            _write_mark(self.path, offset)

    def close(self, *, remove: bool) -> None:
        """Release the journal; ``remove`` once everything in it is committed."""
        with self._lock:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    _mark_path(self.path).unlink()
            os.close(self._fd)


def orphans(folder: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """Journals in ``folder`` that no live process holds, each with its uncommitted records.

    Each is held while the caller handles it and deleted when the caller moves on to the next
    one (or stops iterating normally); if the caller raises, it stays for the next start.
    """
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(f"*{_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # another process replayed and removed it meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            if not path.exists():
                continue
            start = _read_mark(path)
            with open(path, "rb") as file:
                file.seek(start)
                data = file.read()
            records = _parse(data, path)
            yield path, records
            path.unlink()
            with contextlib.suppress(FileNotFoundError):
                _mark_path(path).unlink()
        finally:
            os.close(fd)


def _parse(data: bytes, path: Path) -> list[dict[str, Any]]:
    records = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Only the last line can be torn (the process died inside a write); anything else is not ours.
            level = logging.INFO if number == len(lines) - 1 else logging.WARNING
            log.log(level, "skipped an unreadable line %d of %s", number + 1, path.name)
            continue
        if isinstance(record.get("created_at"), str):
            record["created_at"] = datetime.fromisoformat(record["created_at"]).replace(tzinfo=None)
        records.append(record)
    return records


def _mark_path(path: Path) -> Path:
    return path.with_name(path.name + _MARK_SUFFIX)


def _write_mark(path: Path, offset: int) -> None:
    mark = _mark_path(path)
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, mark)


def _read_mark(path: Path) -> int:
    try:
        return int(_mark_path(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0
