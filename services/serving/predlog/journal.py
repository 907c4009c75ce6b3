"""The prediction log's journal: the transport from a serving process to its shipper, and its WAL.

A serving process answers requests; a shipper process (shipper.py), one per serving process,
writes their records to the database. The journal is how records go from one to the other, and
why an answered request's record survives the serving process: each record is copied into the
journal, one line (:func:`dumps`), before the answer goes out, and stays there until the shipper has
committed it to the database. There is no ``fsync``, so a power cut of the whole machine can
still lose the last moments; ``kill -9`` or the OOM killer cannot.

How a record gets there: :meth:`Journal.append` copies the line into a shared memory map of a
journal file (``MAP_SHARED``), not through ``write``. A store into a shared mapping lands in the
kernel's page cache, the same pages a ``write`` would fill, so it outlives the process just as
well (the kernel writes dirty pages back whether or not their process still exists), and the
shipper, mapping the same file, sees it at once. But it is a plain memory copy under the GIL,
where ``write`` is a system call that releases the GIL and then has the request thread wait to
get it back. The database writing happens in the other process, so it takes no GIL time from
the requests either.

Hence the layout: a journal is a folder ``<pid>-<id>.journal.d`` of numbered segment files, each
made at its full size up front (a mapping cannot grow, and a file's space reserved up front
makes a full disk an error when a segment is opened, not a ``SIGBUS`` in the middle of a copy)
and filled from the start. Space not yet written reads as zero bytes, so a reader stops at the
first NUL (orjson never emits one) and takes only lines ended by a newline: a line being copied
(or cut short by the process dying in the middle of its copy) has a NUL or no newline yet.
Space is never reused: a record that does not fit opens the next segment (one of its own size
when it is bigger than a segment), so ``append`` makes a system call only then; a reader that
finds the next segment's file knows the one it reads is complete. The ``committed`` mark
(written by the shipper, replaced atomically) says which segment and offset the database has
caught up to, and how many records that is; segments wholly behind it are deleted, so the
journal does not grow.

Room: the serving process may be at most ``capacity`` records ahead of the database. A small
shared ``progress`` file in the folder holds four little-endian u64 words: the records shipped
(written by the shipper after the mark), a closed flag, the records appended and a "hurry"
counter (written by the serving process: it bumps the last when it waits for room, so that the
shipper ships at once instead of at its next flush). Each is written by one process only, and
reading one is a ``struct.unpack_from`` on the mapping.

One journal per serving process (several worker processes share the folder), held with
``flock`` on its lock file while its process lives; its shipper holds ``shipper.lock`` while it
runs. A journal neither of them holds is an orphan, whoever finds it replays what lies beyond
its mark, once. Single-file journals (``<pid>-<id>.journal``) that an earlier version left are
replayed too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from services.serving.predlog.records import dumps, loads, row
from shipyard_common.records import Row

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
_SHIPPER_LOCK = "shipper.lock"
_PROGRESS = "progress"
# The progress file: u64 words at these offsets (see the module docstring).
_SHIPPED, _CLOSED, _APPENDED, _HURRY = 0, 8, 16, 24
_PROGRESS_BYTES = 32
_U64 = struct.Struct("<Q")
_SEGMENT_SUFFIX = ".segment"
_SEGMENT_BYTES = 16 * 1024 * 1024
# A position is ``segment << _SEQ_SHIFT | offset in it``: ordered like the records, and it is
# the mark itself, with nothing to look up.
_SEQ_SHIFT = 40
_OFFSET_MASK = (1 << _SEQ_SHIFT) - 1
class JournalClosed(Exception):
    """The journal takes no more records: its process is shutting down."""


class Journal:
    """This process's journal in ``folder``, the serving process's side; see the module docstring.

    ``capacity``: the most records appended and not yet shipped (plus those reserved) that it
    takes; None for no limit.
    """

    def __init__(
        self, folder: Path, *, segment_bytes: int = _SEGMENT_BYTES, capacity: int | None = None
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = folder / f"{name}{_SUFFIX}"
        self._segment_bytes = segment_bytes
        self._capacity_records = capacity
        staging = folder / f"{name}{_STAGING_SUFFIX}"
        staging.mkdir()
        self._lock_fd = os.open(staging / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._progress = _map_progress(staging / _PROGRESS, create=True)
        # ``_lock`` guards what append touches (room included); ``_commit_lock`` keeps committed()
        # and close() apart without making append wait while they do file system calls.
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._closed = False
        self._sealed = False
        self.appended = 0
        self._last_shipped = 0
        self._reserved = 0
        self._seq = -1
        self._map: mmap.mmap | None = None
        self._used = 0
        self._capacity = 0
        self._base = 0
        # Where each full segment's records end (for committed()), until it is committed.
        self._ends: dict[int, int] = {}
        self._path = staging
        self._open_segment(0, 0)
        os.rename(staging, self.path)
        self._path = self.path

    def append(self, record: dict[str, Any]) -> int:
        """Write ``record`` whatever the room; return its position, just past it (for :meth:`committed`)."""
        position = self.append_line(dumps(record), reserved=None)
        assert position is not None
        return position

    def append_line(self, line: bytes, *, reserved: bool | None = False) -> int | None:
        """Write a line from :func:`dumps`; its position, or None when there is no room for it.

        ``reserved``: True uses a place held by :meth:`try_reserve` (never refused); None
        ignores the capacity. Raises :class:`JournalClosed` once :meth:`seal` is called.
        """
        return self.append_lines(line, 1, reserved=reserved)

    def append_lines(self, lines: bytes, count: int, *, reserved: bool | None = False) -> int | None:
        """Write ``count`` lines from :func:`dumps`, joined, in one copy; as :meth:`append_line`.

        ``reserved``: True uses ``count`` places held by :meth:`try_reserve`.
        """
        size = len(lines)
        with self._lock:
            if self._sealed:
                raise JournalClosed("the journal is closed")
            if reserved:
                self._reserved -= count
            elif reserved is not None and self._capacity_records is not None and (
                self.appended - _U64.unpack_from(self._progress, _SHIPPED)[0] + self._reserved + count
                > self._capacity_records
            ):
                return None
            start = self._used
            end = start + size
            if end > self._capacity:
                self._ends[self._seq] = start
                self._open_segment(self._seq + 1, size)
                start, end = 0, size
            assert self._map is not None
            self._map[start:end] = lines
            self._used = end
            self.appended += count
            _U64.pack_into(self._progress, _APPENDED, self.appended)
            return self._base | end

    def try_reserve(self, count: int = 1) -> bool:
        """Hold room for ``count`` records without waiting; False (nothing held) when there is none."""
        with self._lock:
            if self._sealed:
                return False  # append would refuse it
            if self._capacity_records is not None and (
                self.appended - _U64.unpack_from(self._progress, _SHIPPED)[0] + self._reserved + count
                > self._capacity_records
            ):
                return False
            self._reserved += count
            return True

    def release(self, count: int = 1) -> None:
        """Give back places held by :meth:`try_reserve`."""
        with self._lock:
            self._reserved -= count

    def shipped(self) -> int:
        """Records the shipper has written to the database."""
        # Closed meanwhile (a metrics scrape during shutdown): the last seen.
        with contextlib.suppress(ValueError):
            self._last_shipped = int(_U64.unpack_from(self._progress, _SHIPPED)[0])
        return self._last_shipped

    def pending(self) -> int:
        """Records appended and not yet written to the database."""
        return self.appended - self.shipped()

    def hurry(self) -> None:
        """Ask the shipper to ship now rather than at its next flush (someone waits for room)."""
        with contextlib.suppress(ValueError):  # closed meanwhile
            seen = _U64.unpack_from(self._progress, _HURRY)[0]
            _U64.pack_into(self._progress, _HURRY, (seen + 1) & 0xFFFFFFFF)

    def seal(self) -> None:
        """Take no more records, and tell the shipper to finish once it has shipped them all."""
        with self._lock:
            self._sealed = True
            _U64.pack_into(self._progress, _CLOSED, 1)

    def committed(self, offset: int, count: int | None = None) -> None:
        """Every record up to position ``offset`` (from :meth:`append`) is in the database.

        The shipper marks its own progress (:class:`JournalTail`); this is the same mark from
        the journal's own process.
        """
        seq, end = offset >> _SEQ_SHIFT, offset & _OFFSET_MASK
        with self._commit_lock:
            if self._closed:
                return
            with self._lock:
                if self._ends.get(seq) == end:
                    seq, end = seq + 1, 0  # the whole segment: it can go
                for done in [s for s in self._ends if s < seq]:
                    del self._ends[done]
            _commit(self.path, seq, end, count)

    def close(self, *, remove: bool) -> None:
        """Release the journal; ``remove`` once everything in it is committed."""
        with self._commit_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._sealed = True
            if self._map is not None:
                self._map.close()
            self._progress.close()
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
        path = self._path / _segment_name(seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _preallocate(fd, size)
            segment_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the mapping keeps the file
        if self._map is not None:
            # Never written again: its pages stay in the page cache for the shipper without a mapping.
            self._map.close()
        self._map = segment_map
        self._seq = seq
        self._capacity = size
        self._used = 0
        self._base = seq << _SEQ_SHIFT


class JournalTail:
    """The shipper's side of a live journal: the complete records beyond the mark, in order.

    :meth:`take` reads records without marking them; :meth:`commit` marks them written (the
    ``committed`` mark, then the shared ``shipped`` count) and deletes segments behind the mark.
    It holds ``shipper.lock`` while open, so that nobody replays the journal as an orphan while
    it ships (its serving process may have died).
    """

    def __init__(self, path: Path, *, lock_timeout_s: float = 10.0) -> None:
        self.path = path
        self._lock_fd = os.open(path / _SHIPPER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:  # a shipper before this one still runs
                    os.close(self._lock_fd)
                    raise
                time.sleep(0.05)
        self._progress = _map_progress(path / _PROGRESS, create=False)
        self.seq, self.offset, self.shipped = _read_mark(path / _MARK)
        _U64.pack_into(self._progress, _SHIPPED, self.shipped)
        self._map: mmap.mmap | None = None
        self._map_seq = -1
        self._delete_behind(self.seq)

    def closed(self) -> bool:
        return bool(_U64.unpack_from(self._progress, _CLOSED)[0])

    def appended(self) -> int:
        return int(_U64.unpack_from(self._progress, _APPENDED)[0])

    def hurry(self) -> int:
        return int(_U64.unpack_from(self._progress, _HURRY)[0])

    def take_rows(self, limit: int) -> tuple[list[Row], int, tuple[int, int]]:
        """Up to ``limit`` records after the last taken (each a :data:`Row`), how many lines that
        is, and the position past them.

        A line that is not a record (only ever a torn one of a process that died mid-copy) counts
        as a line and is skipped.
        """
        records: list[Row] = []
        lines = 0
        seq, offset = self.seq, self.offset
        while lines < limit:
            # Looked for first: once the next segment exists, this one is complete.
            complete = (self.path / _segment_name(seq + 1)).exists()
            data = self._segment(seq)
            if data is None:
                break
            nul = data.find(b"\0", offset)
            end = nul if nul >= 0 else len(data)
            while lines < limit:
                newline = data.find(b"\n", offset, end)
                if newline < 0:
                    break
                line = data[offset:newline]
                offset = newline + 1
                lines += 1
                try:
                    record = row(line)
                except (orjson.JSONDecodeError, ValueError, UnicodeDecodeError, KeyError, TypeError):
                    log.warning("skipped an unreadable line in segment %d of %s", seq, self.path.name)
                    continue
                records.append(record)
            if complete and offset >= end:
                seq, offset = seq + 1, 0
                continue
            break
        self.seq, self.offset = seq, offset
        return records, lines, (seq, offset)

    def commit(self, position: tuple[int, int], lines: int) -> None:
        """The ``lines`` taken up to ``position`` are in the database."""
        self.shipped += lines
        seq, offset = position
        # Marked first: a shipper that dies before updating the count takes it from the mark.
        _commit(self.path, seq, offset, self.shipped)
        _U64.pack_into(self._progress, _SHIPPED, self.shipped)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._progress.close()
        os.close(self._lock_fd)

    def _segment(self, seq: int) -> mmap.mmap | None:
        if self._map_seq == seq:
            return self._map
        try:
            fd = os.open(self.path / _segment_name(seq), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return None  # just made, not sized yet
            segment_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if self._map is not None:
            self._map.close()
        self._map, self._map_seq = segment_map, seq
        return segment_map

    def _delete_behind(self, seq: int) -> None:
        _delete_segments_before(self.path, seq)


def _segment_name(seq: int) -> str:
    return f"{seq:012d}{_SEGMENT_SUFFIX}"


def _map_progress(path: Path, *, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, _PROGRESS_BYTES)
        return mmap.mmap(fd, _PROGRESS_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _commit(path: Path, seq: int, offset: int, count: int | None) -> None:
    """Mark (``seq``, ``offset``) written (``count`` records in all); delete the segments behind it."""
    # Marked before deleting: a crash in between leaves segments the mark already skips.
    _write_mark(path / _MARK, f"{seq} {offset}" if count is None else f"{seq} {offset} {count}")
    _delete_segments_before(path, seq)


def _delete_segments_before(path: Path, seq: int) -> None:
    for segment in path.glob(f"*{_SEGMENT_SUFFIX}"):
        with contextlib.suppress(ValueError):
            if int(segment.name.removesuffix(_SEGMENT_SUFFIX)) < seq:
                segment.unlink(missing_ok=True)


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
        if not legacy and _shipper_running(path):
            os.close(fd)
            return None  # its process is gone but its shipper still writes what it left
        records = _read_legacy(path) if legacy else _read(path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd, records


def _shipper_running(path: Path) -> bool:
    try:
        fd = os.open(path / _SHIPPER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read(path: Path) -> list[dict[str, Any]]:
    mark_seq, mark_offset, _ = _read_mark(path / _MARK)
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
            record = loads(line)
        except (orjson.JSONDecodeError, ValueError, UnicodeDecodeError):
            # Only the last line can be torn (the process died inside a copy); anything else is not ours.
            level = logging.INFO if number == len(lines) - 1 else logging.WARNING
            log.log(level, "skipped an unreadable line %d of %s", number + 1, path.name)
            continue
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


def _read_mark(mark: Path) -> tuple[int, int, int]:
    """Segment, offset and records written up to there (0 when the mark does not say)."""
    try:
        seq, offset, *count = mark.read_text().split()
        return int(seq), int(offset), int(count[0]) if count else 0
    except (FileNotFoundError, ValueError):
        return 0, 0, 0  # everything is replayed; rows already present are not written twice


def _legacy_mark(path: Path) -> Path:
    return path.with_name(path.name + _LEGACY_MARK_SUFFIX)
