"""Train the LightGBM lambdarank ranker on the candidates the night's models really retrieve.

For the interval [start, end) with ``cut = end - label window`` (``label_days`` when set, else
``label_fraction`` of the interval) -- the request time:

extract: the run's int-coded training table (``tandem.data.lake.TrainingTable``) and the night's
    bundle: ALS item factors, two-tower user tower and item vectors, their ANN indexes. No model
    is refit here (``tandem.evaluation.night``: each model is fitted once a night).
transform:
    1. request users: users with a pair first engaged positively in [cut, end), the ranker's
       half of them (the evaluation scores the other half), a seeded sample of at most
       ``max_users`` (``tandem.evaluation.night.NIGHT_CONFIG``);
    2. their candidates at ``cut``: each source retrieves through its index from the user's
       pre-cut pairs (ALS user vectors folded in from them, the user tower and the sequence
       model over the query history at ``cut``, ``tandem.features.query_history``: the last distinct
       engaged items, what serving's session row holds; popularity before ``cut``), seen items
       dropped -- ALS top-``als_k``, two-tower
       top-``two_tower_k``, popular top-``popular_k``; a candidate is labelled 1 when it is one
       of the user's label pairs or labelled 1 in ``lake/labels/ranking`` (``build_labels``:
       impressions with their outcome, ratings where there are no impressions);
    3. rows: groups with a positive; in them every positive, every explicit negative (label 0
       in ``lake/labels/ranking``: shown but not engaged, rated low; or a row of
       ``lake/negatives/ranking``, ``negative_sampling``) and a ``ranker_negative_rate`` sample
       of the other candidates (:func:`tandem.models.ranker.training_rows`);
    4. each request at its own time: the user's first labelled row after ``cut`` (its ts and
       ``ctx_device``), so the hour and device features and the point-in-time entity and session
       features (``lake/features/session``, written by the feature consumer) vary as in the
       events; a user without such a row is asked at ``cut``, device unknown;
    5. features through :func:`tandem.features.ranking_features.build_features` -- the function
       serving calls -- with the bundle's ALS unit vectors and top-K co-occurrence (the arrays
       serving loads); entity features from the feature store's point-in-time join as of ``cut``
       (``tandem.features.feature_store.training_frame``), or with ``feature_source="history"``
       computed in-process (``tandem.evaluation.protocol``) from the request users' pre-cut events
       and, for the item features, every pre-cut event's item columns in numpy; ``"feast"`` falls
       back to ``"history"`` with a warning when no Feast repo is applied.
load, into the run's bundle ``<models>/<run_id>``: ``ranker/model.txt`` (LightGBM),
    ``ranker/cooc.npz`` (the table's top-K co-occurrence, computed in Spark, as an items x items
    CSR in catalog order), ``features.json`` and ``ranker/meta.json``.

Memory model at 5M users x 1M items x 50M events: the table's pair columns (~30M pairs x 44 B =
1.3 GB), the candidates of ``max_users`` (20k) users x ~700 = 14M rows (ids and source scores,
~0.5 GB), features only for the kept rows (~30% + explicit negatives: ~4M x ~50 x 4 B = 0.8 GB),
the request users' label and negative rows after ``cut`` (20k x ~200 x 120 B = 0.5 GB),
their pre-cut events in pandas (20k x ~100 x 400 B = 0.8 GB), the cooc CSR 1M x 100 x 8 B =
0.8 GB: ~5 GB peak; with ``feature_source="history"`` also the pre-cut events' item columns in
numpy (50M x 56 B = 2.8 GB, ``tandem.data.lake.read_item_events``); every read is checked against
``TANDEM_DRIVER_BUDGET_MB`` and the cap ``max_users`` is the knob.

    python -m jobs.train_ranker --start 2026-01-01T00:00:00 --end 2026-01-02T00:00:00 \
        --run-id 20260102
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import epoch_ms
from tandem.evaluation import night as N
from tandem.evaluation import protocol as E
from tandem.evaluation import requests as EQ
from tandem.evaluation import tuning
from tandem.features import entity as FT
from tandem.features import ranking_features as RF
from tandem.models import als as A
from tandem.models import ranker as R
from tandem.models.bundle import FEATURE_SPEC, RANKER_COOC, RANKER_MODEL, TT_ITEM_VECTORS
from tandem.ops.job_cli import name_arg

log = logging.getLogger(__name__)

CONFIG: dict[str, Any] = {**E.EVAL_CONFIG, **N.CUT_CONFIG, "feature_source": "feast"}


def feast_applied(paths: Paths) -> bool:
    """Whether ``tandem.features.feature_store.apply`` has registered a repo under
    ``paths.feast``."""
    return (paths.feast / "feature_store.yaml").exists() and (paths.feast / "registry.db").exists()


def training_set(batch: N.Batch, lake: N.LakeLabels, cfg: dict[str, Any], store=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [n, F], labels [n], group keys [n]) of the ranker's request users.

    Rows are the candidates the night's models retrieve; a row is positive when its pair is a
    label pair of the table or labelled 1 in ``lake/labels/ranking``; explicit negatives (label
    0 there, or in ``lake/negatives/ranking``) are all kept, the other negatives sampled
    (:func:`tandem.models.ranker.training_rows`). Features are built for the kept rows only.
    """
    y = batch.labels | N.pair_mask(batch.cands, lake.positive)
    explicit = N.pair_mask(batch.cands, lake.negative)
    groups = batch.cands["user_row"].to_numpy()
    keep = R.training_rows(y, explicit, groups, cfg["ranker_negative_rate"],
                           cfg["ranker"]["random_state"])
    cands = batch.cands[keep].reset_index(drop=True)
    if cfg["feature_source"] == "history":
        X = EQ.feature_matrix(batch.fitted, batch.catalog, batch.requests, cands, cfg)
    else:
        X = EQ.store_feature_matrix(store, batch.fitted, batch.catalog, batch.requests, cands)
    return X, y[keep].astype(np.int32), groups[keep]


def feature_spec() -> dict[str, Any]:
    """``features.json``: the ranker's input columns in order and the raw fields' defaults."""
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in FT.DEFAULTS.items()}
    return {"names": list(RF.FEATURE_NAMES), "defaults": defaults}


def load(model, cooc: sp.csr_matrix, bundle_dir: Path, counts: dict[str, Any]) -> None:
    """Write the model, the co-occurrence matrix, the feature spec and counts (overwrites)."""
    R.save(model, bundle_dir / RANKER_MODEL)
    sp.save_npz(bundle_dir / RANKER_COOC, cooc.tocsr())
    (bundle_dir / FEATURE_SPEC).write_text(json.dumps(feature_spec(), indent=2))
    (bundle_dir / RANKER_MODEL).with_name("meta.json").write_text(json.dumps(counts, indent=2))


def _store_for(paths: Paths, cfg: dict[str, Any], store):
    """(feature source actually used, store): ``feast`` needs an applied repo, else history."""
    if cfg["feature_source"] != "feast" or store is not None:
        return cfg["feature_source"], store
    if not feast_applied(paths):
        log.warning("no Feast repo applied under %s: ranker features come from the event "
                    "history instead (feature_source=history)", paths.feast)
        return "history", None
    from tandem.features.feature_store import open_store

    return "feast", open_store(paths)


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        store=None, run_id: str | None = None) -> dict[str, Any]:
    """Train on [start, end) (labels from the window's tail) into the run's bundle.

    ``spark`` is unused (common job signature). Returns row/group/label counts and the feature
    source used. Deterministic for a given lake, interval and ``cfg``; re-runs overwrite.
    The night's tuned ALS (fold-in) and ranker parameters (``tandem.evaluation.tuning``; on a study
    night the ranker's study runs here, on these rows) overlay the defaults; ``cfg`` overrides both.
    """
    explicit = cfg or {}
    cfg = {**CONFIG, **explicit}
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    source, store = _store_for(paths, cfg, store)
    cfg["feature_source"] = source
    cut_ms = epoch_ms(N.label_cut(start, end, cfg))
    bundle_dir = run_bundle_dir(paths, end, run_id)
    cfg["als"] = tuning.overlay(A.ALS_CONFIG, bundle_dir, tuning.ALS, explicit.get("als"))
    if not (bundle_dir / TT_ITEM_VECTORS).exists():
        cfg["two_tower"] = None  # serve-time features must match: no two-tower, no such source
    batch = N.prepare(paths, bundle_dir, start, end, cut_ms, N.RANKER, cfg,
                      item_events=source == "history")
    lake = N.ask_at_labels(paths, batch, cut_ms, epoch_ms(end))
    X, y, groups = training_set(batch, lake, cfg, store)
    if not len(y):
        raise ValueError(f"no positive labels in [{pd.Timestamp(cut_ms, unit='ms')}, {end}): "
                         "the ranker has nothing to learn from")
    tuned = tuning.tune_ranker(bundle_dir, X, y, groups, cfg["ranker"])
    cfg["ranker"] = {**cfg["ranker"], **tuned, **explicit.get("ranker", {})}
    model = R.train_ranker(X, y, groups, cfg["ranker"])
    shown_negative = N.pair_mask(batch.cands, lake.negative)
    counts = {"rows": len(y), "groups": int(len(np.unique(groups))),
              "positives": int(y.sum()),
              "explicit_negative_candidates": int(shown_negative.sum()),
              "requests_at_label_time": int(len(lake.first)),
              "distinct_hours": int(len(np.unique(batch.requests.now_ms // 3_600_000))),
              "request_users": len(batch.req.user_rows),
              "history_pairs": batch.req.n_history_pairs,
              "label_pairs": batch.req.n_label_pairs,
              "request_history_events": int(len(batch.fitted.history)),
              "item_events": int(len(batch.fitted.item_events or ())),
              "feature_source": source, "bundle_dir": str(bundle_dir)}
    load(model, batch.fitted.space.cooc, bundle_dir, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the LightGBM ranker on lake events")
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", required=True, type=datetime.fromisoformat)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--master", default=None, help="accepted for uniformity; no Spark is used")
    parser.add_argument("--run-id", "--run", dest="run_id", type=name_arg, default=None,
                        help="bundle directory name under models/ (default: end date, YYYYMMDD)")
    parser.add_argument("--feature-source", choices=("feast", "history"), default="feast")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    print(json.dumps(run(None, paths, args.start, args.end,
                         {"feature_source": args.feature_source}, run_id=args.run_id)))


if __name__ == "__main__":
    main()
