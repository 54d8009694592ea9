"""The readout of every experiment in the definitions file: per variant per day, significance,
sample-ratio check and a sequential guard; ``reports/experiment_<name>.json`` + ``.html``.

Inputs: lake impressions carrying ``experiment``/``variant`` (serving logs them) and the
engagements with the same ``request_id`` and ``item_id`` (attributed when they happen within
``attribution_window`` of the impression); the catalog's genres for diversity.

One run over ``[start, end)`` (the daily DAG: one day) does two things:

1. Aggregates the interval — only the interval — per (experiment, variant, user, day) into
   ``lake/experiments/user_day`` (requests, impressions, clicks, conversions = impressions with a
   ``conversion_event``, dwell, the sum of per-request diversity = distinct primary genres /
   slate size) and per (experiment, variant, day) into ``lake/experiments/variant_day`` (plus the
   distinct items shown: coverage = distinct / catalog size). Both replace the interval's
   partitions, so re-runs are idempotent.
2. For each experiment active in the interval, re-reads its compact ``user_day`` rows since the
   experiment started, sums them per user (the unit of randomization) and reduces them per
   variant to sufficient statistics (:class:`tandem.experiments.stats.Moments`). The statistics
   run on the driver over those few rows: CTR (delta method), conversion (users with one, two-
   proportion z), dwell and diversity per user (Welch), SRM chi-square against the configured
   weights, and the always-valid p-value of the primary metric over the daily looks so far
   (mSPRT, looks kept in ``lake/experiments/looks/<name>.json``, replaced per end date).

Memory model (platform: 5M users, 50M events/day): step 1 reads one day of events plus the
attribution slack (~55M rows, the columns it needs), joins impressions to engagements on
(request, item) in a shuffle bounded by the day, broadcasts (item, primary genre) (~1M rows,
~30 MB) and writes <= 5M user rows per experiment a day. Step 2 reads users x days compact rows
(14 days x 5M = 70M rows of 9 numbers) and shuffles them by user; the driver receives one row per
variant and one per variant and day. Nothing else is collected.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

from tandem import schema as s
from tandem.config import Paths
from tandem.experiments import definitions as defs
from tandem.experiments import stats
from tandem.models.tracking import metric_key, start_run
from tandem.spark.entry import job_main
from tandem.spark.events import read_events
from tandem.spark.io import day_starts, epoch_ms, overwrite_interval, read_table, utc

log = logging.getLogger(__name__)
COUNTS = ("requests", "impressions", "clicks", "conversions", "dwell_ms", "diversity")
USER_DAY = StructType([StructField(c, StringType()) for c in
                       ("experiment", s.VARIANT, s.USER_ID)]
                      + [StructField(c, DoubleType()) for c in COUNTS]
                      + [StructField(s.DATE, StringType())])
VARIANT_DAY = StructType([StructField(c, StringType()) for c in ("experiment", s.VARIANT)]
                         + [StructField(c, DoubleType()) for c in ("users", *COUNTS)]
                         + [StructField("distinct_items", LongType()),
                            StructField(s.DATE, StringType())])


@dataclass(frozen=True)
class ReportConfig:
    """Knobs of :func:`run`: where reports go and how engagements are attributed."""

    out_dir: Path = field(default_factory=defs.reports_dir)
    attribution_window: timedelta = defs.ATTRIBUTION_WINDOW  # shared with the canary's stream read
    alpha: float = 0.05


def _lake(paths: Paths) -> Path:
    return paths.lake / "experiments"


def impression_rows(events: DataFrame, start_ms: int, end_ms: int,
                    conversion: dict[str, str], window_ms: int) -> DataFrame:
    """One row per experiment impression with ``start_ms <= ts < end_ms``: its (experiment,
    variant, user, request, item, ts) and attributed ``clicked``, ``converted`` (the
    experiment's ``conversion`` event type) and ``dwell`` (longest play/complete)."""
    etype = F.col(s.EVENT_TYPE)
    keys = ["experiment", s.VARIANT, s.USER_ID, s.REQUEST_ID, s.ITEM_ID, s.TS]
    imp = events.where((etype == s.IMPRESSION) & F.col(s.EXPERIMENT).isin(list(conversion))
                       & (F.col(s.TS) >= start_ms) & (F.col(s.TS) < end_ms)).select(
        F.col(s.EXPERIMENT).alias("experiment"), *keys[1:]).dropDuplicates(keys[:5])
    eng = events.where((etype != s.IMPRESSION) & F.col(s.REQUEST_ID).isNotNull()).select(
        s.REQUEST_ID, s.ITEM_ID, F.col(s.TS).alias("eng_ts"), s.EVENT_TYPE, s.DWELL_MS)
    conv = F.create_map(*[F.lit(x) for kv in conversion.items() for x in kv])
    attributed = imp.join(eng, [s.REQUEST_ID, s.ITEM_ID]).where(
        (F.col("eng_ts") >= F.col(s.TS)) & (F.col("eng_ts") <= F.col(s.TS) + window_ms)
    ).groupBy(*keys).agg(
        F.max((etype == s.CLICK).cast("int")).alias("clicked"),
        F.max((etype == F.element_at(conv, F.col("experiment"))).cast("int"))
        .alias("converted"),
        F.max(F.when(etype.isin(s.PLAY, s.COMPLETE), F.col(s.DWELL_MS))).alias("dwell"))
    return imp.join(attributed, keys, "left").select(
        *keys, *[F.coalesce(F.col(c), F.lit(0)).cast("double").alias(c)
                 for c in ("clicked", "converted", "dwell")])


def aggregate_day(imps: DataFrame, genres: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(user_day, variant_day) rows of the interval's impressions (module docstring)."""
    day = F.date_format(F.date_from_unix_date(F.floor(F.col(s.TS) / 86_400_000).cast("int")),
                        "yyyy-MM-dd").alias(s.DATE)
    shown = imps.select("*", day).join(F.broadcast(genres), s.ITEM_ID, "left")
    per_request = shown.groupBy("experiment", s.VARIANT, s.USER_ID, s.DATE, s.REQUEST_ID).agg(
        F.count("*").alias("impressions"), F.sum("clicked").alias("clicks"),
        F.sum("converted").alias("conversions"), F.sum("dwell").alias("dwell_ms"),
        (F.countDistinct("genre") / F.count("*")).alias("diversity"))
    user_day = per_request.groupBy("experiment", s.VARIANT, s.USER_ID, s.DATE).agg(
        F.count("*").cast("double").alias("requests"),
        *[F.sum(c).cast("double").alias(c) for c in COUNTS[1:]])
    sums = user_day.groupBy("experiment", s.VARIANT, s.DATE).agg(
        F.count("*").cast("double").alias("users"), *[F.sum(c).alias(c) for c in COUNTS])
    items = shown.groupBy("experiment", s.VARIANT, s.DATE).agg(
        F.countDistinct(s.ITEM_ID).alias("distinct_items"))
    variant_day = sums.join(items, ["experiment", s.VARIANT, s.DATE])
    return (user_day.select(*USER_DAY.names), variant_day.select(*VARIANT_DAY.names))


def variant_moments(user_day: DataFrame) -> dict[str, dict[str, stats.Moments | int]]:
    """Per variant, over users summed across days: CTR moments (x impressions, y clicks), dwell
    and diversity moments (y per user), and the users with a conversion."""
    users = user_day.groupBy(s.VARIANT, s.USER_ID).agg(*[F.sum(c).alias(c) for c in COUNTS])
    div = F.col("diversity") / F.col("requests")
    rows = users.groupBy(s.VARIANT).agg(
        F.count("*").alias("n"), F.sum("impressions").alias("sx"), F.sum("clicks").alias("sy"),
        F.sum(F.col("impressions") ** 2).alias("sxx"), F.sum(F.col("clicks") ** 2).alias("syy"),
        F.sum(F.col("impressions") * F.col("clicks")).alias("sxy"),
        F.sum("dwell_ms").alias("dwell"), F.sum(F.col("dwell_ms") ** 2).alias("dwell2"),
        F.sum(div).alias("div"), F.sum(div ** 2).alias("div2"),
        F.sum((F.col("conversions") > 0).cast("long")).alias("converted")).collect()
    return {r[s.VARIANT]: {
        "ctr": stats.Moments(r["n"], r["sx"], r["sy"], r["sxx"], r["syy"], r["sxy"]),
        "dwell": stats.Moments(r["n"], sy=r["dwell"], syy=r["dwell2"]),
        "diversity": stats.Moments(r["n"], sy=r["div"], syy=r["div2"]),
        "converted": int(r["converted"])} for r in rows}


def compare(d: defs.Definition, moments: dict[str, dict[str, Any]], alpha: float
            ) -> dict[str, Any]:
    """Every metric of every served variant with data against the control (a canary too, even
    rolled back or ramping: the interval saw its traffic), plus the SRM check.

    The SRM check runs over the variants whose share is fixed: a canary's share moved with its
    ramp during the interval (and a user can cross from control to the canary when a step
    widens it), so its count has no single expected share; the others keep their configured
    ratio among themselves at every step, and that ratio is what is tested."""
    weights = d.configured_weights
    present = [v for v in weights if v in moments]
    ramped = d.canary.variant if d.canary is not None else None
    fixed = [v for v in present if v != ramped]
    total = sum(weights[v] for v in fixed)
    chi2, p_srm = stats.srm([moments[v]["ctr"].n for v in fixed],
                            [weights[v] / total for v in fixed]) if len(fixed) > 1 else (0.0, 1.0)
    out: dict[str, Any] = {"srm": {"chi2": chi2, "p_value": p_srm, "mismatch": p_srm < 0.001,
                                   "users": {v: moments[v]["ctr"].n for v in present},
                                   "expected_share": {v: weights[v] / total for v in fixed},
                                   "excluded": [] if ramped not in present else [ramped]},
                           "comparisons": {}}
    c = moments.get(d.control)
    for v in present:
        if v == d.control or c is None:
            continue
        t = moments[v]
        out["comparisons"][v] = {
            "ctr": stats.delta_ratio(c["ctr"], t["ctr"], alpha).to_dict(),
            "conversion": stats.two_proportion_z(c["converted"], c["ctr"].n, t["converted"],
                                                 t["ctr"].n, alpha).to_dict(),
            "dwell_ms": stats.welch(c["dwell"], t["dwell"], alpha).to_dict(),
            "diversity": stats.welch(c["diversity"], t["diversity"], alpha).to_dict()}
    return out


def _looks(paths: Paths, d: defs.Definition, end: datetime, result: dict[str, Any],
           alpha: float) -> dict[str, Any]:
    """Record today's look at the primary metric and return the always-valid verdicts."""
    path = _lake(paths) / "looks" / f"{d.name}.json"
    looks = json.loads(path.read_text()) if path.exists() else {}
    verdicts = {}
    for variant, metrics in result["comparisons"].items():
        m = metrics[d.primary_metric]
        per = looks.setdefault(variant, {})
        per[end.isoformat()] = [m["diff"], m["std_error"] ** 2]
        tau = abs(d.mde_relative * m["control"]) or 1e-9
        p = stats.always_valid_p([tuple(per[k]) for k in sorted(per)], tau)
        verdicts[variant] = {"metric": d.primary_metric, "looks": len(per),
                             "always_valid_p": p, "significant": p < alpha,
                             "method": "mSPRT, normal mixture tau = mde_relative x control"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(looks, indent=1, sort_keys=True))
    return verdicts


def _daily(rows: list, n_items: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r[s.VARIANT], r[s.DATE])):
        imps = r["impressions"] or 0.0
        out.setdefault(r[s.VARIANT], []).append({
            "date": r[s.DATE], "users": int(r["users"]), "impressions": int(imps),
            "ctr": r["clicks"] / imps if imps else None,
            "conversion_per_impression": r["conversions"] / imps if imps else None,
            "dwell_ms_per_user": r["dwell_ms"] / r["users"],
            "diversity": r["diversity"] / r["requests"],
            "coverage": r["distinct_items"] / n_items if n_items else None})
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``experiment_<name>.json`` and a one-page ``.html`` a product person can read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["experiment"]
    jpath, hpath = out_dir / f"experiment_{name}.json", out_dir / f"experiment_{name}.html"
    jpath.write_text(json.dumps(report, indent=2, default=str))
    rows = []
    for variant, metrics in report["comparisons"].items():
        verdict = report["sequential"][variant]
        for metric, c in metrics.items():
            rows.append(f"<tr><td>{html.escape(variant)}</td><td>{metric}</td>"
                        f"<td>{c['control']:.4g}</td><td>{c['treatment']:.4g}</td>"
                        f"<td>{c['relative']:+.2%}</td><td>[{c['ci_low']:.4g}, "
                        f"{c['ci_high']:.4g}]</td><td>{c['p_value']:.3g}</td></tr>")
        rows.append(f"<tr><td colspan=7><b>{html.escape(variant)}</b>: "
                    f"{verdict['metric']} always-valid p = {verdict['always_valid_p']:.3g} "
                    f"after {verdict['looks']} look(s): "
                    f"{'SIGNIFICANT' if verdict['significant'] else 'not significant yet'}"
                    "</td></tr>")
    srm = report["srm"]
    hpath.write_text(
        f"<html><head><meta charset='utf-8'><title>Experiment {html.escape(name)}</title>"
        "</head><body>"
        f"<h1>Experiment {html.escape(name)}</h1><p>{report['start']} to {report['end']}; "
        f"users per variant {srm['users']}; sample ratio "
        f"{'MISMATCH: do not trust the results' if srm['mismatch'] else 'ok'} "
        f"(p = {srm['p_value']:.3g}).</p><table border=1 cellpadding=4><tr><th>variant</th>"
        "<th>metric</th><th>control</th><th>variant</th><th>change</th><th>95% CI of the "
        "difference</th><th>p</th></tr>" + "".join(rows) + "</table></body></html>")
    return jpath, hpath


def run(spark: SparkSession, paths: Paths, start: datetime, end: datetime,
        cfg: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Aggregate ``[start, end)`` (whole days) and report every experiment active in it."""
    start, end = utc(start), utc(end)
    day_starts(start, end)  # whole days only
    found = [d for d in defs.load(defs.definitions_path(paths))
             if (d.start is None or d.start < end) and (d.end is None or d.end > start)]
    if not found:
        log.info("experiment_report: no experiment overlaps [%s, %s)", start, end)
        return {"experiments": 0}
    window = cfg.attribution_window
    events = read_events(spark, paths, start, end + window, slack=timedelta(hours=1))
    imps = impression_rows(events, epoch_ms(start), epoch_ms(end),
                           {d.name: d.conversion_event for d in found},
                           int(window.total_seconds() * 1000))
    catalog = spark.read.parquet(str(paths.items))
    genres = catalog.select(s.ITEM_ID, F.element_at(s.GENRES, 1).alias("genre"))
    n_items = catalog.count()
    user_day, variant_day = aggregate_day(imps, genres)
    overwrite_interval(user_day, _lake(paths) / "user_day", start, end, hourly=False,
                       sort_by=["experiment", s.VARIANT, s.USER_ID])
    overwrite_interval(variant_day, _lake(paths) / "variant_day", start, end, hourly=False)
    counts: dict[str, Any] = {"experiments": len(found), "reports": {}}
    for d in found:
        since = d.start or start
        ud = read_table(spark, _lake(paths) / "user_day", USER_DAY, since, end, hourly=False)
        moments = variant_moments(ud.where(F.col("experiment") == d.name))
        result = compare(d, moments, cfg.alpha)
        vd = read_table(spark, _lake(paths) / "variant_day", VARIANT_DAY, since, end,
                        hourly=False).where(F.col("experiment") == d.name).collect()
        report = {"experiment": d.name, "start": since.isoformat(), "end": end.isoformat(),
                  "control": d.control, "primary_metric": d.primary_metric, "alpha": cfg.alpha,
                  **result, "sequential": _looks(paths, d, end, result, cfg.alpha),
                  "daily": _daily(vd, n_items),
                  "moments": {v: {k: (vars(m) if isinstance(m, stats.Moments) else m)
                                  for k, m in per.items()} for v, per in moments.items()},
                  "canary": d.to_dict().get("canary")}
        jpath, hpath = write_report(report, cfg.out_dir)
        _track(d, report, jpath, hpath)
        counts["reports"][d.name] = str(jpath)
    return counts


def _track(d: defs.Definition, report: dict[str, Any], *artifacts: Path) -> None:
    """Log the readout to MLflow (no-op without a tracking URI)."""
    metrics = {"srm_p_value": report["srm"]["p_value"]}
    for variant, per in report["comparisons"].items():
        for metric, c in per.items():
            for key in ("relative", "p_value"):
                metrics[metric_key(f"{variant}.{metric}.{key}")] = c[key]
        metrics[metric_key(f"{variant}.always_valid_p")] = (
            report["sequential"][variant]["always_valid_p"])
    with start_run("experiment_report", {"experiment": d.name, "start": report["start"],
                                         "end": report["end"]}) as tracked:
        tracked.log_metrics(metrics)
        for path in artifacts:
            tracked.log_artifact(path, "experiments")


if __name__ == "__main__":
    job_main("experiment_report", run, ReportConfig())
