"""The closed loop of ``make experiment``: real serving answers simulated users, their responses
travel the production path into the lake, and the experiment job reads them back.

One run, all on loopback, every component for real:

1. a ``tandem.data.world`` world and a synthetic bundle over the same ids (``u<i>``, ``i<j>``);
   a definitions file with an A/B of two serving configs (``control``: the default MMR,
   ``treatment``: ``mmr_lambda`` 0.3, a canary at its first ramp step of 50%, so the split is
   an even A/B) plus a shadow variant scoring every request off the hot path;
2. the tansu broker, the landing consumer and ``python -m serving.server`` (its Kafka impression
   sink, ``--experiments-file``, a Prometheus port) as their own processes;
3. ``requests`` gRPC calls for world users; :meth:`World.respond` (the world's click model)
   answers each returned slate and the engagements are produced to Kafka with the served
   ``request_id`` (serving itself logs the impressions);
4. once the landing consumer has landed everything sent, the canary task looks once (CTR read
   back from the stream, error rate and p99 from serving's ``/metrics``: the ``canary_look``
   block; its decision is not applied), then ``jobs.ingest_events`` (landing -> lake) and
   ``jobs.experiment_report`` run as processes, the way the DAGs run them.

It returns the ``closed_loop`` block of ``reports/experiment.json``: what was sent, what landed
in the lake (``lost`` = sent - landed), the report's per-variant CTR and SRM check, and the
shadow's overlap@k, rank correlation and latency scraped from serving's ``/metrics``.

Why once, not per seeded run: the statistics are exercised 40+ times in
:mod:`tandem.experiments.rehearsal`; this proves the plumbing (the same ``request_id`` on an
impression and its engagements, through producer -> broker -> consumer -> ingest -> report).
Memory: the world and bundle are small (``n_items`` items, ``users`` users); the client keeps
only the served slates of its ``requests``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from prometheus_client.parser import text_string_to_metric_families

from tandem import schema as s
from tandem.config import REPO_ROOT, Paths
from tandem.data.landing import event_records, write_items
from tandem.data.world import World
from tandem.data.world_config import WorldConfig
from tandem.experiments import canary_task
from tandem.experiments.definitions import Definition, definitions_path, save
from tandem.models import synthetic_bundle as S
from tandem.ops import processes
from tandem.ops.grpc_channel import channel, wait_serving
from tandem.streaming.broker import _free_port, start_broker
from tandem.streaming.producer import EventProducer
from tandem.streaming.topics import EVENTS_TOPIC, ensure_topics

NAME = "closed-loop"


@dataclass(frozen=True)
class LoopConfig:
    """Sizes of the loop (:meth:`quick`: the CI test's)."""

    users: int = 2_000
    requests: int = 3_000
    n_items: int = 500
    k: int = 10
    seed: int = 0
    land_timeout_s: float = 120.0

    @classmethod
    def quick(cls) -> LoopConfig:
        return cls(users=300, requests=300, n_items=300)


def _definition(day: datetime) -> Definition:
    return Definition.from_dict({
        "name": NAME, "start": day.isoformat(), "end": (day + timedelta(days=2)).isoformat(),
        "variants": [{"name": "control"},
                     {"name": "treatment", "overrides": {"mmr_lambda": 0.3}},
                     {"name": "shadow", "alias": "challenger", "shadow": True}],
        "canary": {"variant": "treatment", "ramp": [0.5, 1.0]}})


def _ask(target: str, users: list[str], k: int, world: World, rng: np.random.Generator
         ) -> tuple[list[dict], dict[str, int], set[str]]:
    """One Recommend per user in ``users``; the world answers each slate. Returns the
    engagement events, the impressions serving answered per variant and the request ids."""
    from tandem.contracts import recommender_v1_pb2 as pb
    from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc

    served: dict[str, int] = {}
    slates, request_ids, stamps = [], [], []
    with channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for user in users:
            reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=k), timeout=10)
            stamps.append(int(time.time() * 1000))  # after serving stamped its impressions
            slates.append([i.item_id for i in reply.items])
            request_ids.append(reply.request_id)
            served[reply.variant] = served.get(reply.variant, 0) + len(reply.items)
    events = world.respond(users, slates, request_ids, stamps, rng)
    return event_records(events), served, set(request_ids)


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples of a Prometheus exposition: name -> {sorted label pairs: value}."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _mean(samples: dict[str, dict], name: str) -> float | None:
    total = sum(samples.get(f"{name}_sum", {}).values())
    count = sum(samples.get(f"{name}_count", {}).values())
    return total / count if count else None


def _quantile(samples: dict[str, dict], name: str, q: float) -> float | None:
    """The upper edge of the first histogram bucket holding ``q`` of the observations (summed
    over label sets); None without observations."""
    edges: dict[float, float] = {}
    for labels, value in samples.get(f"{name}_bucket", {}).items():
        le = float(dict(labels)["le"])
        edges[le] = edges.get(le, 0.0) + value
    total = edges.get(float("inf"), 0.0)
    return next((le for le, c in sorted(edges.items()) if c >= q * total), None) if total \
        else None


def shadow_block(samples: dict[str, dict]) -> dict[str, Any]:
    """Overlap@k, Kendall tau and latency of the shadow variant, plus how many shadow requests
    were scored and dropped. Kendall's histogram has negative buckets, for which Prometheus
    keeps no ``_sum``: its median is given as a bucket edge (0.1 wide)."""
    seconds = _mean(samples, "tandem_shadow_seconds")
    p99 = _quantile(samples, "tandem_shadow_seconds", 0.99)
    return {"scored": int(sum(samples.get("tandem_shadow_seconds_count", {}).values())),
            "dropped": int(sum(samples.get("tandem_shadow_dropped_total", {}).values())),
            "overlap_at_k_mean": _mean(samples, "tandem_shadow_overlap"),
            "rank_corr_median_bucket": _quantile(samples, "tandem_shadow_rank_corr", 0.5),
            "latency_ms_mean": None if seconds is None else seconds * 1000.0,
            "latency_ms_p99_bucket": None if p99 is None else p99 * 1000.0}


def _shadow_settled(metrics_port: int, requests: int, timeout_s: float) -> str:
    """Serving's metrics once its shadow child has answered (scored, dropped or failed) every
    request, or at ``timeout_s``: the child scores in its own process, behind the replies."""
    names = ("tandem_shadow_seconds_count", "tandem_shadow_dropped_total",
             "tandem_shadow_failed_total")
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        samples = parse_metrics(text)
        if (sum(sum(samples.get(n, {}).values()) for n in names) >= requests
                or time.monotonic() > deadline):
            return text
        time.sleep(0.5)


def _landed(stats: Path) -> int:
    try:
        return int(json.loads(stats.read_text())["counts"].get("landed", 0))
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _job(module: str, home: Path, start: datetime, end: datetime, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", module, "--home", str(home), "--start",
                    start.isoformat(), "--end", end.isoformat()], check=True, env=env,
                   cwd=REPO_ROOT)


def _lake_counts(paths: Paths, request_ids: set[str]) -> dict[str, int]:
    """Impressions and engagements in the lake that belong to this loop's requests."""
    table = pads.dataset(paths.events, format="parquet", partitioning="hive").to_table(
        columns=[s.EVENT_TYPE, s.REQUEST_ID])
    mine = table.filter(pc.is_in(table.column(s.REQUEST_ID),
                                 value_set=pa.array(sorted(request_ids))))
    imp = pc.sum(pc.equal(mine.column(s.EVENT_TYPE), s.IMPRESSION)).as_py() or 0
    return {"impressions": int(imp), "engagements": mine.num_rows - int(imp)}


def run(work: Path, cfg: LoopConfig = LoopConfig(), reports: Path | None = None
        ) -> dict[str, Any]:
    """The whole loop under ``work`` (its experiment report goes to ``reports``, default
    ``work/reports``); returns the ``closed_loop`` block (module docstring)."""
    reports = reports or work / "reports"
    t0 = time.perf_counter()
    paths = Paths(work / "state")
    world = World.generate(WorldConfig(n_users=cfg.users, n_items=cfg.n_items,
                                       n_events_target=10_000, seed=cfg.seed))
    bundle, item_features = S.build(work / "synthetic", S.SyntheticSpec(
        n_items=cfg.n_items, n_users=cfg.users, n_als_users=cfg.users // 2, n_trees=10,
        num_leaves=7, n_train_groups=60, group_size=20, seed=cfg.seed))
    write_items(world.items_table(), paths)  # the report's diversity and coverage read it
    started = datetime.now(UTC)
    day = started.replace(hour=0, minute=0, second=0, microsecond=0)
    save(definitions_path(paths), [_definition(day)])
    rng = np.random.default_rng([cfg.seed, 23])
    users = [f"u{u}" for u in rng.integers(0, cfg.users, cfg.requests)]
    with start_broker(log_path=work / "tansu.log") as broker:
        ensure_topics(broker.bootstrap)
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "PYTHONPATH": str(REPO_ROOT)}
        stats = paths.run / "landing.stats.json"
        port, metrics_port = _free_port(), _free_port()
        processes.start(paths.run, "landing-consumer", [
            sys.executable, "-m", "tandem.streaming.landing_consumer", "--home",
            str(paths.root), "--bootstrap", broker.bootstrap, "--stats", str(stats)], env=env)
        processes.start(paths.run, "serving", [
            sys.executable, "-m", "serving.server", "--bundle-dir", str(bundle),
            "--item-features", str(item_features), "--port", str(port), "--metrics-port",
            str(metrics_port), "--experiments-file", str(definitions_path(paths)),
            "--ranker-backend", "lightgbm", "--impression-sink",
            "tandem.streaming.producer:impression_logger_from_env",
            # the rehearsal's few hundred requests come one at a time, so the shadow can score
            # every one of them (the server's default samples a share to protect a loaded p99)
            "--shadow-sample", "1"], env=env)
        try:
            if not wait_serving(f"127.0.0.1:{port}", 300):
                raise RuntimeError(f"serving did not start; see {paths.run / 'serving.log'}")
            events, served, request_ids = _ask(f"127.0.0.1:{port}", users, cfg.k, world, rng)
            producer = EventProducer(broker.bootstrap, client_id="tandem-closed-loop")
            producer.send_many(events)
            producer.flush(30)
            producer.close()
            sent = sum(served.values()) + len(events)  # serving logs its impressions async
            deadline = time.monotonic() + cfg.land_timeout_s
            while _landed(stats) < sent and time.monotonic() < deadline:
                time.sleep(0.5)
            text = _shadow_settled(metrics_port, len(users), cfg.land_timeout_s)
            samples = parse_metrics(text)
            # one look, not saved: the loop's traffic is over, and the report below must see
            # the split that traffic had
            d = _definition(day)
            look = canary_task.look(d, d.canary, text, broker.bootstrap, EVENTS_TOPIC, day,
                                    datetime.now(UTC)).canary.history[-1]
            logged = int(sum(samples.get("tandem_impressions_logged_total", {}).values()))
        finally:
            processes.stop(paths.run, "serving")
            processes.stop(paths.run, "landing-consumer")
    ended = datetime.now(UTC)
    job_env = {**processes.child_env(), "PYTHONPATH": str(REPO_ROOT),
               "TANDEM_REPORTS": str(reports)}
    hour = started.replace(minute=0, second=0, microsecond=0)
    _job("jobs.ingest_events", paths.root, hour,
         ended.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1), job_env)
    _job("jobs.experiment_report", paths.root, day,
         ended.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1), job_env)
    report_path = reports / f"experiment_{NAME}.json"
    report = json.loads(report_path.read_text())
    landed = _lake_counts(paths, request_ids)
    moments = {v: m["ctr"] for v, m in report["moments"].items()}
    n_imps = sum(served.values())
    clicks = sum(e[s.EVENT_TYPE] == s.CLICK for e in events)
    return {
        "requests": len(users), "impressions_served": n_imps, "impressions_logged": logged,
        "engagements_sent": len(events), "clicks_sent": clicks,
        "impressions_landed": landed["impressions"], "engagements_landed": landed["engagements"],
        "lost": {"impressions": n_imps - landed["impressions"],
                 "engagements": len(events) - landed["engagements"]},
        "variants": {v: {"users": int(m["n"]), "impressions": int(m["sx"]),
                         "clicks": int(m["sy"]), "ctr": m["sy"] / m["sx"] if m["sx"] else None}
                     for v, m in moments.items()},
        "served_impressions": served,
        "srm_p_value": report["srm"]["p_value"], "srm_mismatch": report["srm"]["mismatch"],
        "report": str(report_path), "shadow": shadow_block(samples),
        "canary_look": {k: look[k] for k in ("status", "reason", "ctr_diff", "always_valid_p",
                                             "error_rate", "p99_ms", "stream")},
        "seconds": round(time.perf_counter() - t0, 1)}
