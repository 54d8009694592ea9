"""Serving learns between nightly runs: a session refolds the user's ALS vector and feeds genre
content retrieval, and an hourly run's new items are retrievable without a restart."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from jobs import embed_new_items
from serving.app import App, ItemFeatures, MemoryStore, ServingConfig
from serving.server import local_source
from serving.validation import RecommendQuery
from tandem import schema as s
from tandem.features import entity as F
from tandem.models import als as A
from tandem.models import synthetic_bundle as S
from tandem.models.bundle import DELTAS, ITEMS

pytestmark = pytest.mark.serving

SPEC = S.SyntheticSpec(n_items=600, n_users=300, n_als_users=200, n_clusters=10, n_trees=20,
                       num_leaves=7, n_train_groups=60, group_size=20)
CFG = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=500.0,
                    rank_deadline_ms=5000.0)
HORROR = F.GENRE_VOCAB.index("Horror")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    bundle, features = S.build(root, SPEC)
    frame = pd.read_parquet(features)
    return {"bundle": bundle, "frame": frame,
            "items": lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids))}


def _horror_fan_burst(frame: pd.DataFrame, n: int = 12) -> dict:
    """A session row after a click and a like on each of ``n`` Horror items."""
    horror = frame[frame["item_genres"].map(lambda g: "Horror" in g)][s.ITEM_ID].tolist()[:n]
    return {s.SESSION_RECENT_ITEMS: horror[::-1], s.SESSION_RECENT_GENRES: ["Horror"],
            s.SESSION_LENGTH: 2 * n, s.SESSION_START_TS: S.NOW_MS - 60_000,
            s.SESSION_LAST_TS: S.NOW_MS - 1_000, "cnt_click": n, "cnt_like": n}


def test_a_burst_refolds_als_and_brings_its_genre_through_content(world):
    user = {"user_genre_affinity": [1.0 if g == F.GENRE_VOCAB.index("Comedy") else 0.0
                                    for g in range(F.N_GENRES)]}
    burst = _horror_fan_burst(world["frame"])
    store = MemoryStore({"u7": user}, {})
    app = App(*local_source(world["bundle"]), cfg=CFG, store=store,
              item_features=world["items"])
    engine = app.engines["champion"]
    q = RecommendQuery("u7", 10, "tv", ts=S.NOW_MS)
    before = app.recommend(q)
    # deterministic path: the logged propensity 1 is the true probability of each shown item
    assert app.recommend(q).item_ids == before.item_ids
    np.testing.assert_array_equal(before.propensities, 1.0)
    assert before.candidates["content"] > 0  # history-only content for a known user

    store.sessions["u7"] = burst
    after = app.recommend(q)
    np.testing.assert_array_equal(after.propensities, 1.0)
    history = engine.rows_of(burst[s.SESSION_RECENT_ITEMS])
    assert not set(after.item_ids) & set(burst[s.SESSION_RECENT_ITEMS])  # seen: not shown
    assert after.candidates["session"] > 0
    # ALS: the user's nightly vector refolded with the burst (the closed-form user step)
    row = engine.user_index.get_loc("u7")
    nightly = engine._als_list(row, history[:0], CFG)[0][1]
    folded = engine._als_list(row, history, CFG, burst)[0][1]
    expected = A.fold_in_one(engine.als_items, engine.session_retrieval.yty, history,
                             np.full(len(history), 4.0), prior=engine.als_users[row])
    top = np.argsort(-(engine.als_items @ expected))
    np.testing.assert_array_equal(folded[:20], top[:20])
    assert len(np.setdiff1d(folded[:50], nightly[:50])) >= 10
    # content: the session's genre leads over the Comedy history
    rows, _ = engine.session_retrieval.content(user, history, CFG.n_content)
    genres = engine.item_features.static[:, F.ITEM_GENRE_SLICE] > 0
    assert genres[rows[:50], HORROR].all()
    assert after.candidates["content"] >= 50


def test_a_burst_of_one_genre_is_lost_in_the_ranker_and_the_intent_floor_brings_it(world):
    """``make demo``'s burst on the production path: a Comedy fan clicks and likes 12 Horror
    films. Retrieval brings dozens of Horror films (content, session, fold-in), but the ranker,
    which learned from histories without such sessions, ranks them below the popular head:
    the ranker's order through MMR alone shows none of them. Serving's default re-ranking holds
    the session intent's floor (``tandem.policy.diversify``: at least ``intent_floor`` items of
    the genre the newest items agree on, Horror) and shows 3 of 10; the full calibration (a
    ``ServingConfig.calibration`` variant, off by default as ``make eval``'s validation split
    chooses) shows at least as many."""
    user = {"user_genre_affinity": [1.0 if g == F.GENRE_VOCAB.index("Comedy") else 0.0
                                    for g in range(F.N_GENRES)]}
    burst = _horror_fan_burst(world["frame"])
    store = MemoryStore({"u7": user}, {"u7": burst})
    q = RecommendQuery("u7", 10, "tv", ts=S.NOW_MS)

    def horror_shown(cfg: ServingConfig) -> int:
        app = App(*local_source(world["bundle"]), cfg=cfg, store=store,
                  item_features=world["items"])
        engine = app.engines["champion"]
        reply = app.recommend(q)
        assert not set(reply.item_ids) & set(burst[s.SESSION_RECENT_ITEMS])  # seen: not shown
        genres = engine.item_features.static[:, F.ITEM_GENRE_SLICE] > 0
        return int(genres[engine.rows_of(reply.item_ids), HORROR].sum())

    no_intent = CFG.with_overrides({"intent_floor": 0})
    assert CFG.calibration == 0 and horror_shown(no_intent) == 0
    assert CFG.intent_floor == 3 and horror_shown(CFG) == 3
    assert horror_shown(no_intent.with_overrides({"calibration": 1.0})) >= 3


def test_a_new_item_is_retrievable_after_one_hourly_run(world, paths):
    bundle_dir = paths.models / "20260101"
    shutil.copytree(world["bundle"], bundle_dir)
    items = pd.read_parquet(bundle_dir / ITEMS)
    catalog = pd.DataFrame({
        s.ITEM_ID: [*items[s.ITEM_ID], "new-horror"],
        s.GENRES: [["Drama"]] * len(items) + [["Horror", "Thriller"]],
        s.RELEASE_YEAR: [1990] * len(items) + [2026],
        s.CREATED_AT: [*items[s.CREATED_AT], S.NOW_MS + 60_000]})
    paths.items.mkdir(parents=True)
    catalog.to_parquet(paths.items / "part-0.parquet", index=False)
    cfg = ServingConfig(**{**CFG.__dict__, "deltas_dir": str(paths.models / DELTAS)})
    app = App(*local_source(bundle_dir), cfg=cfg, item_features=world["items"])
    assert app.similar("new-horror", 5) is None and app.poll_once() == []

    end = datetime.fromtimestamp(S.NOW_MS / 1000 + 3600, tz=UTC)
    embed_new_items.run(None, paths, end, end)  # the hourly task
    assert app.poll_once() == ["champion"]  # the same version, reloaded with the new item
    engine = app.engines["champion"]
    assert engine.version == app.probe_version("champion")
    row = engine.item_index.get_loc("new-horror")
    assert row == len(items) == engine.n_items - 1 and engine.popularity[row] == 0
    np.testing.assert_array_equal(engine.als_items[row], 0.0)
    vec = engine.item_vectors[row]
    assert engine.main_index.search(vec[None], 1)[1][0, 0] == row  # in the served FAISS index
    # retrieval: a session on the new item's nearest neighbour finds it (session source) ...
    neighbour = engine.similar("new-horror", 1)
    assert neighbour is not None and len(neighbour.item_ids) == 1
    history = engine.rows_of(neighbour.item_ids)
    (name, hits, _), = engine._two_tower_lists(None, history, cfg)
    assert name == "session" and row in hits
    # ... and it is fresh: a request of a user with that session gets it as a candidate
    reply = app.recommend(RecommendQuery("u-new", 10, "tv", ts=S.NOW_MS + 120_000,
                                         session_item_ids=tuple(neighbour.item_ids)))
    assert reply.candidates["fresh"] >= 1 and reply.candidates["session"] >= 1
    assert app.poll_once() == []  # nothing newer: no reload
