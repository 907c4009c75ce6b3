"""A local write-ahead journal for the prediction log: acknowledged means on disk, not in memory.

The prediction log writes to the database in batches, off the request path. Between a request
being answered and its batch being committed, its record would otherwise live only in this
process's memory, and a crash (``kill -9``, OOM killer, a node lost) would lose it although
the caller got its answer. So each record is first put into this process's journal, one JSON
line, before the answer goes out. It survives the process; there is no ``fsync``, so a power cut
of the whole machine can still lose the last moments. The writer thread marks how far the
database has caught up; a journal whose process is gone is replayed into the database at the
next start, and then deleted.

How a record gets there: :meth:`Journal.append` copies the line into a shared memory map of a
journal file (``MAP_SHARED``), not through ``write``. A store into a shared mapping lands in the
kernel's page cache, the same pages a ``write`` would fill, so it outlives the process just as
well: the kernel writes dirty pages back whether or not their process still exists. But it is
a plain memory copy under the GIL, where ``write`` is a system call that releases the GIL and
then has the request thread wait to get it back (about a tenth of that thread's time, measured).

Hence the layout: a journal is a folder ``<pid>-<id>.journal.d`` of numbered segment files, each
made at its full size up front (a mapping cannot grow, and a file's space reserved up front
makes a full disk an error when a segment is opened, not a ``SIGBUS`` in the middle of a copy)
and filled from the start. Space not yet written reads as zero bytes, so a reader stops at the
first NUL (orjson never emits one); a line cut short by the process dying in the middle of its
copy is followed by zeros, has no newline, and is skipped. Space is never reused: a record that
does not fit opens the next segment (one of its own size when it is bigger than a segment), so
``append`` makes a system call only then. The mark says which segment and offset the database
has caught up to, and segments wholly behind it are deleted, so the journal does not grow.

One journal per process (several worker processes share the folder), held with ``flock`` on its
lock file while its process lives: a journal nobody holds is an orphan, whoever finds it replays
it. Single-file journals (``<pid>-<id>.journal``) that an earlier version left are replayed too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("shipyard.serving.journal")

_SUFFIX = ".journal.d"
# A journal folder is built under this name and renamed once locked: a folder with the journal
# suffix is always either held or an orphan, never one that a starting process has yet to lock.
_STAGING_SUFFIX = ".journal.new"
# A staging folder this old belongs to a process that died while opening its journal (which
# takes microseconds); it holds no records.
_STALE_STAGING_S = 60.0
_LEGACY_SUFFIX = ".journal"
_LEGACY_MARK_SUFFIX = ".committed"
_LOCK = "lock"
_MARK = "committed"
_SEGMENT_SUFFIX = ".segment"
_SEGMENT_BYTES = 16 * 1024 * 1024
# A position is ``segment << _SEQ_SHIFT | offset in it``: ordered like the records, and it is
# the mark itself, with nothing to look up.
_SEQ_SHIFT = 40
_OFFSET_MASK = (1 << _SEQ_SHIFT) - 1
_DUMPS_OPTION = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC | orjson.OPT_APPEND_NEWLINE


class _Segment:
    __slots__ = ("seq", "name", "map", "used")

    def __init__(self, seq: int, name: str, segment_map: mmap.mmap) -> None:
        self.seq = seq
        self.name = name
        self.map = segment_map
        self.used = 0  # set once the segment is full; the one being filled is tracked on the journal


class Journal:
    """This process's journal in ``folder``; see the module docstring."""

    def __init__(self, folder: Path, *, segment_bytes: int = _SEGMENT_BYTES) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = folder / f"{name}{_SUFFIX}"
        self._segment_bytes = segment_bytes
        staging = folder / f"{name}{_STAGING_SUFFIX}"
        staging.mkdir()
        self._lock_fd = os.open(staging / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, self.path)
        # ``_lock`` guards what append touches; ``_commit_lock`` keeps committed() and close()
        # apart without making append wait while they do file system calls.
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._closed = False
        self._segments: list[_Segment] = []
        self._map: mmap.mmap
        self._used = 0
        self._capacity = 0
        self._base = 0
        self._open_segment(0, 0)

    def append(self, record: dict[str, Any]) -> int:
        """Write ``record``; return its position, just past it (for :meth:`committed`)."""
        line = orjson.dumps(record, option=_DUMPS_OPTION)
        size = len(line)
        with self._lock:
            start = self._used
            end = start + size
            if end > self._capacity:
                self._segments[-1].used = start
                self._open_segment(self._segments[-1].seq + 1, size)
                start, end = 0, size
            self._map[start:end] = line
            self._used = end
            return self._base | end

    def committed(self, offset: int) -> None:
        """Every record up to position ``offset`` (from :meth:`append`) is in the database."""
        seq, end = offset >> _SEQ_SHIFT, offset & _OFFSET_MASK
        with self._commit_lock:
            if self._closed:
                return
            # Marked before deleting: a crash in between leaves segments the mark already skips.
            _write_mark(self.path / _MARK, f"{seq} {end}")
            with self._lock:
                done = [s for s in self._segments[:-1] if s.seq < seq or (s.seq == seq and end >= s.used)]
                if done:
                    self._segments = [s for s in self._segments if s not in done]
            for segment in done:
                segment.map.close()
                (self.path / segment.name).unlink(missing_ok=True)

    def close(self, *, remove: bool) -> None:
        """Release the journal; ``remove`` once everything in it is committed."""
        with self._commit_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            for segment in self._segments:
                segment.map.close()
            try:
                if remove:
                    _remove(self.path)
            finally:
                os.close(self._lock_fd)

    def _open_segment(self, seq: int, size: int) -> None:
        """Map a new segment of at least ``size`` bytes and direct appends to it."""
        if self._closed:
            raise ValueError("the journal is closed")
        size = max(size, self._segment_bytes)
        name = f"{seq:012d}{_SEGMENT_SUFFIX}"
        path = self.path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _preallocate(fd, size)
            segment_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the mapping keeps the file
        self._segments.append(_Segment(seq, name, segment_map))
        self._map = segment_map
        self._capacity = size
        self._used = 0
        self._base = seq << _SEQ_SHIFT


def orphans(folder: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """Journals in ``folder`` that no live process holds, each with its uncommitted records.

    Each is held while the caller handles it and deleted when the caller moves on to the next
    one (or stops iterating normally); if the caller raises, it stays for the next start. One
    that cannot be read is left where it is, with a warning.
    """
    if not folder.is_dir():
        return
    _sweep_staging(folder)
    for path in sorted([*folder.glob(f"*{_SUFFIX}"), *folder.glob(f"*{_LEGACY_SUFFIX}")]):
        try:
            claimed = _claim(path)
        except (OSError, ValueError) as exc:
            log.warning("could not read the journal %s (%s); left in place", path.name, exc)
            continue
        if claimed is None:
            continue
        fd, records = claimed
        try:
            yield path, records
            try:
                if path.name.endswith(_SUFFIX):
                    _remove(path)
                else:
                    path.unlink(missing_ok=True)
                    _legacy_mark(path).unlink(missing_ok=True)
            except OSError as exc:
                # Replayed again at the next start, where rows already present are not written twice.
                log.warning("could not delete the replayed journal %s: %s", path.name, exc)
        finally:
            os.close(fd)


def _claim(path: Path) -> tuple[int, list[dict[str, Any]]] | None:
    """Lock the journal at ``path`` and read what it holds; None when a live process holds it."""
    legacy = not path.name.endswith(_SUFFIX)
    try:
        fd = os.open(path if legacy else path / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        if not legacy:
            # A removal that stopped after deleting the lock file, which goes last: nothing is left.
            with contextlib.suppress(OSError):
                path.rmdir()
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # its process is alive
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None  # another process replayed and removed it meanwhile
        records = _read_legacy(path) if legacy else _read(path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd, records


def _read(path: Path) -> list[dict[str, Any]]:
    mark_seq, mark_offset = _read_mark(path / _MARK)
    segments = sorted((int(p.name.removesuffix(_SEGMENT_SUFFIX)), p)
                      for p in path.glob(f"*{_SEGMENT_SUFFIX}"))
    records: list[dict[str, Any]] = []
    for seq, segment in segments:
        if seq < mark_seq:
            continue  # committed; its deletion was cut short
        records.extend(_parse(segment.read_bytes(), mark_offset if seq == mark_seq else 0, segment))
    return records


def _read_legacy(path: Path) -> list[dict[str, Any]]:
    try:
        start = int(_legacy_mark(path).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        start = 0
    return _parse(path.read_bytes(), start, path)


def _parse(data: bytes, start: int, path: Path) -> list[dict[str, Any]]:
    end = data.find(b"\0", start)
    records = []
    lines = data[start:end if end >= 0 else len(data)].split(b"\n")
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Only the last line can be torn (the process died inside a copy); anything else is not ours.
            level = logging.INFO if number == len(lines) - 1 else logging.WARNING
            log.log(level, "skipped an unreadable line %d of %s", number + 1, path.name)
            continue
        if isinstance(record.get("created_at"), str):
            record["created_at"] = datetime.fromisoformat(record["created_at"]).replace(tzinfo=None)
        records.append(record)
    return records


def _preallocate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        # A file system that cannot reserve space still works; only a full disk shows later.
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _remove(path: Path) -> None:
    """Delete a journal folder; its lock file last, so that a folder without one holds nothing."""
    with contextlib.suppress(FileNotFoundError):
        for entry in path.iterdir():
            if entry.name != _LOCK:
                entry.unlink(missing_ok=True)
    (path / _LOCK).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def _sweep_staging(folder: Path) -> None:
    cutoff = time.time() - _STALE_STAGING_S
    for path in folder.glob(f"*{_STAGING_SUFFIX}"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                _remove(path)


def _write_mark(mark: Path, text: str) -> None:
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, mark)


def _read_mark(mark: Path) -> tuple[int, int]:
    try:
        seq, offset = mark.read_text().split()
        return int(seq), int(offset)
    except (FileNotFoundError, ValueError):
        return 0, 0  # everything is replayed; rows already present are not written twice


def _legacy_mark(path: Path) -> Path:
    return path.with_name(path.name + _LEGACY_MARK_SUFFIX)
