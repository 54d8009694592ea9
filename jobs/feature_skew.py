"""The nightly skew gate: serve-time feature vectors against the training features.

extract: the feature log of ``[start, end)`` (``tandem.features.feature_log.read_logged``: what
    serving's ranker saw for a sampled share of its candidates, landed from Kafka), at most
``max_rows``. transform: for the same (user, item) at the same request time, the features the
    ranker's TRAINING path builds: the feature store's point-in-time join
    (``tandem.features.feature_store.training_frame``: user profile and activity, item content and
    popularity, and the session rows the feature consumer wrote to ``lake/features/session``),
    the genre cross and the request context (hour of ``ts``, device) -- the columns of
    :data:`COMPARED`. Retrieval scores and recency features depend on the night's indexes and
    the request's retrieval, which the log records but training cannot replay at an arbitrary
    time: they are listed as not compared. Per feature: PSI of the logged values against the
    training values (bins at and between the training values' deciles, NaN its own bin), the mean
    difference (logged minus training, rows where both are finite) and the row count.
load: ``<home>/reports/skew.json``: ``{"features": {name: {"psi", "mean_diff", "n"}}, "max_psi",
    "threshold", "passed", "rows", "not_compared"}``. ``passed`` is ``max_psi <= threshold``
    (``TANDEM_SKEW_THRESHOLD``, default 0.1); with fewer than ``min_rows`` logged rows nothing
    is judged (``"skipped"`` says why) and it passes. The command exits 1 when it did not pass:
    the nightly DAG's gate task fails, and the night's bundle is not registered.

Memory model: ``max_rows`` (200k) logged rows x ~60 features, in pandas ~2 KB a row while
parsing (0.4 GB), then float64 0.1 GB; the point-in-time join of 200k entity rows in DuckDB;
independent of the platform's traffic (the log is read file by file until the cap).

    python -m jobs.feature_skew --start 2026-01-01T00:00:00 --end 2026-01-02T00:00:00
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from tandem import schema as S
from tandem.config import Paths
from tandem.features import entity as F
from tandem.features import ranking_features as RF
from tandem.features.feature_log import read_logged
from tandem.ops.job_cli import interval_parser, parse

log = logging.getLogger(__name__)

THRESHOLD_SETTING = "TANDEM_SKEW_THRESHOLD"
CONFIG: dict[str, Any] = {"threshold": float(os.environ.get(THRESHOLD_SETTING, "0.1")),
                          "bins": 10, "max_rows": 200_000, "min_rows": 50}
CROSS, HOUR, DEVICE = "genre_affinity_cross", "ctx_hour", "ctx_device_code"
COMPARED: tuple[str, ...] = (*F.USER_FEATURES, *F.ITEM_FEATURES, *F.SESSION_FEATURES, CROSS,
                             HOUR, DEVICE)
EPS = 1e-4  # floor of a bin's share: an empty bin on one side must not give an infinite PSI


def training_features(store, logged: pd.DataFrame) -> pd.DataFrame:
    """The :data:`COMPARED` columns the training path builds for ``logged``'s rows."""
    from tandem.features.feature_store import training_frame, training_matrices

    ts = logged[S.TS].to_numpy(np.int64)
    entity_df = pd.DataFrame({S.USER_ID: logged[S.USER_ID].to_numpy(object),
                              S.ITEM_ID: logged[S.ITEM_ID].to_numpy(object),
                              S.EVENT_TIMESTAMP: pd.to_datetime(ts, unit="ms", utc=True)})
    users, items, session = training_matrices(training_frame(store, entity_df))
    cross = F.genre_affinity_cross(users[:, F.USER_AFFINITY_SLICE], items[:, F.ITEM_GENRE_SLICE])
    hour = ((ts // 3_600_000) % 24).astype(np.float32)
    device = RF.device_codes(logged["device"].to_numpy(object))
    values = np.hstack([users, items, session, cross[:, None], hour[:, None], device[:, None]])
    return pd.DataFrame(values.astype(np.float32), columns=list(COMPARED), index=logged.index)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Bins: each distinct decile (``bins`` quantiles) of the finite ``expected`` values is a bin
    of its own, and so is each open interval around them, plus one bin for NaN. A feature's
    deciles are often one value (a count that is 0 for most rows, a default): with half-open
    intervals ``[edge, next)`` a column that is constant in training and anything at or above
    that value in serving fell into the same bin, and PSI was 0 while every value differed.
    Each share is floored at :data:`EPS`. 0 = same distribution; > 0.1 is the usual
    "investigate", > 0.25 "shifted".
    """
    finite = expected[np.isfinite(expected)]
    edges = (np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))
             if len(finite) else np.zeros(0))

    def shares(x: np.ndarray) -> np.ndarray:
        nan = ~np.isfinite(x)
        # below edge k: bin 2k; equal to it: 2k + 1; above the last: 2 * len(edges)
        at = (np.searchsorted(edges, x[~nan], side="left")
              + np.searchsorted(edges, x[~nan], side="right"))
        counts = np.bincount(at, minlength=2 * len(edges) + 1)
        return np.maximum(np.r_[counts, nan.sum()] / max(len(x), 1), EPS)

    e, a = shares(expected), shares(actual)
    return float(np.sum((a - e) * np.log(a / e)))


def compare(logged: pd.DataFrame, training: pd.DataFrame, cfg: dict[str, Any]
            ) -> dict[str, Any]:
    """The report of per-feature PSI / mean difference / n over the shared columns."""
    features = {}
    for name in training.columns.intersection(logged.columns):
        served = logged[name].to_numpy(np.float64)
        trained = training[name].to_numpy(np.float64)
        both = np.isfinite(served) & np.isfinite(trained)
        diff = float(np.mean(served[both] - trained[both])) if both.any() else 0.0
        features[name] = {"psi": psi(trained, served, cfg["bins"]), "mean_diff": diff,
                          "n": int(len(served))}
    max_psi = max((f["psi"] for f in features.values()), default=0.0)
    report = {"features": features, "max_psi": max_psi, "threshold": cfg["threshold"],
              "passed": bool(max_psi <= cfg["threshold"]), "rows": int(len(logged))}
    if len(logged) < cfg["min_rows"]:
        report.update(passed=True, skipped=f"{len(logged)} logged rows < min_rows "
                                           f"{cfg['min_rows']}: nothing judged")
    return report


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        store=None, run_id: str | None = None) -> dict[str, Any]:
    """Compare the interval's logged vectors with the training features; write the report.

    ``spark`` and ``run_id`` are unused (common job signature). Deterministic for a given log,
    feature store and ``cfg``; a re-run overwrites the report.
    """
    cfg = {**CONFIG, **(cfg or {})}
    logged = read_logged(paths, start, end, cfg["max_rows"])
    names = [c for c in logged.columns if c not in ("request_id", S.USER_ID, S.ITEM_ID, S.TS,
                                                      "device")]
    if len(logged) >= cfg["min_rows"]:
        if store is None:
            from tandem.features.feature_store import open_store

            store = open_store(paths)
        training = training_features(store, logged)
    else:  # nothing is judged: no training rows are built and no column is compared (1..49
        # logged rows against an empty frame of COMPARED columns crashed the gate task)
        training = pd.DataFrame(index=logged.index)
    report = compare(logged, training, cfg)
    report["not_compared"] = sorted(set(names) - set(COMPARED))
    report["interval"] = [start.isoformat(), end.isoformat()]
    out = paths.skew_report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    log.info("feature skew [%s, %s): max PSI %.4f (threshold %.2f) over %d rows -> %s", start,
             end, report["max_psi"], report["threshold"], report["rows"], out)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__, "accepted for uniformity (the report is not per bundle)")
    args, paths, start, end = parse(ap, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run(None, paths, start, end, run_id=args.run_id)
    print(json.dumps({k: report.get(k) for k in ("max_psi", "threshold", "passed", "rows")}))
    if report.get("passed") is False:
        worst = sorted(report["features"].items(), key=lambda kv: -kv[1]["psi"])[:5]
        print(f"feature skew above {report['threshold']}: "
              + ", ".join(f"{n} PSI {v['psi']:.3f}" for n, v in worst), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
