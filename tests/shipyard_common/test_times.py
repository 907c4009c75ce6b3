"""Every datetime a service's public schema answers is aware and in UTC (shipyard_common.times)."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import BaseModel, TypeAdapter

from shipyard_common.times import UtcDatetime, as_utc

# The modules whose models the trainer, registry and monitor answer with.
SCHEMA_MODULES = (
    "services.trainer.jobs.schemas",
    "services.registry.core.schemas",
    "services.monitor.windows.schemas",
    "services.monitor.feedback.schemas",
    "services.monitor.retraining.schemas",
)


def test_a_naive_time_is_read_as_utc_and_an_aware_one_converted():
    naive = datetime(2026, 1, 2, 3, 4, 5, 6)
    assert as_utc(naive) == naive.replace(tzinfo=UTC) and as_utc(naive).tzinfo is UTC
    paris = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert as_utc(paris) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) and as_utc(paris).tzinfo is UTC
    adapter = TypeAdapter(UtcDatetime)
    rendered = adapter.dump_json(adapter.validate_python(naive)).decode()
    assert rendered == '"2026-01-02T03:04:05.000006Z"'


def _mentions_datetime(annotation: object) -> bool:
    if annotation is datetime:
        return True
    return any(_mentions_datetime(arg) for arg in typing.get_args(annotation))


def _datetime_fields() -> list[tuple[str, str, object]]:
    found = []
    for name in SCHEMA_MODULES:
        module = importlib.import_module(name)
        for model in vars(module).values():
            if not (inspect.isclass(model) and issubclass(model, BaseModel) and model.__module__ == name):
                continue
            for field_name, field in model.model_fields.items():
                if _mentions_datetime(field.annotation):
                    found.append((model.__name__, field_name, field.rebuild_annotation()))
    return found


FIELDS = _datetime_fields()


def test_the_schemas_have_datetime_fields_to_check():
    models = {model for model, _, _ in FIELDS}
    assert {"JobPublic", "AuditPublic", "WindowPublic", "TriggerPublic", "PolicyPublic"} <= models


@pytest.mark.parametrize(("model", "field", "annotation"), FIELDS, ids=[f"{m}.{f}" for m, f, _ in FIELDS])
def test_every_public_datetime_field_answers_utc(model, field, annotation):
    # A naive value, as the databases return the DateTime columns, must come out aware in UTC.
    value = TypeAdapter(annotation).validate_python(datetime(2026, 1, 2, 3, 4, 5))
    if isinstance(value, types.NoneType):
        pytest.fail(f"{model}.{field} turned a datetime into None")
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0), f"{model}.{field}: {value!r}"
