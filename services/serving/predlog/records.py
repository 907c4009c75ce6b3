"""A prediction log record as one journal line and back, and as the predictions table's row.

The journal (journal.py) stores lines; the shipper (shipper.py) turns them into rows.
"""

from __future__ import annotations

from typing import Any

import orjson

from shipyard_common.records import Row, as_datetime, record_of

_DUMPS_OPTION = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NAIVE_UTC
# A record's line: its scalar fields as a JSON array (request_id, model, version, role,
# latency_ms, created_at), then its inputs' and outputs' JSON, tab-separated (JSON text never
# holds a raw tab): the shipper takes the inputs and outputs as they are, without parsing and
# encoding them again. Lines of the earlier layout (one JSON object, "{...}") are read too.


def dumps(record: dict[str, Any]) -> bytes:
    """``record`` (a row of the predictions table; numpy arrays included) as one journal line."""
    head = orjson.dumps([record["request_id"], record["model"], record["version"],
                         record.get("role", "production"), record["latency_ms"], record["created_at"]],
                        option=_DUMPS_OPTION)
    return b"%b\t%b\t%b\n" % (head, orjson.dumps(record["inputs"], option=_DUMPS_OPTION),
                              orjson.dumps(record["outputs"], option=_DUMPS_OPTION))


def row(line: bytes) -> Row:
    """A journal line (without its newline) as a :data:`Row`; raises as :func:`loads`."""
    if line[:1] == b"[":
        head, inputs, outputs = line.split(b"\t")
        request_id, model, version, role, latency_ms, created_at = orjson.loads(head)
        return request_id, model, version, role, inputs.decode(), outputs.decode(), latency_ms, created_at
    return row_of(loads(line))


def row_of(record: dict[str, Any]) -> Row:
    """A record (a dict, as :func:`loads` or the data plane makes them) as a :data:`Row`."""
    return (record["request_id"], record["model"], record["version"], record.get("role", "production"),
            _json_text(record["inputs"]), _json_text(record["outputs"]), record["latency_ms"],
            record["created_at"])


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def loads(line: bytes) -> dict[str, Any]:
    """A journal line (without its newline) as a record, its inputs and outputs parsed and
    ``created_at`` a naive UTC datetime; raises ``orjson.JSONDecodeError`` (a ``ValueError``) for a
    torn one."""
    if line[:1] != b"[":
        record = orjson.loads(line)  # the earlier layout (or a torn line, which fails here)
        if type(record) is not dict:
            raise orjson.JSONDecodeError("not a record", "", 0)
        parse_time(record)
        return record
    return record_of(row(line))


def parse_time(record: dict[str, Any]) -> None:
    if "created_at" in record:
        record["created_at"] = as_datetime(record["created_at"])
