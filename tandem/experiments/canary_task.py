"""The ``canary`` task of ``tandem_experiments``: one look per run at every ramping canary.

``python -m tandem.experiments.canary_task --start ISO --end ISO [--home DIR] [--reports DIR]
[--metrics-url=URL]``. For each experiment with a ramping canary it reads

* CTR: the per-user moments of the canary and the control from the experiment's report
  (``reports/experiment_<name>.json``, written by ``experiment_report`` just before);
* error rate and p99 latency per variant: serving's Prometheus endpoint
  (``tandem_variant_seconds`` histogram, ``tandem_variant_errors_total``; cumulative since the
  serving process started). Without a URL only the CTR guardrail applies (logged).

then :func:`tandem.experiments.canary.decide` and saves the new ramp state into the definitions
file; serving applies it at its next poll. Idempotent per look only in the sense that matters:
a re-run at the same step decides again from the same report.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tandem.experiments import definitions as defs
from tandem.experiments.canary import ArmHealth, decide
from tandem.experiments.stats import Moments
from tandem.job_cli import interval_parser, parse

log = logging.getLogger(__name__)
LATENCY, ERRORS = "tandem_variant_seconds", "tandem_variant_errors"


def serving_health(text: str, experiment: str) -> dict[str, tuple[int, int, float]]:
    """Per variant (requests, errors, p99 ms) from a Prometheus exposition ``text``: p99 is the
    upper edge of the first histogram bucket holding 99% of the requests."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("experiment") != experiment:
                continue
            variant = sample.labels.get("variant", "")
            if sample.name == f"{LATENCY}_bucket":
                buckets.setdefault(variant, []).append((float(sample.labels["le"]),
                                                        sample.value))
            elif sample.name == f"{ERRORS}_total":
                errors[variant] = int(sample.value)
    out = {}
    for variant, pts in buckets.items():
        pts.sort()
        total = pts[-1][1]
        p99 = next((le for le, c in pts if c >= 0.99 * total), float("inf")) if total else 0.0
        out[variant] = (int(total), errors.get(variant, 0), p99 * 1000.0)
    return out


def _arm(report: dict, variant: str, health: dict[str, tuple[int, int, float]]) -> ArmHealth:
    m = report["moments"].get(variant, {}).get("ctr", {"n": 0})
    requests, errors, p99 = health.get(variant, (0, 0, 0.0))
    return ArmHealth(requests, errors, p99, Moments(**m))


def step_all(definitions_file: Path, reports: Path, metrics_text: str | None) -> list[dict]:
    """Decide every ramping canary once; returns what changed."""
    found = defs.load(definitions_file)
    changed, out = [], []
    for d in found:
        c = d.canary
        report_file = reports / f"experiment_{d.name}.json"
        if c is None or c.status != defs.RAMPING or not report_file.exists():
            out.append(d)
            continue
        report = json.loads(report_file.read_text())
        health = serving_health(metrics_text, d.name) if metrics_text else {}
        if not health:
            log.warning("%s: no serving metrics, only the CTR guardrail applies", d.name)
        new = decide(c, d.guardrails, _arm(report, d.control, health),
                     _arm(report, c.variant, health))
        changed.append({"experiment": d.name, **new.history[-1]})
        out.append(d.with_canary(new))
    defs.save(definitions_file, out)
    return changed


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = interval_parser(__doc__)
    ap.add_argument("--reports", type=Path, default=None, help="experiment reports folder")
    ap.add_argument("--metrics-url", default="", help="serving's /metrics (empty: none)")
    args, paths, _, _ = parse(ap, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    text = None
    if args.metrics_url:
        if not args.metrics_url.startswith(("http://", "https://")):
            raise SystemExit(f"--metrics-url must be http(s): {args.metrics_url!r}")
        with urllib.request.urlopen(args.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
    changed = step_all(defs.definitions_path(paths), args.reports or defs.reports_dir(), text)
    print(json.dumps(changed, default=str))
    return changed


if __name__ == "__main__":
    main()
