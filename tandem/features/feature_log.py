"""Serve-time feature logging: what the ranker saw, for a sampled share of ranked candidates.

Serving samples ``share`` of the candidates it ranks (:func:`sample`: a seeded draw per request,
so one request's sample is reproducible) and hands their input rows -- the very array the
ranker scored -- to the impression sink with the feed (``tandem.data.impressions.Feed.logged``).
A request whose online-store read failed or missed its deadline logs none: it ranked on default
user and session features, which says how the store did (``tandem_fallbacks_total``), not
whether serving and training define a feature alike; in the first ``make demo`` with a skew
step, 3 such requests of 65 on a busy machine were the only rows that still differed.
The Kafka impression logger turns them into ``feature_log.v1`` records (``schemas/``) on
:data:`FEATURE_LOG_TOPIC`; the landing consumer (``--kind feature_log``) lands them as JSON lines
under :func:`landing_dir` by arrival hour, as it lands events; ``jobs/feature_skew.py`` reads them
back (:func:`read_logged`) and compares them with the training features of the same entities and
times.

A record names its features (``{name: value}``, null for NaN), so a bundle that adds a column
logs it without a contract change, and the skew job compares by name.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tandem import schema as s
from tandem.config import Paths, within_driver_budget
from tandem.data.impressions import FeatureSample, Feed
from tandem.validation import validate

FEATURE_LOG_TOPIC = "tandem.feature_log.v1"
CONTRACT = "feature_log"
FEATURES = "features"
LOGGED_ROW_BYTES = 2_000  # one landed record in pandas: ids, ~60 named values


def sample(request_id: str, item_ids: np.ndarray, rows: np.ndarray, features: np.ndarray,
           names: Sequence[str], share: float, ts: int, device: str | None
           ) -> FeatureSample | None:
    """``share`` of the ranked candidates (catalog ``rows`` [n] of ``item_ids``, their ranker
    rows ``features`` [n, F]), drawn by a generator seeded with the request id (reproducible
    per request): a binomial count, then that many distinct candidates. None when none is
    drawn. The hot path pays a generator and copies only the drawn rows."""
    n = len(rows)
    if share <= 0.0 or n == 0:
        return None
    rng = np.random.default_rng(zlib.crc32(request_id.encode()))
    m = rng.binomial(n, min(share, 1.0))
    if m == 0:
        return None
    drawn = np.sort(rng.choice(n, size=m, replace=False))
    return FeatureSample(item_ids[rows[drawn]].tolist(), names, features[drawn], int(ts),
                         device)


def records(feed: Feed) -> list[dict[str, Any]]:
    """``feature_log.v1`` records of ``feed.logged`` (NaN -> null: JSON has no NaN)."""
    sample = feed.logged
    if sample is None:
        return []
    values = sample.values.astype(np.float64)
    cells = np.where(np.isnan(values), None, values).tolist()
    return [{"request_id": feed.request_id, s.USER_ID: feed.user_id, s.ITEM_ID: item,
             s.TS: int(sample.ts), "device": sample.device, s.MODEL_VERSION: feed.model_version,
             FEATURES: dict(zip(sample.names, row, strict=True))}
            for item, row in zip(sample.item_ids, cells, strict=True)]


def validate_record(record: Any, reference_ms: int | None = None) -> None:
    """Check a record against ``schemas/feature_log.v1`` (the landing consumer's validator);
    raises ``ContractError``. ``reference_ms`` is unused: a request time is never future."""
    validate(record, CONTRACT)


def landing_dir(paths: Paths) -> Path:
    """``landing/feature_log/date=/hour=/*.jsonl``, by arrival hour."""
    return paths.root / "landing" / "feature_log"


def read_logged(paths: Paths, start: datetime, end: datetime, max_rows: int,
                lateness: timedelta = timedelta(hours=2)) -> pd.DataFrame:
    """Logged rows with ``start <= ts < end``: one row per (request, item), columns
    ``request_id, user_id, item_id, ts, device`` and one per feature name.

    The landed files of the arrival hours ``[start, end + lateness)`` are read in a seeded
    random order until ``max_rows`` records are in: memory is bounded by ``max_rows`` plus one
    micro-batch file, whatever the day's volume, and the sample spans the whole interval.
    """
    root = landing_dir(paths)
    hours = pd.date_range(pd.Timestamp(start).floor("h"), pd.Timestamp(end + lateness),
                          freq="h", inclusive="left")
    files = [f for h in hours
             for f in sorted((root / f"date={h:%Y-%m-%d}" / f"hour={h:%H}").glob("*.jsonl"))]
    lo, hi = int(pd.Timestamp(start).value // 1_000_000), int(pd.Timestamp(end).value // 1_000_000)
    rows: list[dict[str, Any]] = []
    for k in np.random.default_rng(0).permutation(len(files)):
        if len(rows) >= max_rows:
            break
        rows += [r for r in map(json.loads, files[k].read_text().splitlines())
                 if lo <= r[s.TS] < hi]
    within_driver_budget(len(rows) * LOGGED_ROW_BYTES, "the sampled feature log")
    return logged_frame(rows[:max_rows])


def logged_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """``feature_log.v1`` records as :func:`read_logged` returns them: one row per (request,
    item) (a record landed twice counts once), a float64 column per feature name."""
    if not rows:
        return pd.DataFrame(columns=["request_id", s.USER_ID, s.ITEM_ID, s.TS, "device"])
    frame = pd.DataFrame(list(rows)).drop_duplicates(["request_id", s.ITEM_ID])
    frame = frame.reset_index(drop=True)
    features = pd.DataFrame(frame.pop(FEATURES).tolist(), index=frame.index).astype(np.float64)
    return pd.concat([frame.drop(columns=[s.MODEL_VERSION]), features], axis=1)
