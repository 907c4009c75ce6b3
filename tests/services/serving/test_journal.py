"""The prediction log's journal: what a dead process acknowledged is found and replayed once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest

from services.serving.predlog.journal import Journal, JournalClosed, JournalTail, orphans
from services.serving.predlog.records import dumps

ROOT = Path(__file__).resolve().parents[3]


def record(n: int) -> dict:
    return {"request_id": f"r{n}", "model": "m", "version": "1", "role": "production",
            "inputs": [[n, n + 0.5]], "outputs": [[1.0]], "latency_ms": 0.1,
            "created_at": datetime(2026, 11, 23, 12) + timedelta(seconds=n)}


def die(journal: Journal) -> None:
    """As if its process were killed: the lock goes with the descriptor, the written pages stay."""
    os.close(journal._lock_fd)


def segments(journal: Journal) -> list[Path]:
    return sorted(journal.path.glob("*.segment"))


def ids(records: list) -> list[str]:
    """Request ids of records (dicts) or rows (tuples, request id first)."""
    return [r["request_id"] if isinstance(r, dict) else r[0] for r in records]


def test_a_killed_process_leaves_exactly_its_uncommitted_records(tmp_path):
    # A real process that journals three records, has the first committed, then dies by SIGKILL.
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from datetime import datetime, timedelta
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from services.serving.predlog.journal import Journal
        journal = Journal(Path({str(tmp_path)!r}))
        def record(n):
            return {{"request_id": f"r{{n}}", "model": "m", "version": "1", "latency_ms": 0.1,
                    "created_at": datetime(2026, 11, 23), "inputs": [[n]], "outputs": [[1.0]]}}
        first = journal.append(record(0))
        journal.committed(first)
        for n in (1, 2):
            journal.append(record(n))
        print("ready", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    assert list(orphans(tmp_path)) == []  # its process holds it: not an orphan yet
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)

    found = list(orphans(tmp_path))
    assert len(found) == 1
    _, records = found[0]
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    assert records[0]["created_at"] == datetime(2026, 11, 23) and records[1]["inputs"] == [[2]]
    assert list(tmp_path.iterdir()) == []  # replayed once, then gone, segments and all
    assert list(orphans(tmp_path)) == []


def test_a_torn_last_line_is_skipped_and_a_closed_journal_is_removed(tmp_path):
    journal = Journal(tmp_path)
    journal.append(record(1))
    assert list(orphans(tmp_path)) == []  # held: not an orphan, even to its own process
    die(journal)
    # Killed in the middle of copying a line: its first bytes, then the zeros never written over.
    [segment] = segments(journal)
    with open(segment, "r+b") as file:
        end = file.read().index(b"\0")
        file.seek(end)
        file.write(b'{"request_id": "r2", "mod')
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == ["r1"]

    clean = Journal(tmp_path)
    clean.committed(clean.append(record(3)))
    clean.close(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_records_over_several_segments_are_replayed_after_a_crash_and_none_twice(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)
    positions = [journal.append(record(n)) for n in range(60)]
    assert len(segments(journal)) >= 3
    journal.committed(positions[24])
    die(journal)
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == [f"r{n}" for n in range(25, 60)]
    assert records[0]["created_at"] == record(25)["created_at"] and records[-1]["inputs"] == [[59, 59.5]]
    assert list(tmp_path.iterdir()) == [] and list(orphans(tmp_path)) == []


def test_a_torn_tail_after_several_segments_keeps_every_earlier_record(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)
    for n in range(40):
        journal.append(record(n))
    die(journal)
    last = segments(journal)[-1]
    data = last.read_bytes()
    end = data.index(b"\0")
    line = data[:data.index(b"\n") + 1]
    assert end + len(line) // 2 < len(data)
    with open(last, "r+b") as file:
        file.seek(end)
        file.write(line[:len(line) // 2])  # half a line, zeros after it
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == [f"r{n}" for n in range(40)]


def test_committed_segments_are_deleted(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)
    positions = [journal.append(record(n)) for n in range(60)]
    written = segments(journal)
    assert len(written) >= 3
    journal.committed(positions[0])
    assert segments(journal) == written  # the first segment still holds uncommitted records
    journal.committed(positions[-1])
    assert segments(journal) == written[-1:]  # only the one being filled is kept
    for n in range(60, 200):
        journal.committed(journal.append(record(n)))
        assert len(segments(journal)) <= 2  # it does not grow with the traffic
    journal.close(remove=False)
    [(_, records)] = list(orphans(tmp_path))
    assert records == []  # everything it holds was committed


def test_a_record_bigger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    journal = Journal(tmp_path, segment_bytes=4096)
    big = {**record(2), "inputs": [[float(n) for n in range(2000)]]}
    journal.append(record(1))
    big_position = journal.append(big)
    journal.append(record(3))
    assert any(p.stat().st_size > 4096 for p in segments(journal))
    journal.committed(big_position)
    assert all(p.stat().st_size == 4096 for p in segments(journal))  # its segment is deleted once committed
    journal.append(big)
    die(journal)
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == ["r3", "r2"] and records[1]["inputs"] == big["inputs"]


def test_concurrent_appends_are_each_journalled_once(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)

    def produce(thread: int) -> None:
        for n in range(200):
            journal.append({**record(0), "request_id": f"t{thread}-{n}"})

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    die(journal)
    [(_, records)] = list(orphans(tmp_path))
    assert sorted(ids(records)) == sorted(f"t{t}-{n}" for t in range(4) for n in range(200))


def test_a_journal_that_cannot_be_read_is_left_and_the_others_replayed(tmp_path, caplog):
    unreadable = tmp_path / "1-deadbeef.journal.d"
    (unreadable / "lock").mkdir(parents=True)  # a lock that cannot be opened
    journal = Journal(tmp_path)
    journal.append(record(1))
    die(journal)
    found = list(orphans(tmp_path))
    assert [(path, ids(records)) for path, records in found] == [(journal.path, ["r1"])]
    assert unreadable.exists() and "could not read the journal 1-deadbeef" in caplog.text


def test_a_single_file_journal_of_the_earlier_layout_is_replayed(tmp_path):
    legacy = tmp_path / "123-abcdef01.journal"
    lines = [orjson.dumps(record(n), option=orjson.OPT_NAIVE_UTC) + b"\n" for n in range(3)]
    legacy.write_bytes(b"".join(lines))
    (tmp_path / "123-abcdef01.journal.committed").write_text(str(len(lines[0])))
    [(path, records)] = list(orphans(tmp_path))
    assert path == legacy and ids(records) == ["r1", "r2"]
    assert records[0]["created_at"] == record(1)["created_at"]
    assert list(tmp_path.iterdir()) == []


def test_an_orphan_stays_when_its_caller_fails(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)
    for n in range(30):
        journal.append(record(n))
    die(journal)
    with pytest.raises(RuntimeError):
        for _ in orphans(tmp_path):
            raise RuntimeError("the database is down")
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == [f"r{n}" for n in range(30)]


def test_the_tail_takes_complete_records_across_segments_and_resumes_from_the_mark(tmp_path):
    journal = Journal(tmp_path, segment_bytes=2048)
    for n in range(60):
        journal.append(record(n))
    tail = JournalTail(journal.path)
    assert tail.appended() == 60 and tail.shipped == 0
    taken: list[str] = []
    while True:
        records, lines, position = tail.take_rows(7)
        if not lines:
            break
        assert len(records) == lines <= 7
        taken.extend(ids(records))
        tail.commit(position, lines)
        if len(taken) >= 30:
            break
    assert taken == [f"r{n}" for n in range(len(taken))]
    assert journal.shipped() == journal.appended - journal.pending() == len(taken)
    assert len(segments(journal)) < 4  # those behind the mark are deleted
    records, lines, _ = tail.take_rows(3)  # taken, never committed: a shipper killed mid-batch
    tail.close()

    again = JournalTail(journal.path)  # the next shipper: from the mark, with its count
    assert again.shipped == len(taken) and journal.shipped() == len(taken)
    records, lines, position = again.take_rows(1000)
    assert ids(records) == [f"r{n}" for n in range(len(taken), 60)]
    again.commit(position, lines)
    assert journal.pending() == 0
    assert again.take_rows(10) == ([], 0, position)
    journal.append(record(60))
    records, lines, _ = again.take_rows(10)
    assert ids(records) == ["r60"] and lines == 1
    again.close()
    journal.close(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_room_counts_records_not_yet_shipped_and_reservations(tmp_path):
    journal = Journal(tmp_path, capacity=3)
    line = dumps(record(0))
    assert journal.try_reserve()
    assert journal.append_line(line) is not None
    assert journal.append_line(line) is not None
    assert journal.append_line(line) is None  # two appended and one place reserved
    assert not journal.try_reserve()
    assert journal.append_line(line, reserved=True) is not None  # the reserved place
    tail = JournalTail(journal.path)
    _records, lines, position = tail.take_rows(2)
    assert journal.append_line(line) is None  # taken is not shipped
    tail.commit(position, lines)
    assert journal.pending() == 1 and journal.try_reserve() and journal.append_line(line) is not None
    journal.release()
    journal.seal()
    assert tail.closed()
    with pytest.raises(JournalClosed):
        journal.append_line(line)
    tail.close()
    journal.close(remove=False)


def test_lines_appended_together_are_one_copy_and_each_a_record(tmp_path):
    journal = Journal(tmp_path, capacity=5, segment_bytes=4096)
    assert not journal.try_reserve(6)  # all or nothing
    assert journal.try_reserve(4) and not journal.try_reserve(2)
    block = b"".join(dumps(record(n)) for n in range(4))
    assert journal.append_lines(block, 4, reserved=True) is not None
    assert journal.append_lines(block, 4) is None  # one place left
    assert journal.append_lines(dumps(record(4)), 1) is not None
    big = b"".join(dumps(record(n)) for n in range(5, 105))  # more than a segment: one of its own
    assert len(big) > 4096 and journal.append_lines(big, 100, reserved=None) is not None
    assert journal.appended == journal.pending() == 105
    tail = JournalTail(journal.path)
    records, lines, position = tail.take_rows(1000)
    assert ids(records) == [f"r{n}" for n in range(105)] and lines == 105
    tail.commit(position, lines)
    assert journal.pending() == 0 and journal.try_reserve(5)
    journal.release(5)
    tail.close()
    journal.close(remove=True)


def test_a_journal_whose_shipper_still_runs_is_not_an_orphan(tmp_path):
    journal = Journal(tmp_path)
    journal.append(record(1))
    tail = JournalTail(journal.path)
    die(journal)
    assert list(orphans(tmp_path)) == []  # its shipper is still writing what it left
    tail.close()
    [(_, records)] = list(orphans(tmp_path))
    assert ids(records) == ["r1"]
