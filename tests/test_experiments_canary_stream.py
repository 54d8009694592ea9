"""The canary task against the real broker and serving's real metrics: each ramp step is judged
on its own traffic — CTR read from the stream since the step began, error rate and p99 from the
increase of serving's counters since the step's baseline."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from prometheus_client import REGISTRY, generate_latest

from serving.experiments import ExperimentRuntime
from serving.metrics import serve
from tandem import schema as s
from tandem.config import Paths
from tandem.data.landing import event_records
from tandem.data.world import World
from tandem.data.world_config import WorldConfig
from tandem.experiments import canary_task
from tandem.experiments import definitions as defs
from tandem.experiments.rehearsal import experiment_events
from tandem.experiments.stream_ctr import LATENESS_MS, _Join, read_ctr
from tandem.streaming.producer import EventProducer

from .conftest import free_port
from .test_experiments_report import hand_ctr
from .test_streaming import new_topic

WINDOW_MS = int(defs.ATTRIBUTION_WINDOW.total_seconds() * 1000)
START = datetime(2024, 1, 1, tzinfo=UTC)


def _definition(name: str, **canary) -> defs.Definition:
    return defs.Definition.from_dict({
        "name": name, "salt": name, "start": START.isoformat(),
        "variants": [{"name": "control"}, {"name": "treatment", "alias": "challenger"}],
        "guardrails": {"min_impressions": 1000},
        "canary": {"variant": "treatment", "ramp": [0.25, 0.5, 1.0], **canary}})


def _events(world: World, d: defs.Definition, day: int, keep: dict | None = None) -> pa.Table:
    return experiment_events(world, d, day, 1000, keep, seed=day)


def _produce(bootstrap: str, topic: str, table: pa.Table, poison: int = 0) -> None:
    producer = EventProducer(bootstrap, topic=topic, client_id="test-canary")
    producer.send_many(event_records(table))
    for i in range(poison):  # what a broken client may send: skipped and counted, never fatal
        producer.send_raw(b"u1", b"{not json" if i % 2 else b'{"event_type": "click"}')
    producer.flush(30)
    producer.close()


def _serve(runtime: ExperimentRuntime, variant: str, n: int, seconds: float,
           errors: int = 0) -> None:
    """``n`` answered requests of ``seconds`` and ``errors`` failed ones, through serving's own
    per-variant recording (what App.recommend calls)."""
    v = next(x for x in runtime.experiment.variants if x.name == variant)
    for _ in range(n):
        runtime.observe(v, seconds, None, [])
    for _ in range(errors):
        runtime.failed(v)


def _task(paths: Paths, metrics_port: int, bootstrap: str, topic: str) -> list[dict]:
    return canary_task.main(["--start", "2024-01-01T00:00:00+00:00", "--end",
                             "2024-01-02T00:00:00+00:00", "--home", str(paths.root),
                             f"--metrics-url=http://127.0.0.1:{metrics_port}/metrics",
                             f"--bootstrap={bootstrap}", "--topic", topic])


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(WorldConfig(n_users=4000, n_items=300, n_events_target=10_000,
                                      late_share=0.0, seed=5))


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return serve(free_port())


@pytest.mark.kafka
@pytest.mark.serving
def test_regressed_step_rolls_back_and_healthy_step_advances(tmp_path, kafka_broker, world,
                                                             metrics_port):
    topic = new_topic(kafka_broker.bootstrap)
    bad, good = _definition("cs-bad"), _definition("cs-good")
    paths = Paths(tmp_path / "state")
    defs.save(defs.definitions_path(paths), [bad, good])
    bad_events = _events(world, bad, 0, {"treatment": 0.5})  # the canary's users click half
    good_events = _events(world, good, 1)
    _produce(kafka_broker.bootstrap, topic, pa.concat_tables([bad_events, good_events]),
             poison=6)
    for d in (bad, good):  # serving is healthy for both: only the stream tells them apart
        runtime = ExperimentRuntime(d.to_ab())
        _serve(runtime, "control", 300, 0.004)
        _serve(runtime, "treatment", 100, 0.006)

    before = datetime.now(UTC)
    changed = {c["experiment"]: c for c in _task(paths, metrics_port, kafka_broker.bootstrap,
                                                 topic)}
    rolled, advanced = (d.canary for d in defs.load(defs.definitions_path(paths)))

    assert rolled.status == defs.ROLLED_BACK and rolled.share == 0.0 and rolled.step == 0
    assert "CTR" in rolled.reason and changed["cs-bad"]["always_valid_p"] < 0.05
    assert [v.name for v in bad.with_canary(rolled).to_ab().variants] == ["control"]

    assert advanced.status == defs.RAMPING and advanced.step == 1 and advanced.share == 0.5
    assert before <= advanced.step_started <= datetime.now(UTC)  # the next step starts now
    # the new step's baseline is serving's counters at the look
    assert advanced.baseline["treatment"]["buckets"]["+Inf"] >= 100
    good = changed["cs-good"]
    assert good["error_rate"] == 0.0 and good["p99_ms"] == pytest.approx(7.5)  # 6 ms requests

    # CTR read from the stream is the lake report's definition, number for number
    for name, table in (("cs-bad", bad_events), ("cs-good", good_events)):
        hand = hand_ctr(table, datetime.now(UTC))
        stream = changed[name]["stream"]
        assert stream["complete"] and sum(stream["skipped"].values()) == 6
        assert stream["skipped"]["undecodable:json"] == 3
        assert stream["impressions"] == {v: h[1] for v, h in hand.items()}
        ctr = {v: h[2] / h[1] for v, h in hand.items()}
        assert changed[name]["ctr_diff"] == pytest.approx(ctr["treatment"] - ctr["control"],
                                                          rel=1e-9)


@pytest.mark.kafka
@pytest.mark.serving
def test_a_step_is_judged_only_on_what_happened_since_it_began(tmp_path, kafka_broker, world,
                                                               metrics_port):
    """Before the step: a regressed stream, 20% errors and 400 ms latencies. Since the step:
    clean. The look advances; judged on totals instead, it would have rolled back."""
    topic = new_topic(kafka_broker.bootstrap)
    d = _definition("cs-window")
    runtime = ExperimentRuntime(d.to_ab())
    _produce(kafka_broker.bootstrap, topic, _events(world, d, 0, {"treatment": 0.3}))
    _serve(runtime, "treatment", 80, 0.4, errors=20)
    _serve(runtime, "control", 300, 0.004)

    time.sleep(0.05)  # the step begins strictly after every record above was appended
    step_started = datetime.now(UTC)
    baseline = canary_task.serving_counters(generate_latest(REGISTRY).decode(), d.name)
    time.sleep(0.05)
    d = d.with_canary(defs.Canary("treatment", (0.25, 0.5, 1.0), step_started=step_started,
                                  baseline=baseline))
    paths = Paths(tmp_path / "state")
    defs.save(defs.definitions_path(paths), [d])
    since = _events(world, d, 1)
    _produce(kafka_broker.bootstrap, topic, since)
    _serve(runtime, "treatment", 200, 0.006)
    _serve(runtime, "control", 600, 0.004)

    (entry,) = _task(paths, metrics_port, kafka_broker.bootstrap, topic)
    (after,) = defs.load(defs.definitions_path(paths))
    assert after.canary.status == defs.RAMPING and after.canary.step == 1, entry["reason"]
    assert entry["error_rate"] == 0.0 and entry["p99_ms"] == pytest.approx(7.5)
    assert entry["since"] == step_started.isoformat()
    hand = hand_ctr(since, datetime.now(UTC))
    assert entry["stream"]["impressions"] == {v: h[1] for v, h in hand.items()}

    # the same look without the step's start and baseline sees the old errors and clicks
    text = generate_latest(REGISTRY).decode()
    totals = canary_task.look(d, defs.Canary("treatment", (0.25, 0.5, 1.0)), text,
                              kafka_broker.bootstrap, topic, START, datetime.now(UTC))
    assert totals.canary.status == defs.ROLLED_BACK and "error rate" in totals.canary.reason
    # the 400 ms requests before the step: p99 in the 500 ms bucket
    assert totals.canary.history[-1]["p99_ms"] == pytest.approx(500.0)


@pytest.mark.kafka
def test_an_empty_window_reads_nothing_and_the_canary_holds(tmp_path, kafka_broker):
    topic = new_topic(kafka_broker.bootstrap)
    now = datetime.now(UTC)
    read = read_ctr(kafka_broker.bootstrap, "nobody", now - timedelta(minutes=1), now,
                    topic=topic, timeout_s=30)
    assert read.moments == {} and read.records == 0 and read.complete
    paths = Paths(tmp_path / "state")
    defs.save(defs.definitions_path(paths), [_definition("cs-empty")])
    (entry,) = canary_task.step_all(defs.definitions_path(paths), None,
                                    kafka_broker.bootstrap, topic)
    assert entry["status"] == defs.RAMPING and entry["reason"] == "hold: too few impressions"


def test_serving_counters_and_their_increase_since_the_step():
    """Prometheus text -> per-variant counters; requests, errors, p99 over their increase."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    seconds = Histogram("tandem_variant_seconds", "", ["experiment", "variant"],
                        buckets=(0.01, 0.05, 0.2), registry=reg)
    errors = Counter("tandem_variant_errors", "", ["experiment", "variant"], registry=reg)
    for _ in range(95):
        seconds.labels("e", "treatment").observe(0.005)
    for _ in range(5):
        seconds.labels("e", "treatment").observe(0.1)  # 5% of requests in (0.05, 0.2]
    errors.labels("e", "treatment").inc(3)
    seconds.labels("other", "treatment").observe(1.0)  # another experiment: ignored
    base = canary_task.serving_counters(generate_latest(reg).decode(), "e")
    assert base == {"treatment": {"errors": 3, "buckets": {"0.01": 95.0, "0.05": 95.0,
                                                           "0.2": 100.0, "+Inf": 100.0}}}
    assert canary_task.health_since(base["treatment"], None) == pytest.approx((103, 3, 200.0))
    for _ in range(300):
        seconds.labels("e", "treatment").observe(0.02)
    errors.labels("e", "treatment").inc(1)
    now = canary_task.serving_counters(generate_latest(reg).decode(), "e")["treatment"]
    assert canary_task.health_since(now, base["treatment"]) == pytest.approx((301, 1, 50.0))
    assert canary_task.health_since(now, now) == (0, 0, 0.0)
    # serving restarted after the baseline: its counters start again at 0
    restarted = {"errors": 1, "buckets": {"0.01": 10.0, "0.05": 10.0, "0.2": 10.0,
                                          "+Inf": 10.0}}
    assert canary_task.health_since(restarted, base["treatment"]) == pytest.approx((11, 1, 10.0))


def test_stream_join_attributes_clicks_like_the_report():
    """Clicks count within [ts, ts + window] of their impression, also when read before it;
    a partition's pending impressions are final once its append time has moved past them."""
    join = _Join("e", WINDOW_MS)

    def ev(kind, request, item, ts, user="u1", variant="treatment"):
        return {s.EVENT_TYPE: kind, s.REQUEST_ID: request, s.ITEM_ID: item, s.TS: ts,
                s.USER_ID: user, s.EXPERIMENT: "e" if kind == s.IMPRESSION else None,
                s.VARIANT: variant if kind == s.IMPRESSION else None}

    join.add(0, 1000, ev(s.CLICK, "r1", "a", 1500))  # read before its impression
    join.add(0, 1001, ev(s.IMPRESSION, "r1", "a", 1000))
    join.add(0, 1002, ev(s.IMPRESSION, "r1", "a", 1000))  # a duplicate: one impression
    join.add(0, 1003, ev(s.IMPRESSION, "r1", "b", 1000))
    join.add(0, 1004, ev(s.CLICK, "r1", "b", 1000 + WINDOW_MS + 1))  # after the window
    join.add(0, 1005, ev(s.IMPRESSION, "r2", "a", 1000, user="u2", variant="control"))
    join.add(1, 1006, ev(s.IMPRESSION, "r3", "a", 1000, user="u3", variant="control"))
    join.add(0, 1005 + WINDOW_MS + LATENESS_MS, ev(s.PLAY, "r9", "z", 2000))
    assert ("r2", "a") not in join.pending and ("r3", "a") in join.pending  # partition 0 moved
    join.add(0, 2_000_000_000, ev(s.CLICK, "r2", "a", 1001))  # too late: already final
    m = join.moments()
    assert (m["treatment"].n, m["treatment"].sx, m["treatment"].sy) == (1, 2, 1)
    assert (m["control"].n, m["control"].sx, m["control"].sy) == (2, 2, 0)
