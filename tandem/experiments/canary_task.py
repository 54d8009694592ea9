"""The ``canary`` task of ``tandem_experiments``: one look at every ramping canary, judged on the
traffic of its current ramp step only.

``python -m tandem.experiments.canary_task --start ISO --end ISO [--home DIR]
[--metrics-url=URL] [--bootstrap=HOST:PORT] [--topic NAME]``. For each experiment with a ramping
canary, the step's window is ``[step_started, now)`` (``step_started`` from the definition; until
the first advance, the experiment's ``start``, else the run's ``--start``):

* CTR per variant: read from the event stream over that window
  (:func:`tandem.experiments.stream_ctr.read_ctr`: serving's impressions joined to the clicks
  by ``request_id``/``item_id`` with the lake report's definitions). The daily lake report
  stays the analysis a person reads; the guardrail does not wait for it. Without a broker
  (``--bootstrap`` or ``KAFKA_BOOTSTRAP_SERVERS``) there is no CTR evidence and the canary holds.
* error rate and p99 latency per variant: serving's Prometheus counters
  (``tandem_variant_seconds`` histogram, ``tandem_variant_errors_total``) minus the
  definition's ``baseline`` — the same counters recorded when the step began. Why deltas of
  cumulative counters and not windowed metrics in serving: serving stays ignorant of ramp steps
  (counters are the Prometheus convention, and the same arithmetic works on a Prometheus server's
  ``increase()``), and the baseline lives in the definitions file the task rewrites anyway, so a
  re-run of the look needs nothing else. A counter below its baseline means serving restarted:
  its increase is then its current value (Prometheus' counter-reset rule). Without a URL only
  the CTR guardrail applies (logged).

then :func:`tandem.experiments.canary.decide` (which records the next step's start and baseline
when it advances) and saves the new ramp state into the definitions file; serving applies it at
its next poll. Memory: the stream read's (:mod:`tandem.experiments.stream_ctr`); the metrics
text is a few kilobytes.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tandem.config import kafka_bootstrap
from tandem.experiments import definitions as defs
from tandem.experiments.canary import ArmHealth, decide
from tandem.experiments.stats import Moments
from tandem.experiments.stream_ctr import StreamCtr, read_ctr
from tandem.ops.job_cli import interval_parser, parse
from tandem.streaming.topics import EVENTS_TOPIC

log = logging.getLogger(__name__)
LATENCY, ERRORS = "tandem_variant_seconds", "tandem_variant_errors"


def serving_counters(text: str, experiment: str) -> dict[str, dict[str, Any]]:
    """Per variant of ``experiment``, from a Prometheus exposition ``text``: ``errors`` (requests
    that raised) and ``buckets`` (latency histogram, ``le`` -> cumulative count of answered
    requests). JSON-ready: this is what a step's ``baseline`` stores."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("experiment") != experiment:
                continue
            arm = out.setdefault(sample.labels.get("variant", ""), {"errors": 0, "buckets": {}})
            if sample.name == f"{LATENCY}_bucket":
                arm["buckets"][sample.labels["le"]] = sample.value
            elif sample.name == f"{ERRORS}_total":
                arm["errors"] = int(sample.value)
    return out


def health_since(now: Mapping[str, Any] | None, base: Mapping[str, Any] | None
                 ) -> tuple[int, int, float]:
    """(requests, errors, p99 ms) over the counters' increase from ``base`` to ``now``: requests
    = answered + errors; p99 = the upper edge of the first latency bucket holding 99% of the
    answered requests (0 when none were answered)."""
    now, base = now or {"errors": 0, "buckets": {}}, base or {"errors": 0, "buckets": {}}
    cum, before = now["buckets"], base.get("buckets", {})
    if cum.get("+Inf", 0) < before.get("+Inf", 0):  # serving restarted since the baseline
        before = {}
    errors = now["errors"] - base.get("errors", 0)
    errors = now["errors"] if errors < 0 else errors
    deltas = sorted((float(le), c - before.get(le, 0)) for le, c in cum.items())
    answered = deltas[-1][1] if deltas else 0
    p99 = next((le for le, c in deltas if c >= 0.99 * answered), float("inf")) if answered \
        else 0.0
    return int(answered) + errors, errors, p99 * 1000.0


def _arm(variant: str, ctr: StreamCtr, counters: Mapping[str, Any] | None,
         baseline: Mapping[str, Any]) -> ArmHealth:
    requests, errors, p99 = health_since((counters or {}).get(variant), baseline.get(variant))
    return ArmHealth(requests, errors, p99, ctr.moments.get(variant, Moments(0)))


def look(d: defs.Definition, c: defs.Canary, metrics_text: str | None, bootstrap: str | None,
         topic: str, fallback_start: datetime, now: datetime) -> defs.Definition:
    """``d`` after one look at its ramping canary ``c`` (module docstring)."""
    since = c.step_started or d.start or fallback_start
    if bootstrap:
        ctr = read_ctr(bootstrap, d.name, since, now, topic=topic)
    else:
        log.warning("%s: no Kafka bootstrap: no CTR evidence, the canary holds", d.name)
        ctr = StreamCtr(complete=False)
    counters = serving_counters(metrics_text, d.name) if metrics_text else None
    if counters is None:
        log.warning("%s: no serving metrics, only the CTR guardrail applies", d.name)
    new = decide(c, d.guardrails, _arm(d.control, ctr, counters, c.baseline),
                 _arm(c.variant, ctr, counters, c.baseline), now=now, counters=counters,
                 evidence={"since": since.isoformat(), "stream": ctr.summary()})
    return d.with_canary(new)


def step_all(definitions_file: Path, metrics_text: str | None, bootstrap: str | None,
             topic: str = EVENTS_TOPIC, fallback_start: datetime | None = None,
             now: datetime | None = None) -> list[dict]:
    """Look once at every ramping canary; returns the history entries written."""
    now = now or datetime.now(UTC)
    out, changed = [], []
    for d in defs.load(definitions_file):
        if d.canary is not None and d.canary.status == defs.RAMPING:
            d = look(d, d.canary, metrics_text, bootstrap, topic, fallback_start or now, now)
            changed.append({"experiment": d.name, **d.canary.history[-1]})
        out.append(d)
    defs.save(definitions_file, out)
    return changed


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = interval_parser(__doc__)
    ap.add_argument("--metrics-url", default="", help="serving's /metrics (empty: none)")
    ap.add_argument("--bootstrap", default="",
                    help="Kafka bootstrap (empty: KAFKA_BOOTSTRAP_SERVERS; none: no CTR)")
    ap.add_argument("--topic", default=EVENTS_TOPIC, help="the events topic")
    args, paths, start, _ = parse(ap, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    text = None
    if args.metrics_url:
        if not args.metrics_url.startswith(("http://", "https://")):
            raise SystemExit(f"--metrics-url must be http(s): {args.metrics_url!r}")
        with urllib.request.urlopen(args.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
    changed = step_all(defs.definitions_path(paths), text, args.bootstrap or kafka_bootstrap(),
                       args.topic, fallback_start=start)
    print(json.dumps(changed, default=str))
    return changed


if __name__ == "__main__":
    main()
