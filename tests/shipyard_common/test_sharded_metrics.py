"""Sharded metrics: the same exposition as prometheus_client's, and no update lost across threads."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shipyard_common.metrics import HttpMetrics
from shipyard_common.sharded import (
    ShardedCounter,
    ShardedCounterFamily,
    ShardedGauge,
    ShardedGaugeFamily,
    ShardedHistogram,
    ShardedHistogramFamily,
)

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


Samples = list[tuple[str, dict[str, str], float]]


def exposition(registry: CollectorRegistry) -> list[tuple[str, str, str, Samples]]:
    """Families and samples as Prometheus parses them, ``_created`` left out."""
    text = generate_latest(registry).decode()
    return [
        (family.name, family.type, family.documentation,
         [(s.name, s.labels, s.value) for s in family.samples if not s.name.endswith("_created")])
        for family in text_string_to_metric_families(text)
    ]


def both(drive: Callable[[Any, Any, Any], None], *, counter_name: str = "jobs") -> tuple[Any, Any]:
    """Run ``drive(counter, gauge, histogram)`` on prometheus_client's metrics and on ours."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    drive(Counter(counter_name, "Jobs done", ["kind", "code"], registry=theirs),
          Gauge("busy", "Jobs running", ["kind"], registry=theirs),
          Histogram("job_seconds", "Job time", ["kind"], buckets=BUCKETS, registry=theirs))
    drive(ShardedCounterFamily(counter_name, "Jobs done", ["kind", "code"], registry=ours),
          ShardedGaugeFamily("busy", "Jobs running", ["kind"], registry=ours),
          ShardedHistogramFamily("job_seconds", "Job time", ["kind"], buckets=BUCKETS, registry=ours))
    return theirs, ours


def test_exposition_matches_prometheus_client() -> None:
    def drive(counter: Any, gauge: Any, histogram: Any) -> None:
        counter.labels("train", 200).inc()
        counter.labels("train", "200").inc(2.5)
        counter.labels(kind="serve", code="500").inc()
        counter.labels("idle", "0")  # a child never incremented still shows, at 0
        gauge.labels("train").inc()
        gauge.labels("train").inc(3)
        gauge.labels("train").dec()
        gauge.labels("serve").dec(2)
        for value in (0.0005, 0.001, 0.001001, 0.05, 0.1, 7, 10, 11, 1e9, 0):
            histogram.labels("train").observe(value)
        histogram.labels("serve")

    theirs, ours = both(drive)
    assert exposition(ours) == exposition(theirs)
    text = generate_latest(ours).decode()
    assert 'job_seconds_bucket{kind="train",le="+Inf"} 10.0' in text
    assert 'job_seconds_bucket{kind="train",le="0.001"} 3.0' in text
    assert 'jobs_total{code="200",kind="train"} 3.5' in text


def test_counter_named_with_total_and_empty_families_match() -> None:
    theirs, ours = both(lambda counter, gauge, histogram: None, counter_name="jobs_total")
    assert exposition(ours) == exposition(theirs)
    # A labelled family with no children: HELP and TYPE only, as prometheus_client shows it.
    assert generate_latest(ours) == generate_latest(theirs)


def test_created_samples_are_kept() -> None:
    registry = CollectorRegistry()
    ShardedCounterFamily("jobs", "Jobs", ["kind"], registry=registry).labels("a").inc()
    ShardedHistogramFamily("t", "T", ["kind"], buckets=BUCKETS, registry=registry).labels("a").observe(1)
    names = {s.name for family in text_string_to_metric_families(generate_latest(registry).decode())
             for s in family.samples}
    assert {"jobs_created", "t_created"} <= names


def test_unlabelled_families_and_negative_buckets_match() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    for counter, histogram in (
        (Counter("plain", "Plain", registry=theirs),
         Histogram("signed", "Signed", buckets=(-1, 0, 1), registry=theirs)),
        (ShardedCounterFamily("plain", "Plain", registry=ours).labels(),
         ShardedHistogramFamily("signed", "Signed", buckets=(-1, 0, 1), registry=ours).labels()),
    ):
        counter.inc(4)
        for value in (-2, -1, 0.5, 3):
            histogram.observe(value)
    assert exposition(ours) == exposition(theirs)  # no _sum: a bucket is negative


def test_registering_a_name_twice_is_refused() -> None:
    registry = CollectorRegistry()
    ShardedCounterFamily("jobs", "Jobs", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("jobs", "Jobs again", ["kind"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        ShardedHistogramFamily("jobs", "Jobs again", buckets=BUCKETS, registry=registry)


def test_misuse_is_refused_like_prometheus_client() -> None:
    family = ShardedCounterFamily("jobs", "Jobs", ["kind"])
    with pytest.raises(ValueError):
        family.labels("a", "b")
    with pytest.raises(ValueError):
        family.labels("a").inc(-1)
    with pytest.raises(ValueError):
        ShardedHistogramFamily("h", "H", ["le"], buckets=BUCKETS)
    with pytest.raises(ValueError):
        ShardedHistogram((1, 0.5))


def test_labels_returns_one_cached_child_and_remove_forgets_it() -> None:
    registry = CollectorRegistry()
    family = ShardedCounterFamily("jobs", "Jobs", ["kind"], registry=registry)
    assert family.labels("a") is family.labels(kind="a")
    family.labels("a").inc()
    family.remove("a")
    families = text_string_to_metric_families(generate_latest(registry).decode())
    assert [s for family in families for s in family.samples] == []


def _hammer(threads: int, work: Callable[[int], None]) -> None:
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        start.wait()
        work(index)

    workers = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_no_update_is_lost_across_threads() -> None:
    threads, updates = 16, 20_000
    counter, gauge, histogram = ShardedCounter(), ShardedGauge(), ShardedHistogram(BUCKETS)

    def work(index: int) -> None:
        for step in range(updates):
            counter.inc()
            gauge.inc(2)
            gauge.dec()
            histogram.observe(0.005 if step % 2 else 5)

    _hammer(threads, work)
    assert counter.get() == threads * updates
    assert gauge.get() == threads * updates
    cumulative, total = histogram.get()
    assert cumulative == [0, threads * updates / 2, threads * updates / 2, threads * updates / 2,
                          threads * updates, threads * updates]
    assert math.isclose(total, threads * updates / 2 * 5.005)


def test_no_update_is_lost_while_scraped() -> None:
    registry = CollectorRegistry()
    family = ShardedCounterFamily("jobs", "Jobs", ["worker"], registry=registry)
    done = threading.Event()
    seen: list[float] = []

    def scrape() -> None:
        while not done.is_set():
            seen.append(sum(s.value for f in registry.collect() for s in f.samples if s.name == "jobs_total"))

    def work(index: int) -> None:
        for _ in range(10_000):
            family.labels(str(index % 3)).inc()

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        _hammer(8, work)
    finally:
        done.set()
        scraper.join()
    assert seen == sorted(seen)  # a counter never goes down between scrapes
    assert sum(family.labels(str(k)).get() for k in range(3)) == 80_000


def test_counts_of_threads_that_ended_stay() -> None:
    counter, histogram = ShardedCounter(), ShardedHistogram(BUCKETS)

    def work(index: int) -> None:
        counter.inc(10)
        histogram.observe(0.5)

    for round_ in range(5):
        _hammer(4, work)
        assert counter.get() == 40 * (round_ + 1)
        assert histogram.get()[0][-1] == 4 * (round_ + 1)
    counter.inc()  # and this thread's own shard adds to theirs
    assert counter.get() == 201


def test_http_metrics_observe() -> None:
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry, "serving")
    metrics.observe("POST", "/v1/models/{name}:predict", 200, 0.004)
    metrics.observe("POST", "/v1/models/{name}:predict", 200, 0.02)
    metrics.observe("GET", "/healthz", 503, 0.0001)
    assert len(metrics._children) == 2
    text = generate_latest(registry).decode()
    assert ('shipyard_http_requests_total{method="POST",route="/v1/models/{name}:predict",'
            'service="serving",status="200"} 2.0') in text
    assert ('shipyard_http_request_duration_seconds_count{method="POST",route="/v1/models/{name}:predict",'
            'service="serving"} 2.0') in text
