"""Stream benchmark: events at a set rate through the broker into both consumers.

``python bench/stream.py [--rate 2000] [--duration 60] [--backlog 20000] [--bootstrap H:P]``

1. A synthetic world (``tandem.data.world``) supplies users, a catalog (written to the lake, so the
   feature consumer knows item genres) and realistic sessions of events.
2. The embedded broker starts (or ``--bootstrap`` names one), the Feast repo is applied, and the
   landing and feature consumers start as subprocesses, each writing a stats file.
3. Rate phase: events are produced at ``--rate`` for ``--duration`` s (``ts`` stamped at send
   time). Reported per consumer: sustained events/s (records processed in the phase / time from
   phase start to its last record processed) and freshness p50/p99/max in ms, the produce time
   to visible (landing: file durable; features: Feast push returned), over exactly the rate
   phase's records (the consumers keep that many samples, so the warm-up is left out). The
   target is met when both consumers keep up (sustained >= 98% of the produced rate) with
   freshness p99 <= 1 s.
4. Backlog phase: ``--backlog`` events are produced as fast as possible; reported per consumer:
   drain events/s, its maximum throughput (the producer competes for the same cores).

Writes ``reports/bench_stream.json``. The machine's load average is recorded with the numbers:
on a shared 2-core box other work moves them a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tandem.config import Paths  # noqa: E402
from tandem.streaming.broker import start_broker  # noqa: E402
from tandem.streaming.codec import now_ms  # noqa: E402
from tandem.streaming.producer import EventProducer  # noqa: E402
from tandem.streaming.topics import DLQ_TOPIC, ensure_topics  # noqa: E402

CONSUMERS = {"landing": "tandem.streaming.landing_consumer",
             "features": "tandem.streaming.feature_consumer"}


def world_events(n: int, n_users: int, paths: Paths) -> list[dict]:
    """At least ``n`` event.v1 dicts from a synthetic world; writes its catalog to the lake."""
    from tandem.data.landing import event_records, write_items
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig

    world = World.generate(WorldConfig(n_users=n_users, n_items=1000,
                                       n_events_target=int(n * 1.1), days=1))
    write_items(world.items_table(), paths)
    events: list[dict] = []
    for table in world.generate_events():
        events.extend(event_records(table))
        if len(events) >= n:
            break
    return events[:n]


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"counts": {"records": 0}}


def records(path: Path) -> int:
    return read_stats(path)["counts"]["records"]


def wait_records(stats: dict[str, Path], target: int, timeout: float) -> dict[str, float]:
    """Wall time (epoch s) at which each consumer's processed records reached ``target``."""
    done: dict[str, float] = {}
    deadline = time.time() + timeout
    while len(done) < len(stats) and time.time() < deadline:
        for name, path in stats.items():
            if name not in done and records(path) >= target:
                done[name] = read_stats(path)["last_visible_ms"] / 1000.0
        time.sleep(0.1)
    missing = set(stats) - set(done)
    if missing:
        raise TimeoutError(f"{missing} did not reach {target} records in {timeout} s")
    return done


def produce_at(producer: EventProducer, events: list[dict], rate: float | None) -> float:
    """Send ``events`` (ts re-stamped to now) at ``rate``/s (None: as fast as possible)."""
    t0 = time.time()
    tick = 0.01
    for i, ev in enumerate(events):
        if rate and i % max(int(rate * tick), 1) == 0:
            ahead = t0 + i / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
        producer.send({**ev, "ts": now_ms()})
    producer.flush()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2000.0, help="events/s in the rate phase")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the rate phase")
    ap.add_argument("--backlog", type=int, default=20000, help="events in the backlog phase")
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--bootstrap", default=None, help="use this broker instead of tansu")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_stream.json")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tandem-bench-stream-"))
    paths = Paths(home)
    n_rate = int(args.rate * args.duration)
    warm = 200
    events = world_events(warm + n_rate + args.backlog, args.users, paths)
    from tandem.features.feature_store import apply

    apply(paths)
    broker = None if args.bootstrap else start_broker(log_path=home / "tansu.log")
    bootstrap = args.bootstrap or broker.bootstrap
    topic = f"tandem.events.bench-{os.getpid()}"
    ensure_topics(bootstrap, names=(topic, DLQ_TOPIC))
    stats = {name: home / f"{name}.json" for name in CONSUMERS}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", module, "--home", str(home), "--bootstrap", bootstrap,
         "--topic", topic, "--group", f"bench-{name}-{os.getpid()}", "--stats",
         str(stats[name]), "--stats-window", str(n_rate)], cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=open(home / f"{name}.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        for name, module in CONSUMERS.items()}
    producer = EventProducer(bootstrap, topic)
    try:
        produce_at(producer, events[:warm], None)
        wait_records(stats, warm, 180)
        load_before = os.getloadavg()
        t_rate = time.time()
        produce_s = produce_at(producer, events[warm:warm + n_rate], args.rate)
        done = wait_records(stats, warm + n_rate, 120)
        rate_stats = {name: read_stats(path) for name, path in stats.items()}
        load_rate = os.getloadavg()
        t_backlog = time.time()
        produce_at(producer, events[warm + n_rate:], None)
        drained = wait_records(stats, len(events), 300)
    finally:
        producer.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(30)
        if broker:
            broker.stop()
    produced = n_rate / produce_s
    sustained = {name: n_rate / (done[name] - t_rate) for name in CONSUMERS}
    report = {
        "rate_target_events_per_s": args.rate,
        "duration_s": args.duration,
        "produced_events_per_s": round(produced, 1),
        "users": args.users,
        "target": "both consumers keep up (>= 98% of the produced rate), freshness p99 <= 1 s",
        "target_met": all(sustained[name] >= 0.98 * produced
                          and rate_stats[name]["freshness_ms"]["p99"] <= 1000
                          for name in CONSUMERS),
        "consumers": {name: {
            "sustained_events_per_s": round(sustained[name], 1),
            "freshness_ms": rate_stats[name]["freshness_ms"],
            "backlog_events": args.backlog,
            "drain_events_per_s": round(args.backlog / (drained[name] - t_backlog), 1),
            "counts": rate_stats[name]["counts"],
        } for name in CONSUMERS},
        "freshness_window": "the rate phase's records (warm-up left out)",
        "loadavg_before": load_before,
        "loadavg_rate_phase_end": load_rate,
        "cpus": os.cpu_count(),
        "broker": "external" if args.bootstrap else "tansu (memory)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
