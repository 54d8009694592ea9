"""``make demo``'s last step: the skew gate over the requests the demo just served.

``tandem_daily`` runs the gate (``jobs/feature_skew.py``) over the night's data interval: in the
demo that is MovieLens's 1997-98, before serving has answered anything, so the gate has no
logged rows and skips. Serving stamps a request with the wall clock (the demo sends no request
time); its sampled ranker rows (:mod:`tandem.features.feature_log`, 1 % of each ranked pool) go
through Kafka to the ``feature-log-landing`` consumer. The printed feeds and the burst log ~35
rows of 3 users, under the gate's ``min_rows``, so feeds for :data:`SAMPLE_USERS` more users
follow (~370 rows of ~60 users). Once every row serving handed to its producer (its
``tandem_feature_rows_logged_total``, read before the first request and after the last) is in
the lake, the module the DAG task runs is run as a command over the serving interval and its
report (``<home>/reports/skew.json``) printed: the top features by PSI, rows compared, passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from tandem.config import REPO_ROOT, Paths
from tandem.features.feature_log import read_logged
from tandem.ops import processes

LOGGED_METRIC = "tandem_feature_rows_logged_total"
LAND_TIMEOUT_S = 60.0
SHOWN = 10  # features in the printed table, highest PSI first
SAMPLE_USERS = tuple(str(u) for u in range(100, 160))  # MovieLens users, feeds not printed


def rows_logged(metrics_port: int) -> int:
    """Feature rows serving has handed to its Kafka producer since it started."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        families = text_string_to_metric_families(resp.read().decode())
        return int(sum(sample.value for family in families for sample in family.samples
                       if sample.name == LOGGED_METRIC))


def wait_landed(paths: Paths, start: datetime, end: datetime, expected: int,
                timeout_s: float = LAND_TIMEOUT_S) -> int:
    """Logged rows with a request time in ``[start, end)`` in the lake, polled until there are
    ``expected`` (or ``timeout_s`` passed: the caller reports the shortfall)."""
    deadline = time.monotonic() + timeout_s
    while True:
        landed = len(read_logged(paths, start, end, max_rows=max(expected, 1) * 2))
        if landed >= expected or time.monotonic() > deadline:
            return landed
        time.sleep(0.5)


def run_gate(paths: Paths, start: datetime, end: datetime, env: dict[str, str]
             ) -> tuple[dict, int, str]:
    """``python -m jobs.feature_skew`` over ``[start, end)`` (exit 1: above the threshold, or
    a crash); returns (the report it wrote for this interval, {} when none; its exit code; its
    stderr)."""
    done = subprocess.run([sys.executable, "-m", "jobs.feature_skew", "--home", str(paths.root),
                           "--start", start.isoformat(), "--end", end.isoformat()],
                          env=processes.child_env(env), cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)
    path = paths.skew_report
    report = json.loads(path.read_text()) if path.exists() else {}
    if report.get("interval") != [start.isoformat(), end.isoformat()]:
        report = {}  # an earlier run's report: this one crashed before writing its own
    return report, done.returncode, done.stderr


def skew_table(report: dict, shown: int = SHOWN) -> Table:
    """The report's ``shown`` highest-PSI features: PSI, mean difference (served - trained), n."""
    verdict = "[green]passed[/]" if report["passed"] else "[red]FAILED[/]"
    table = Table(title=f"feature skew, {report['rows']} logged rows vs the training path: max "
                        f"PSI {report['max_psi']:.4f} (threshold {report['threshold']}) {verdict}",
                  title_justify="left")
    for col in ("feature", "PSI", "mean diff", "n"):
        table.add_column(col, justify="left" if col == "feature" else "right")
    worst = sorted(report["features"].items(), key=lambda kv: -kv[1]["psi"])[:shown]
    for name, f in worst:
        table.add_row(name, f"{f['psi']:.4f}", f"{f['mean_diff']:+.4g}", str(f["n"]))
    return table


def check(console, paths: Paths, env: dict[str, str], metrics_port: int, served_from: datetime,
          rows_before: int, recommend: Callable[[str], object]) -> dict:
    """Ask ``recommend`` for :data:`SAMPLE_USERS`' feeds, wait for the serving interval's
    feature rows to land, run the gate over the interval and print its report."""
    t0 = time.monotonic()
    for user in SAMPLE_USERS:
        recommend(user)
    end = datetime.now(UTC)
    expected = rows_logged(metrics_port) - rows_before
    console.print(f"[bold cyan]>[/] feature skew: feeds for {len(SAMPLE_USERS)} more users "
                  f"(not printed); {expected} ranker rows serving logged since "
                  f"{served_from:%H:%M:%S} UTC, via Kafka to the feature-log-landing consumer")
    landed = wait_landed(paths, served_from, end, expected)
    if landed < expected:
        console.print(f"  [red]{landed} of {expected} logged rows landed[/] after "
                      f"{LAND_TIMEOUT_S:.0f} s; see {paths.run / 'feature-log-landing.log'}")
    report, code, stderr = run_gate(paths, served_from, end, env)
    if not report:
        console.print(f"  [red]python -m jobs.feature_skew exited {code}[/]: "
                      f"{stderr.strip()[-600:]}")
        return report
    if "skipped" in report:
        console.print(f"  skipped: {report['skipped']}")
    console.print(skew_table(report))
    console.print(f"  done in {time.monotonic() - t0:.1f}s ({landed} rows landed; report "
                  f"{paths.skew_report})")
    return report
