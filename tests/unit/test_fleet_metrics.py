"""Workers' metrics merged into a server's: one family per name, each worker's samples
labelled, histograms and counters kept whole, the result readable by Prometheus' parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from charforge.observability.fleet_metrics import merge
from charforge.observability.metrics import Metrics


def _worker_text(seconds: list[float]) -> bytes:
    metrics = Metrics()
    for value in seconds:
        metrics.backend_seconds.labels("anime", "ok").observe(value)
    metrics.checkpoint_switches.labels("anime").inc(len(seconds))
    return metrics.render()


def test_two_workers_merge_into_one_family_each() -> None:
    own = Metrics().render()
    merged = merge(own, [("w1:1", _worker_text([0.5, 1.5])), ("w2:2", _worker_text([2.0]))])
    text = merged.decode()
    assert text.count("# TYPE charforge_backend_request_seconds histogram") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        s.labels["worker"]: s.value
        for s in families["charforge_backend_request_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"w1:1": 2.0, "w2:2": 1.0}
    switches = {
        s.labels["worker"]: s.value
        for s in families["charforge_checkpoint_switches"].samples
        if s.name.endswith("_total")
    }
    assert switches == {"w1:1": 2.0, "w2:2": 1.0}


def test_an_unreadable_worker_is_left_out() -> None:
    merged = merge(Metrics().render(), [("bad", b"not { metrics"), ("ok", _worker_text([1.0]))])
    families = {f.name: f for f in text_string_to_metric_families(merged.decode())}
    workers = {
        s.labels.get("worker") for s in families["charforge_backend_request_seconds"].samples
    }
    assert workers == {"ok"}
