"""The prediction log's journal: what a dead process acknowledged is found and replayed once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

from services.serving.journal import Journal, orphans

ROOT = Path(__file__).resolve().parents[3]


def record(n: int) -> dict:
    return {"request_id": f"r{n}", "model": "m", "version": "1", "role": "production",
            "inputs": [[n, n + 0.5]], "outputs": [[1.0]], "latency_ms": 0.1,
            "created_at": datetime(2026, 11, 23, 12, 0, n)}


def test_a_killed_process_leaves_exactly_its_uncommitted_records(tmp_path):
    # A real process that journals three records, has the first committed, then dies by SIGKILL.
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from datetime import datetime
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from services.serving.journal import Journal
        journal = Journal(Path({str(tmp_path)!r}))
        first = journal.append({{"request_id": "r0", "created_at": datetime(2026, 11, 23), "inputs": [[0]]}})
        journal.committed(first)
        for n in (1, 2):
            journal.append({{"request_id": f"r{{n}}", "created_at": datetime(2026, 11, 23), "inputs": [[n]]}})
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
    assert list(tmp_path.glob("*.journal")) == []  # replayed once, then gone
    assert list(orphans(tmp_path)) == []


def test_a_torn_last_line_is_skipped_and_a_closed_journal_is_removed(tmp_path):
    journal = Journal(tmp_path)
    journal.append(record(1))
    path = journal.path
    os.close(journal._fd)  # as if the process died: the lock goes with the descriptor
    with open(path, "ab") as file:
        file.write(b'{"request_id": "r2", "mod')
    [(_, records)] = list(orphans(tmp_path))
    assert [r["request_id"] for r in records] == ["r1"]

    clean = Journal(tmp_path)
    clean.committed(clean.append(record(3)))
    clean.close(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_a_fully_committed_journal_starts_over_instead_of_growing(tmp_path, monkeypatch):
    import services.serving.journal as journal_module

    monkeypatch.setattr(journal_module, "_ROTATE_BYTES", 200)
    journal = Journal(tmp_path)
    for n in range(5):
        offset = journal.append(record(n))
    journal.committed(offset)
    assert journal.path.stat().st_size == 0
    journal.committed(journal.append(record(9)))
    assert 0 < journal.path.stat().st_size < 200
    journal.close(remove=False)
    [(_, records)] = list(orphans(tmp_path))
    assert records == []  # everything it holds was committed
