"""Retraining policies and the triggers they fire.

The platform database is the record. Each pass of the loop, :func:`check_policies` reads every enabled
policy and, for a model whose policy looks like it fires, decides again in one transaction that first
updates the policy's row (its ``lock_version``: PostgreSQL locks the row, SQLite takes its write lock),
so two monitors decide one after the other and the second sees the first's trigger. Under that lock:
no retraining of the model may be pending, started or running, the cooldown since its last retraining
must have passed, and a condition must hold on windows no earlier trigger used; then the trigger is
inserted (``pending``). The ``retrain`` deployment is started through the trainer's API after the
transaction commits; the trigger becomes ``started`` with its flow run, or ``failed`` with why.
:func:`follow_triggers` reads the runs of started triggers until they end and records the outcome
(the new version, its promotion request, the job) or the failure.

The table's unique ``active_model`` keeps one retraining per model at a time even against a manual
trigger that races the loop. A trigger that could not start (the trainer or Prefect down) holds the
model for ``min(cooldown, START_RETRY_S)``, not the whole cooldown, and its windows may fire again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from mlflow.exceptions import MlflowException
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.monitor.context import Monitor
from services.monitor.retraining.schemas import (
    ACTIVE_STATES,
    Cause,
    PolicyCreate,
    PolicyPublic,
    TriggerCreate,
    TriggerPage,
    TriggerPublic,
    TriggerState,
)
from services.monitor.tables import PolicyRecord, TriggerRecord, WindowRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Conflict, NotFound, Unavailable
from shipyard_common.lineage import PRODUCTION
from shipyard_common.mlflow_client import mlflow_calls
from shipyard_common.orm import MAX_BIGINT

log = logging.getLogger("shipyard.monitor.retraining")

RETRAIN = "retrain"
MONITOR = "monitor"
# A trigger that could not start holds its model this long (or the cooldown, if shorter).
START_RETRY_S = 60.0
# A pending trigger this old was left by a monitor that stopped between deciding and starting.
STALE_PENDING_S = 300.0
_MLFLOW_MISSING = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}
_WINDOW_OK = "ok"


@dataclass(frozen=True)
class Decision:
    cause: Cause
    reason: str
    window_ids: list[int]


# -- the production version ---------------------------------------------------------------------


def production_version(*, monitor: Monitor, model: str) -> str:
    """The version ``production`` points at; 404 for an unknown model, 409 without production."""
    try:
        with mlflow_calls(monitor.mlflow.tracking_uri):  # not answering: the platform's 503 for it
            registered = monitor.mlflow.get_registered_model(model)
    except MlflowException as exc:
        if exc.error_code in _MLFLOW_MISSING:
            raise NotFound(f"there is no registered model {model!r}") from None
        raise Unavailable(f"the registry (MLflow) cannot be read: {exc.message}") from exc
    except Unavailable:
        raise
    except Exception as exc:  # an error of MLflow's client itself
        raise Unavailable(f"the registry (MLflow) cannot be reached: {exc}") from exc
    version = (registered.aliases or {}).get(PRODUCTION)
    if version is None:
        raise Conflict(f"{model} has no production version: there is nothing to retrain from")
    return str(version)


def _production_or_none(monitor: Monitor, model: str) -> str | None:
    try:
        return production_version(monitor=monitor, model=model)
    except (NotFound, Conflict) as exc:
        log.debug("policy of %s does not apply: %s", model, exc)
        return None


# -- policies ------------------------------------------------------------------------------------


def put_policy(*, monitor: Monitor, model: str, body: PolicyCreate, by: str) -> PolicyPublic:
    """Create or replace ``model``'s policy; the model must have a production version."""
    production_version(monitor=monitor, model=model)
    values = body.model_dump(exclude={"parameters"})
    values["parameters"] = body.parameters.as_flow_parameters()
    try:
        return _upsert_policy(monitor.database, model, values, by)
    except IntegrityError:  # another request created it first: replace theirs
        return _upsert_policy(monitor.database, model, values, by)


def _upsert_policy(database: Database, model: str, values: dict[str, Any], by: str) -> PolicyPublic:
    now = utcnow()
    with database.session() as session:
        policy = session.get(PolicyRecord, model)
        if policy is None:
            policy = PolicyRecord(model=model, created_at=now, lock_version=0)
            session.add(policy)
        for key, value in values.items():
            setattr(policy, key, value)
        policy.updated_by, policy.updated_at = by, now
        session.flush()
        return PolicyPublic.model_validate(policy)


def get_policy(*, monitor: Monitor, model: str) -> PolicyPublic:
    with monitor.database.session() as session:
        policy = session.get(PolicyRecord, model)
        if policy is None:
            raise NotFound(f"{model} has no retraining policy")
        return PolicyPublic.model_validate(policy)


def list_policies(*, monitor: Monitor) -> list[PolicyPublic]:
    with monitor.database.session() as session:
        policies = session.scalars(select(PolicyRecord).order_by(PolicyRecord.model))
        return [PolicyPublic.model_validate(p) for p in policies]


def delete_policy(*, monitor: Monitor, model: str) -> PolicyPublic:
    """Remove the policy; its triggers stay as the record, a running retraining is still followed."""
    with monitor.database.session() as session:
        policy = session.get(PolicyRecord, model)
        if policy is None:
            raise NotFound(f"{model} has no retraining policy")
        removed = PolicyPublic.model_validate(policy)
        session.delete(policy)
        return removed


# -- triggers: reads -----------------------------------------------------------------------------


def list_triggers(
    *, monitor: Monitor, model: str | None, state: TriggerState | None, max_results: int,
    page_token: str | None,
) -> TriggerPage:
    """Newest first; ``page_token`` (from the previous page) continues with older ones."""
    query = select(TriggerRecord).order_by(TriggerRecord.id.desc()).limit(max_results + 1)
    if model is not None:
        query = query.where(TriggerRecord.model == model)
    if state is not None:
        query = query.where(TriggerRecord.state == state.value)
    if page_token is not None:
        query = query.where(TriggerRecord.id < _page_position(page_token))
    with monitor.database.session() as session:
        rows = list(session.scalars(query))
    page = [TriggerPublic.model_validate(r) for r in rows[:max_results]]
    more = len(rows) > max_results
    return TriggerPage(triggers=page, next_page_token=str(page[-1].id) if more and page else None)


def _page_position(token: str) -> int:
    # The id of the last trigger of the page before: a decimal BIGINT, or not one this API gave.
    if 0 < len(token) <= 19 and token.isascii() and token.isdigit() and int(token) <= MAX_BIGINT:
        return int(token)
    raise NotFound(f"page_token {token!r} is not one this API gave")


def get_trigger(*, monitor: Monitor, trigger_id: int) -> TriggerPublic:
    with monitor.database.session() as session:
        trigger = session.get(TriggerRecord, trigger_id)
        if trigger is None:
            raise NotFound(f"there is no trigger {trigger_id}")
        return TriggerPublic.model_validate(trigger)


# -- triggers: deciding --------------------------------------------------------------------------


@contextmanager
def _locked_policy(database: Database, model: str) -> Iterator[tuple[Session, PolicyRecord | None]]:
    """A transaction whose first statement updates ``model``'s policy row (if it has one), holding it
    until commit: a second decision for the model, in any thread, process or host, waits here."""
    with database.session() as session:
        bumped = session.execute(
            update(PolicyRecord).where(PolicyRecord.model == model)
            .values(lock_version=PolicyRecord.lock_version + 1)
        )
        policy = session.get(PolicyRecord, model) if getattr(bumped, "rowcount", 0) else None
        yield session, policy


def _newest(session: Session, model: str, *, started: bool | None = None,
            cause: Cause | None = None) -> TriggerRecord | None:
    """The model's newest trigger; ``started``: only those whose run was created (or not)."""
    query = select(TriggerRecord).where(TriggerRecord.model == model)
    if started is not None:
        column = TriggerRecord.flow_run_id
        query = query.where(column.is_not(None) if started else column.is_(None))
    if cause is not None:
        query = query.where(TriggerRecord.cause == cause.value)
    return session.scalars(query.order_by(TriggerRecord.id.desc()).limit(1)).first()


def _held(session: Session, model: str, cooldown_s: float, now: datetime) -> str | None:
    """Why the model may not retrain now (a retraining runs, the cooldown, a start's retry), or None."""
    newest = _newest(session, model)
    if newest is None:
        return None
    if newest.state in ACTIVE_STATES:
        return f"trigger {newest.id} is {newest.state}"
    started = _newest(session, model, started=True)
    if started is not None and now - started.created_at < timedelta(seconds=cooldown_s):
        return f"cooldown since trigger {started.id}"
    unstarted = _newest(session, model, started=False)
    retry_s = min(cooldown_s, START_RETRY_S)
    if unstarted is not None and now - unstarted.created_at < timedelta(seconds=retry_s):
        return f"trigger {unstarted.id} could not start; retrying after {retry_s:g}s"
    return None


def _unused_after(session: Session, model: str, cause: Cause) -> int:
    """Windows up to this id fired an earlier trigger of ``cause`` (one whose run was created)."""
    last = _newest(session, model, started=True, cause=cause)
    return max(last.window_ids or [0]) if last is not None else 0


def _ok_windows(session: Session, model: str, version: str, after: int, limit: int) -> list[WindowRecord]:
    query = (
        select(WindowRecord)
        .where(WindowRecord.model == model, WindowRecord.version == version,
               WindowRecord.status == _WINDOW_OK)
        .order_by(WindowRecord.id.desc()).limit(limit)
    )
    return [w for w in session.scalars(query) if w.id > after]


def _drift(session: Session, policy: PolicyRecord, version: str) -> Decision | None:
    threshold, n = policy.drift_share_above, policy.consecutive_windows
    if threshold is None:
        return None
    after = _unused_after(session, policy.model, Cause.DRIFT)
    windows = _ok_windows(session, policy.model, version, after, n)
    if len(windows) < n or any(w.drift_share is None or w.drift_share <= threshold for w in windows):
        return None
    windows.reverse()
    shares = ", ".join(f"{w.drift_share:.2f}" for w in windows)
    reason = (f"drift share above {threshold:g} in {n} window(s) in a row of v{version} "
              f"(windows {', '.join(str(w.id) for w in windows)}: {shares})")
    return Decision(Cause.DRIFT, reason, [w.id for w in windows])


def _accuracy(session: Session, policy: PolicyRecord, version: str) -> Decision | None:
    floor = policy.accuracy_below
    if floor is None:
        return None
    query = (
        select(WindowRecord)
        .where(WindowRecord.model == policy.model, WindowRecord.version == version,
               WindowRecord.accuracy.is_not(None), WindowRecord.labelled >= policy.min_labelled)
        .order_by(WindowRecord.id.desc()).limit(1)
    )
    window = session.scalars(query).first()
    if window is None or window.accuracy is None or window.accuracy >= floor:
        return None
    if window.id <= _unused_after(session, policy.model, Cause.ACCURACY):
        return None
    reason = (f"live accuracy {window.accuracy:.3f} below {floor:g} on {window.labelled} labelled rows "
              f"of v{version} (window {window.id})")
    return Decision(Cause.ACCURACY, reason, [window.id])


def _schedule(session: Session, policy: PolicyRecord, now: datetime) -> Decision | None:
    interval = policy.schedule_interval_s
    if interval is None:
        return None
    last = _newest(session, policy.model, started=True)
    since = last.created_at if last is not None else policy.created_at
    if now - since < timedelta(seconds=interval):
        return None
    what = f"trigger {last.id}" if last is not None else "the policy"
    return Decision(Cause.SCHEDULE, f"every {interval:g}s: {what} was at {since:%Y-%m-%d %H:%M:%S} UTC", [])


def _decide(session: Session, policy: PolicyRecord, version: str, now: datetime) -> Decision | None:
    if not policy.enabled or _held(session, policy.model, policy.cooldown_s, now) is not None:
        return None
    return _drift(session, policy, version) or _accuracy(session, policy, version) or _schedule(
        session, policy, now
    )


def _insert(session: Session, *, model: str, version: str, decision: Decision,
            parameters: dict[str, Any], by: str) -> TriggerRecord:
    now = utcnow()
    flow = {**parameters, "model_name": model, "parent_version": version, "reason": decision.reason}
    trigger = TriggerRecord(
        model=model, version=version, cause=decision.cause.value, reason=decision.reason,
        state=TriggerState.PENDING.value, active_model=model, parameters=flow, outcome={},
        window_ids=decision.window_ids, created_at=now, updated_at=now, created_by=by,
    )
    session.add(trigger)
    session.flush()
    return trigger


def _fire(monitor: Monitor, model: str) -> TriggerRecord | None:
    """The trigger ``model``'s policy fires now (inserted, pending), or None.

    A read without the lock first, so a pass where nothing fires writes nothing; then the same
    decision again under the policy's lock, which is the one that counts."""
    version = _production_or_none(monitor, model)
    if version is None:
        return None
    with monitor.database.session() as session:
        policy = session.get(PolicyRecord, model)
        if policy is None or _decide(session, policy, version, utcnow()) is None:
            return None
    with _locked_policy(monitor.database, model) as (session, policy):
        decision = _decide(session, policy, version, utcnow()) if policy is not None else None
        if policy is None or decision is None:
            return None
        return _insert(session, model=model, version=version, decision=decision,
                       parameters=dict(policy.parameters or {}), by=MONITOR)


def check_policies(*, monitor: Monitor) -> int:
    """Start a retraining for every model whose policy fires; how many started."""
    with monitor.database.session() as session:
        models = list(session.scalars(select(PolicyRecord.model).where(PolicyRecord.enabled.is_(True))))
    started = 0
    for model in models:
        if monitor.stop.is_set():
            break
        try:
            trigger = _fire(monitor, model)
        except IntegrityError:  # a manual trigger of the model was inserted meanwhile
            continue
        except Exception:  # MLflow or the database away: the other models are still checked
            log.exception("retraining policy of %s could not be checked", model)
            continue
        if trigger is not None:
            started += _start(monitor, trigger)
    return started


def trigger_manually(*, monitor: Monitor, body: TriggerCreate, by: str) -> TriggerPublic:
    """A person's retraining of the production version, now: no cooldown, but never two at once."""
    version = production_version(monitor=monitor, model=body.model)
    decision = Decision(Cause.MANUAL, body.reason, [])
    try:
        with _locked_policy(monitor.database, body.model) as (session, policy):
            newest = _newest(session, body.model)
            if newest is not None and newest.state in ACTIVE_STATES:
                raise Conflict(
                    f"a retraining of {body.model} is already {newest.state} (trigger {newest.id})",
                    details={"trigger": newest.id},
                )
            if body.parameters is not None:
                parameters = body.parameters.as_flow_parameters()
            else:
                parameters = dict(policy.parameters or {}) if policy is not None else {}
            trigger = _insert(session, model=body.model, version=version, decision=decision,
                              parameters=parameters, by=by)
    except IntegrityError:
        raise Conflict(f"a retraining of {body.model} has just started") from None
    _start(monitor, trigger)
    return get_trigger(monitor=monitor, trigger_id=trigger.id)


# -- triggers: starting and following ------------------------------------------------------------


def _start(monitor: Monitor, trigger: TriggerRecord) -> int:
    """Start the ``retrain`` deployment for a pending trigger; 1 if its run was created, else 0."""
    monitor.metrics.triggers.labels(trigger.model, trigger.cause).inc()
    try:
        response = monitor.trainer.post(f"/pipelines/{RETRAIN}/runs", json={"parameters": trigger.parameters})
    except httpx.HTTPError as exc:
        where = monitor.trainer.base_url
        return _fail_start(monitor, trigger, f"the trainer cannot be reached at {where}: {exc}")
    if response.status_code != 202:
        return _fail_start(monitor, trigger, f"the trainer refused the retraining: {_error_of(response)}")
    run = response.json()
    _transition(monitor.database, trigger.id, (TriggerState.PENDING,), state=TriggerState.STARTED.value,
                flow_run_id=str(run["id"]), flow_run_url=run.get("ui_url"))
    monitor.metrics.retraining_running.labels(trigger.model).set(1)
    log.info("retraining %s from v%s (trigger %s, %s): flow run %s", trigger.model, trigger.version,
             trigger.id, trigger.cause, run["id"])
    return 1


def _fail_start(monitor: Monitor, trigger: TriggerRecord, message: str) -> int:
    log.warning("trigger %s of %s could not start: %s", trigger.id, trigger.model, message)
    _end(monitor, trigger.model, trigger.id, (TriggerState.PENDING,), TriggerState.FAILED, message=message)
    return 0


def _error_of(response: httpx.Response) -> str:
    try:
        return f"{response.status_code} {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:300]}"


def _transition(database: Database, trigger_id: int, from_states: Sequence[TriggerState],
                **values: Any) -> bool:
    """Move a trigger on, only from ``from_states`` (a second monitor may have moved it already)."""
    with database.session() as session:
        moved = session.execute(
            update(TriggerRecord)
            .where(TriggerRecord.id == trigger_id, TriggerRecord.state.in_([s.value for s in from_states]))
            .values(updated_at=utcnow(), **values)
        )
        return bool(getattr(moved, "rowcount", 0) == 1)


def _end(monitor: Monitor, model: str, trigger_id: int, from_states: Sequence[TriggerState],
         state: TriggerState, **values: Any) -> int:
    ended = _transition(monitor.database, trigger_id, from_states, state=state.value, active_model=None,
                        finished_at=utcnow(), **values)
    if not ended:
        return 0
    monitor.metrics.trigger_outcomes.labels(model, state.value).inc()
    monitor.metrics.retraining_running.labels(model).set(0)
    return 1


def _outcome(result: dict[str, Any] | None) -> dict[str, Any]:
    """What a completed retrain run produced, from its result (``pipelines.flows.train_evaluate_promote``)."""
    if not result:
        return {}
    request = result.get("request") or {}
    found = {
        "job_id": result.get("job_id"), "version": result.get("model_version"),
        "request_id": request.get("id"), "request_state": request.get("state"),
        "promoted": result.get("promoted"), "cached": result.get("cached"),
        "dataset_rev": result.get("dataset_rev"), "metrics": result.get("metrics"),
    }
    return {key: value for key, value in found.items() if value is not None}


def _follow(monitor: Monitor, trigger: TriggerRecord) -> int:
    """Read one started trigger's run; record where it went. How many triggers changed (0 or 1)."""
    try:
        response = monitor.trainer.get(f"/pipelines/runs/{trigger.flow_run_id}")
    except httpx.HTTPError as exc:
        log.debug("trigger %s: the trainer cannot be reached: %s", trigger.id, exc)
        return 0
    if response.status_code == 404:
        message = f"the trainer knows no flow run {trigger.flow_run_id}: {_error_of(response)}"
        return _end(monitor, trigger.model, trigger.id, ACTIVE_STATES, TriggerState.FAILED, message=message)
    if response.status_code != 200:
        log.debug("trigger %s: the trainer answered %s", trigger.id, _error_of(response))
        return 0
    return _record_run(monitor, trigger, response.json())


def _record_run(monitor: Monitor, trigger: TriggerRecord, run: dict[str, Any]) -> int:
    if run.get("final"):
        if run.get("state_type") == "COMPLETED":
            outcome = _outcome(run.get("result"))
            note = None if outcome else "the run completed but kept no result (see its page in Prefect)"
            return _end(monitor, trigger.model, trigger.id, ACTIVE_STATES, TriggerState.COMPLETED,
                        outcome=outcome, message=note)
        message = run.get("message") or f"the run ended {run.get('state')}"
        return _end(monitor, trigger.model, trigger.id, ACTIVE_STATES, TriggerState.FAILED, message=message)
    if run.get("state_type") == "RUNNING" and trigger.state == TriggerState.STARTED:
        return int(_transition(monitor.database, trigger.id, (TriggerState.STARTED,),
                               state=TriggerState.RUNNING.value))
    return 0


def _expire_pending(monitor: Monitor) -> int:
    """Fail pending triggers left by a monitor that stopped before it started their run."""
    stale = utcnow() - timedelta(seconds=STALE_PENDING_S)
    with monitor.database.session() as session:
        rows = list(session.scalars(select(TriggerRecord).where(
            TriggerRecord.state == TriggerState.PENDING.value, TriggerRecord.created_at < stale)))
    message = "the monitor stopped before it started this retraining"
    return sum(_end(monitor, t.model, t.id, (TriggerState.PENDING,), TriggerState.FAILED, message=message)
               for t in rows)


def _set_running(monitor: Monitor) -> None:
    """The retraining series of every watched model (one with windows, a policy or a trigger), from the
    record: ``running`` 1 or 0, and the trigger and outcome counters at 0 until they count something,
    so that dashboards show a zero, and ``increase()`` sees the first trigger."""
    with monitor.database.session() as session:
        counted = session.execute(
            select(TriggerRecord.model, func.count(TriggerRecord.active_model)).group_by(TriggerRecord.model))
        active: dict[str, int] = {model: count for model, count in counted}
        watched = set(active) | set(session.scalars(select(PolicyRecord.model))) | set(
            session.scalars(select(WindowRecord.model).distinct()))
    metrics = monitor.metrics
    for model in watched:
        metrics.retraining_running.labels(model).set(1 if active.get(model) else 0)
        for cause in Cause:
            metrics.triggers.labels(model, cause.value)
        for outcome in (TriggerState.COMPLETED, TriggerState.FAILED):
            metrics.trigger_outcomes.labels(model, outcome.value)


def follow_triggers(*, monitor: Monitor) -> int:
    """Read the state of running retrainings and record how they ended; how many changed."""
    changed = _expire_pending(monitor)
    with monitor.database.session() as session:
        following = list(session.scalars(select(TriggerRecord).where(
            TriggerRecord.state.in_([TriggerState.STARTED.value, TriggerState.RUNNING.value]),
            TriggerRecord.flow_run_id.is_not(None)).order_by(TriggerRecord.id)))
    for trigger in following:
        if monitor.stop.is_set():
            break
        changed += _follow(monitor, trigger)
    _set_running(monitor)
    return changed
