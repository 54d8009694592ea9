"""Serving with and without the session sequence model's bundle parts.

A small synthetic bundle (tandem.models.synthetic_bundle) gets a sequence model trained on walks
through the catalog (item i is followed by i + 1); a bundle without those parts, and an older
bundle whose ranker was trained without the sequence features, must still serve.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from serving.app import App, ItemFeatures, ServingConfig, UserRows
from serving.server import local_source
from serving.validation import RecommendQuery
from tandem.features import feature_log
from tandem.features import ranking_features as RF
from tandem.models import bundle as B
from tandem.models import ranker as R
from tandem.models import synthetic_bundle as S
from tandem.models.ann import build_index
from tandem.models.sequence_train import SequenceConfig, train_sequence

pytestmark = pytest.mark.serving

SPEC = S.SyntheticSpec(n_items=300, n_users=500, n_als_users=200, n_trees=10, num_leaves=7,
                       n_train_groups=50, group_size=20)
CFG = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=500.0,
                    rank_deadline_ms=5000.0)
SESSION = ["i12", "i11", "i10"]  # newest first: the user walked i10 -> i11 -> i12


class NoRows:
    """An online store with nothing for anyone (the request's session items are the history)."""

    def fetch(self, user_id: str) -> UserRows:
        return UserRows()


def _add_sequence(bundle) -> None:
    """Train the sequence model on walks i -> i + 1 and add its parts and index to ``bundle``."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, SPEC.n_items, 400)
    users = np.repeat(np.arange(400), 12)
    items = (np.repeat(starts, 12) + np.tile(np.arange(12), 400)) % SPEC.n_items
    ts = np.tile(np.arange(12), 400)
    model = train_sequence(users, items, ts, SPEC.n_items,
                           SequenceConfig(dim=16, max_len=10, epochs=20, lr=3e-3))
    model.export(bundle)
    build_index(model.item_vectors(), metric="mips").save(bundle / B.INDEX_SEQUENCE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq-serving")
    plain, features = S.build(root / "plain", SPEC)
    with_seq = root / "with_sequence"
    shutil.copytree(plain, with_seq)
    _add_sequence(with_seq)
    frame = pd.read_parquet(features)
    return {"plain": plain, "with_sequence": with_seq,
            "items": lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids))}


def _app(world, bundle) -> App:
    fetch, probe = local_source(bundle)
    return App(fetch, probe, None, CFG, NoRows(), item_features=world["items"])


def _session_query() -> RecommendQuery:
    return RecommendQuery("u999999", 10, "web", ts=S.NOW_MS, session_item_ids=tuple(SESSION))


def test_sequence_source_retrieves_the_next_items_and_feeds_the_ranker(world):
    app = _app(world, world["with_sequence"])
    engine = next(iter(app.engines.values()))
    assert engine.sequence is not None and engine.feature_columns is None
    history = engine.rows_of(SESSION)
    (name, rows, scores), = engine.sequence.lists(history, 5)
    assert name == "sequence" and len(rows) == 5 and np.all(np.diff(scores) <= 1e-6)
    assert engine.item_ids[rows[0]] == "i13"  # the walk's next item, first
    result = app.recommend(_session_query())
    assert result.fallbacks == [] and len(result.item_ids) == 10
    assert result.candidates["sequence"] > 0
    # the sequence columns of the ranker's matrix are filled for the candidates it returned
    pool_lists = engine.sequence.lists(history, CFG.n_sequence)
    from tandem.policy.retrieval import merge

    pool = merge(pool_lists, history, engine.n_items)
    x = engine._features(pool, pool_lists, {}, None, history, _session_query(), S.NOW_MS)
    (_, listed, listed_scores), = pool_lists
    position = pd.Series(np.arange(1, len(listed) + 1), index=listed)[pool.rows].to_numpy()
    np.testing.assert_array_equal(x[:, RF.FEATURE_NAMES.index("sequence_rank")], position)
    np.testing.assert_allclose(x[:, RF.FEATURE_NAMES.index("sequence_score")],
                               listed_scores[position - 1], rtol=1e-6)
    # sequence_affinity is the same model score, for every candidate of any source
    np.testing.assert_allclose(x[:, RF.FEATURE_NAMES.index("sequence_affinity")],
                               listed_scores[position - 1], rtol=1e-5, atol=1e-5)
    other = np.setdiff1d(np.arange(engine.n_items), np.r_[history, listed])[:7]
    wide = merge(pool_lists + [("popularity", other, np.ones(len(other)))], history,
                 engine.n_items)
    x = engine._features(wide, pool_lists, {}, None, history, _session_query(), S.NOW_MS)
    query = engine.sequence.encoder.encode(history[: engine.sequence.encoder.max_len])
    np.testing.assert_allclose(x[:, RF.FEATURE_NAMES.index("sequence_affinity")],
                               engine.sequence.encoder.item_vectors[wide.rows] @ query,
                               rtol=1e-5, atol=1e-5)
    assert np.isnan(x[np.isin(wide.rows, other), RF.FEATURE_NAMES.index("sequence_score")]).all()


def test_bundle_without_sequence_parts_serves(world):
    app = _app(world, world["plain"])
    engine = next(iter(app.engines.values()))
    assert engine.sequence is None
    result = app.recommend(_session_query())
    assert result.fallbacks == [] and len(result.item_ids) == 10
    assert result.candidates["sequence"] == 0


def test_older_ranker_without_sequence_features_serves(world, tmp_path):
    """A bundle whose features.json (and ranker) predate the sequence and content features."""
    old = tmp_path / "old"
    shutil.copytree(world["plain"], old)
    names = [n for n in RF.FEATURE_NAMES if not n.startswith(("sequence_", "content_"))]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, len(names))).astype(np.float32)
    y = (x[:, 0] + rng.standard_normal(400) > 1).astype(int)
    model = lgb.LGBMRanker(n_estimators=5, num_leaves=7, min_child_samples=5, verbose=-1)
    model.fit(x, y, group=[20] * 20, feature_name=names)
    R.save(model, old / B.RANKER_MODEL)
    (old / B.FEATURE_SPEC).write_text(json.dumps({"names": names}))
    feeds: list = []

    class Sink:
        def log(self, feed) -> None:
            feeds.append(feed)

    fetch, probe = local_source(old)
    app = App(fetch, probe, None, replace(CFG, feature_log_share=1.0), NoRows(), Sink(),
              item_features=world["items"])
    engine = next(iter(app.engines.values()))
    assert len(engine.feature_columns) == len(names) == len(RF.FEATURE_NAMES) - 5
    result = app.recommend(_session_query())
    assert result.fallbacks == [] and len(result.item_ids) == 10
    # the logged sample names the columns the ranker was given (the demo served an older
    # champion whose samples named every column and failed to serialise)
    sample = feeds[-1].logged
    assert tuple(sample.names) == tuple(names) and sample.values.shape[1] == len(names)
    records = feature_log.records(feeds[-1])
    assert len(records) == len(sample.item_ids) > 0
    assert list(records[0][feature_log.FEATURES]) == names
