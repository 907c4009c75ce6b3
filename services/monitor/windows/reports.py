"""Evidently's report of each ok window: its snapshot (gzipped JSON) on disk, rendered to HTML when asked.

Rendering costs as much as a tenth of the computation for a large window and is rarely read, so
the loop stores the snapshot and ``GET /reports/{model}/{window_id}`` renders it. A path comes
from the database, never from a request, and is still checked to lie inside the report folder.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.monitor.tables import WindowRecord
from shipyard_common.errors import NotFound

log = logging.getLogger("shipyard.monitor")


def report_name(window_id: int) -> str:
    return f"window-{window_id}.json.gz"


def write_report(root: Path, window_id: int, snapshot: str) -> str:
    """Write the snapshot of window ``window_id``; its path relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    name = report_name(window_id)
    partial = root / f".{name}.partial"
    partial.write_bytes(gzip.compress(snapshot.encode(), compresslevel=1))
    partial.replace(root / name)
    return name


def resolve(root: Path, relative: str) -> Path:
    """``root / relative``, refused (NotFound) unless it lies inside ``root``."""
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or path == base:
        raise NotFound(f"report {relative!r} is outside the report folder")
    return path


def read_snapshot(root: Path, relative: str) -> str:
    path = resolve(root, relative)
    try:
        return gzip.decompress(path.read_bytes()).decode()
    except FileNotFoundError as exc:
        raise NotFound(f"report {relative!r} is no longer on disk") from exc


def render_html(snapshot: str) -> str:
    """Evidently's HTML of a stored snapshot."""
    from evidently.core.report import Snapshot

    return str(Snapshot.loads(snapshot).get_html_str(as_iframe=False))


def prune_reports(session: Session, *, root: Path, model: str, keep: int) -> int:
    """Delete the reports of ``model`` beyond the newest ``keep``; how many."""
    old = session.execute(
        select(WindowRecord.id, WindowRecord.report_path)
        .where(WindowRecord.model == model, WindowRecord.report_path.is_not(None))
        .order_by(WindowRecord.id.desc()).offset(keep)
    ).all()
    for window_id, relative in old:
        try:
            resolve(root, relative).unlink(missing_ok=True)
        except (NotFound, OSError) as exc:
            log.warning("report of window %s not deleted: %s", window_id, exc)
    if old:
        session.execute(update(WindowRecord).where(WindowRecord.id.in_([row[0] for row in old]))
                        .values(report_path=None))
    return len(old)
