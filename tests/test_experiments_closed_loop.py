"""The closed loop of ``make experiment``: simulated users answer served slates
(:meth:`World.respond`), shadow metrics are read back from a Prometheus exposition, and the whole
loop (gRPC server -> world -> Kafka -> landing consumer -> ingest -> experiment report) lands
exactly what was sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from serving.metrics import _MS_BUCKETS
from tandem import schema as s
from tandem.data.landing import event_records
from tandem.data.world import World
from tandem.data.world_config import WorldConfig
from tandem.experiments import closed_loop
from tandem.validation import validate_event


def test_respond_answers_the_served_slates_with_the_click_model():
    world = World.generate(WorldConfig(n_users=200, n_items=80, n_events_target=2000))
    rng = np.random.default_rng(5)
    users = [f"u{u}" for u in rng.integers(0, 200, 400)]
    slates = [[f"i{j}" for j in rng.choice(80, 10 if n % 7 else 3, replace=False)]
              for n in range(400)]  # every 7th slate is short: ragged is allowed
    request_ids = [f"req-{n}" for n in range(400)]
    stamps = 1_800_000_000_000 + 1000 * np.arange(400)
    events = world.respond(users, slates, request_ids, stamps, np.random.default_rng(9))
    records = event_records(events)
    for r in records:
        validate_event(r)
        n = int(r[s.REQUEST_ID].split("-")[1])
        assert r[s.USER_ID] == users[n] and slates[n][r[s.POSITION]] == r[s.ITEM_ID]
        assert stamps[n] < r[s.TS] <= stamps[n] + 1000 + 400 * 9 + 2000
    # the clicks are the click model's: same draws as World.simulate on the padded slates
    padded = np.zeros((400, 10), np.int64)
    valid = np.arange(10) < np.array([len(x) for x in slates])[:, None]
    padded[valid] = [int(i[1:]) for x in slates for i in x]
    e = world.simulate(np.array([int(u[1:]) for u in users]), padded, np.random.default_rng(9))
    types = [r[s.EVENT_TYPE] for r in records]
    assert types.count(s.CLICK) == int((e.click & valid).sum()) > 0
    assert types.count(s.PLAY) == int((e.play & valid).sum())
    assert len({r[s.EVENT_ID] for r in records}) == len(records)
    plays = {(r[s.REQUEST_ID], r[s.POSITION]) for r in records if r[s.EVENT_TYPE] == s.PLAY}
    clicks = {(r[s.REQUEST_ID], r[s.POSITION]) for r in records if r[s.EVENT_TYPE] == s.CLICK}
    assert plays <= clicks


def test_shadow_block_reads_servings_histograms():
    """Same names and buckets as serving.experiments; values hand-computed."""
    reg = CollectorRegistry()
    sec = Histogram("tandem_shadow_seconds", "", ["alias"], buckets=_MS_BUCKETS, registry=reg)
    ovl = Histogram("tandem_shadow_overlap", "", ["alias"],
                    buckets=tuple(x / 10 for x in range(11)), registry=reg)
    tau = Histogram("tandem_shadow_rank_corr", "", ["alias"],
                    buckets=tuple(x / 10 for x in range(-10, 11)), registry=reg)
    Counter("tandem_shadow_dropped", "", ["alias"], registry=reg).labels("c").inc(2)
    for x in (0.004, 0.006, 0.005):
        sec.labels("c").observe(x)
    for x in (1.0, 0.5, 0.6):
        ovl.labels("c").observe(x)
    for x in (1.0, 0.95, -0.3):
        tau.labels("c").observe(x)
    block = closed_loop.shadow_block(closed_loop.parse_metrics(generate_latest(reg).decode()))
    assert block["scored"] == 3 and block["dropped"] == 2
    assert block["overlap_at_k_mean"] == pytest.approx(0.7)
    assert block["latency_ms_mean"] == pytest.approx(5.0)
    assert block["rank_corr_median_bucket"] == pytest.approx(1.0)  # 2 of 3 in (0.9, 1.0]


@pytest.mark.kafka
@pytest.mark.serving
@pytest.mark.spark
@pytest.mark.slow
def test_closed_loop_lands_what_was_sent(tmp_path):
    """Serving -> simulated users -> tansu -> landing consumer -> ingest -> experiment report:
    nothing lost, the report's per-variant counts equal what serving answered and the users
    clicked, the split passes SRM, every request was shadow-scored."""
    cfg = closed_loop.LoopConfig.quick()
    out = closed_loop.run(tmp_path / "loop", cfg, reports=tmp_path / "reports")
    assert out["requests"] == cfg.requests
    assert out["impressions_served"] == cfg.requests * cfg.k == out["impressions_logged"]
    assert out["lost"] == {"impressions": 0, "engagements": 0}
    assert out["impressions_landed"] == out["impressions_served"]
    assert out["engagements_landed"] == out["engagements_sent"] > 0
    assert set(out["variants"]) == {"control", "treatment"}
    for v, m in out["variants"].items():
        assert m["impressions"] == out["served_impressions"][v]
    assert sum(m["clicks"] for m in out["variants"].values()) == out["clicks_sent"] > 0
    assert not out["srm_mismatch"] and out["srm_p_value"] > 0.001
    assert out["shadow"]["scored"] + out["shadow"]["dropped"] == cfg.requests
    assert out["shadow"]["overlap_at_k_mean"] is not None
    # the canary's look read serving's impressions and the users' clicks back from the stream:
    # the same numbers the lake report counted
    look = out["canary_look"]
    assert look["stream"]["complete"] and look["stream"]["skipped"] == {}
    assert look["stream"]["impressions"] == out["served_impressions"]
    assert look["stream"]["clicks"] == {v: m["clicks"] for v, m in out["variants"].items()}
    assert look["error_rate"] == 0.0 and look["p99_ms"] > 0
    report = json.loads((tmp_path / "reports" / "experiment_closed-loop.json").read_text())
    assert report["srm"]["users"] == {v: m["users"] for v, m in out["variants"].items()}
