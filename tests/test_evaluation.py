"""The evaluation protocol on tiny frames, and (slow) the ml-100k quality bar."""

import numpy as np
import pandas as pd
import pytest

from tandem import schema as S
from tandem.data.dataset import EVENT_COLUMNS, ITEM_COLUMNS, USER_COLUMNS, Dataset, conform
from tandem.evaluation import diversify_sweep as DS
from tandem.evaluation import offline as EO
from tandem.evaluation import point_in_time as EP
from tandem.evaluation import protocol as E
from tandem.evaluation import sources as ES
from tandem.features import ranking_features as RF
from tandem.models import als as A


def _ratings(rows):
    """rows: (user, item, stars, ts_ms) -> contract rating events."""
    frame = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.VALUE, S.TS])
    frame[S.EVENT_TYPE] = S.RATING
    frame[S.EVENT_ID] = [f"e-{u}-{i}-{t}" for u, i, _, t in rows]
    return conform(frame, EVENT_COLUMNS)


def test_temporal_split_takes_each_users_last_fifth():
    # user a: 5 events -> last 1 is test; user b: 10 events -> last 2; user c: 4 -> none
    rows = ([("a", f"i{t}", 5, t) for t in range(5)]
            + [("b", f"i{t}", 3, 100 + t) for t in range(10)]
            + [("c", f"i{t}", 4, t) for t in range(4)])
    shuffled = _ratings(rows).sample(frac=1.0, random_state=0)
    train, test = E.temporal_split(shuffled, 0.2)
    pairs = sorted(zip(test[S.USER_ID], test[S.ITEM_ID], strict=True))
    assert pairs == [("a", "i4"), ("b", "i8"), ("b", "i9")]
    assert len(train) == 19 - 3
    # every training event of a user is no later than their first test event
    last_train = train.groupby(S.USER_ID)[S.TS].max()
    first_test = test.groupby(S.USER_ID)[S.TS].min()
    assert (last_train.reindex(first_test.index) <= first_test).all()


def test_temporal_split_ties_are_deterministic_whatever_the_input_order():
    rows = [("a", f"i{k}", 4, 1000) for k in range(10)]  # all at the same second
    events = _ratings(rows)
    _, t1 = E.temporal_split(events, 0.2)
    _, t2 = E.temporal_split(events.iloc[::-1], 0.2)
    assert len(t1) == 2 and sorted(t1[S.ITEM_ID]) == sorted(t2[S.ITEM_ID])


def test_relevant_pairs_are_ratings_of_four_and_up():
    test = _ratings([("a", "x", 4, 1), ("a", "y", 3.5, 2), ("b", "x", 5, 3), ("b", "x", 5, 4)])
    rel = E.relevant_pairs(test, None)
    assert sorted(map(tuple, rel.values.tolist())) == [("a", "x"), ("b", "x")]


def _world(n_users=60, n_items=30, seed=0):
    """Two taste groups with drifting interest: enough structure for every stage to run."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        group = u % 2
        pool = np.arange(group * 15, group * 15 + 15)
        for t, i in enumerate(rng.choice(pool, size=12, replace=False)):
            rows.append((f"u{u}", f"m{i}", float(rng.choice([3, 4, 5])), 1_000_000 * (t + 1) + u))
    events = _ratings(rows)
    items = conform(pd.DataFrame({
        S.ITEM_ID: [f"m{i}" for i in range(n_items)], S.TITLE: [f"M{i}" for i in range(n_items)],
        S.GENRES: [["Action"] if i < 15 else ["Drama"] for i in range(n_items)],
        S.CREATED_AT: 0}), ITEM_COLUMNS)
    users = conform(pd.DataFrame({S.USER_ID: [f"u{u}" for u in range(n_users)],
                                  S.SIGNUP_TS: 0}), USER_COLUMNS)
    return Dataset(events, items, users, "tiny")


def test_evaluate_end_to_end_on_a_tiny_world():
    cfg = {**E.EVAL_CONFIG, "two_tower": None, "als_k": 10, "popular_k": 5, "retrieval_k": 20,
           "als": {**E.EVAL_CONFIG["als"], "factors": 4, "iterations": 5},
           "ranker": {**E.EVAL_CONFIG["ranker"], "n_estimators": 10, "min_child_samples": 5},
           "sequence": {"num_threads": 1, "dim": 8, "max_len": 8, "epochs": 3},
           "sequence_k": 10}
    report = EO.evaluate(_world(), cfg)
    assert report["dataset"] == "tiny"
    assert set(report["models"]) == {"popularity", "als", "two_tower", "sequence", "two_stage"}
    assert "missing" in report["models"]["two_tower"]
    assert "sequence" in report["retrieval"]["recall@20"]
    for name in ("popularity", "als", "sequence", "two_stage"):
        values = report["models"][name]
        assert {"ndcg@10", "recall@10", "precision@10", "map@10", "mrr@10", "hit_rate@10",
                "coverage@10", "diversity@10", "novelty@10", "serendipity@10"} <= set(values)
        assert all(0.0 <= v <= 1.0 for m, v in values.items() if m != "novelty@10")
        # relevant-and-unexpected is a subset of the hits
        assert values["serendipity@10"] <= values["precision@10"] + 1e-12
    # unexpected = not in the popularity list, so popularity is never serendipitous
    assert report["models"]["popularity"]["serendipity@10"] == 0.0
    assert report["models"]["als"]["serendipity@10"] > 0.0
    # a user's candidates never include items they saw, so recall of a group-blind
    # popularity list is bounded by the group's 15 items; ALS must find the group
    assert report["models"]["als"]["ndcg@10"] > report["models"]["popularity"]["ndcg@10"]
    assert report["protocol"]["n_users"] > 0
    # the diversify sweep: every grid setting on both splits, the two-stage row is the chosen
    # setting's test row, the choice follows the rule on the validation rows only
    sweep, chosen = report["diversify_sweep"], report["diversify_chosen"]
    n = int(np.prod([len(values) for values in DS.GRID.values()]))
    assert [r["split"] for r in sweep].count("validation") == n == len(sweep) - n
    picked = [r for r in sweep if r["split"] == "test"
              and all(r[key] == chosen[key] for key in DS.KEYS)]
    two_stage = report["models"]["two_stage"]
    assert {m: picked[0][m] for m in ("ndcg@10", "coverage@10", "diversity@10")} == {
        m: two_stage[m] for m in ("ndcg@10", "coverage@10", "diversity@10")}
    assert report["diversify"]["mmr_lambda"] == chosen["mmr_lambda"]
    valid = [r for r in sweep if r["split"] == "validation"]
    assert DS.choose(valid, chosen["validation_als"], E.EVAL_CONFIG["diversify"], 10) == (
        {key: chosen[key] for key in DS.KEYS}, chosen["met_rule"])


def test_sweep_choice_is_the_best_validation_ndcg_that_keeps_alss_breadth():
    rows = [{"mmr_lambda": 1.0, "genre_cap": 0, "calibration": 0.0, "mmr_similarity": "genre",
             "ndcg@10": 0.30, "coverage@10": 0.2, "diversity@10": 0.5},  # narrower than ALS
            {"mmr_lambda": 0.9, "genre_cap": 0, "calibration": 1.0, "mmr_similarity": "genre",
             "ndcg@10": 0.25, "coverage@10": 0.4, "diversity@10": 0.7},
            {"mmr_lambda": 0.7, "genre_cap": 2, "calibration": 0.0,
             "mmr_similarity": "embedding", "ndcg@10": 0.25, "coverage@10": 0.5,
             "diversity@10": 0.8},   # as good: the earlier setting wins
            {"mmr_lambda": 0.5, "genre_cap": 2, "calibration": 0.0, "mmr_similarity": "genre",
             "ndcg@10": 0.20, "coverage@10": 0.6, "diversity@10": 0.9}]
    als = {"ndcg@10": 0.2, "coverage@10": 0.3, "diversity@10": 0.6}
    default = {"mmr_lambda": 0.7, "mmr_pool": 100, "genre_cap": 0, "calibration": 1.0,
               "mmr_similarity": "embedding"}
    assert DS.choose(rows, als, default, 10) == (
        {"mmr_lambda": 0.9, "genre_cap": 0, "calibration": 1.0, "mmr_similarity": "genre"},
        True)
    wide = {**als, "diversity@10": 0.95}  # nothing is as diverse: the default stays
    assert DS.choose(rows, wide, default, 10) == (
        {"mmr_lambda": 0.7, "genre_cap": 0, "calibration": 1.0, "mmr_similarity": "embedding"},
        False)
    grid = DS.settings({"mmr_lambda": (1.0, 0.5), "genre_cap": (0, 2)}, default)
    assert [(g["mmr_lambda"], g["genre_cap"], g["calibration"], g["mmr_pool"])
            for g in grid] == [(1.0, 0, 1.0, 100), (1.0, 2, 1.0, 100), (0.5, 0, 1.0, 100),
                               (0.5, 2, 1.0, 100)]
    with_calibration = DS.settings({"mmr_lambda": (1.0,), "genre_cap": (0,),
                                    "calibration": (0.0, 3.0)}, default)
    assert [g["calibration"] for g in with_calibration] == [0.0, 3.0]
    assert {g["mmr_similarity"] for g in grid} == {"embedding"}  # base's, as the grid has none
    both = DS.settings({"mmr_lambda": (0.8,), "genre_cap": (0,),
                        "mmr_similarity": ("genre", "embedding")}, default)
    assert [g["mmr_similarity"] for g in both] == ["genre", "embedding"]


def test_evaluate_tunes_every_model_on_the_inner_split_only(monkeypatch):
    """With ``tune`` the studies score the inner split of the training data: the test events
    never reach an objective, and every later fit uses the choice."""
    from tandem.config import TuningSettings
    from tandem.evaluation import tuning

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    world = _world()
    _, test = E.temporal_split(world.events, 0.2)
    seen_by_studies = []
    real_fit = A.fit_als

    def spy(matrix, user_ids, item_ids, cfg, show_progress=False):
        seen_by_studies.append(matrix.nnz)
        return real_fit(matrix, user_ids, item_ids, cfg, show_progress)

    monkeypatch.setattr(A, "fit_als", spy)
    cfg = {**E.EVAL_CONFIG, "two_tower": None, "als_k": 10, "popular_k": 5, "retrieval_k": 20,
           "tune": TuningSettings(n_trials=3, timeout_s=120)}
    report = EO.evaluate(world, cfg)
    assert set(report["tuning"]) == {tuning.ALS, tuning.RANKER}
    for study in report["tuning"].values():
        assert study["trials"] == 3
        assert study["val_ndcg@10"] >= study["default_val_ndcg@10"]
    # the three ALS trials fit the inner training part: fewer pairs than the training data
    n_train_pairs = len(world.events) - len(test)
    assert len(seen_by_studies) >= 3 and max(seen_by_studies[:3]) < 0.85 * n_train_pairs
    assert report["models"]["two_stage"]["ndcg@10"] > 0.0
    assert "tuning" in report["timings_s"]


@pytest.mark.slow
def test_ml100k_quality_bar(ml100k_dir, tmp_path):
    """Issue 4's bar: two-stage NDCG@10 >= 1.10 x best single stage; ALS within 0.17 +-15%."""
    from jobs.evaluate import quality_bar, write_reports
    from tandem.data.movielens import load_movielens

    report = EO.evaluate(load_movielens(ml100k_dir))
    bar = quality_bar(report)
    paths = write_reports({**report, "quality_bar": bar}, tmp_path)
    assert all(p.exists() for p in paths.values())
    assert 0.1445 <= bar["als_ndcg@10"] <= 0.1955, bar
    assert bar["lift_ok"], bar


def _fake_report(two_stage_ndcg):
    metrics = lambda v: {"ndcg@10": v, "recall@10": v / 2}  # noqa: E731
    return {"dataset": "fake",
            "protocol": {"split": "s", "relevant": "r", "filter": "f", "users": "u",
                         "n_users": 3},
            "models": {"popularity": metrics(0.1), "als": metrics(0.17),
                       "two_tower": metrics(0.16), "two_stage": metrics(two_stage_ndcg)},
            "retrieval": {"recall@500": {"als": 0.8}, "recall_combined": 0.9,
                          "candidates_per_user": 500.0},
            "timings_s": {"total": 1.0}}


def test_quality_bar_and_reports(tmp_path):
    import json

    from jobs.evaluate import quality_bar, write_reports

    bar = quality_bar(_fake_report(0.1875))  # 0.1875 / 0.17 = 1.103
    assert bar["best_single_stage"] == "als" and bar["lift"] == pytest.approx(0.1875 / 0.17)
    assert bar["lift_ok"] and bar["als_ok"]
    assert not quality_bar(_fake_report(0.18))["lift_ok"]
    report = {**_fake_report(0.2), "quality_bar": quality_bar(_fake_report(0.2))}
    paths = write_reports(report, tmp_path)
    assert json.loads(paths["json"].read_text())["models"]["two_stage"]["ndcg@10"] == 0.2
    table = paths["md"].read_text()
    assert "| two_stage | 0.2000 | 0.1000 |" in table and "-> met" in table
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_session_rows_of_users_without_engagements_are_defaults():
    """Request users whose history holds only impressions (or nothing) get empty sessions,
    not a crash (a pipeline run's train_ranker failed on such a batch)."""
    events = _ratings([("u1", "i1", 4.0, 1_000), ("u2", "i2", 3.0, 2_000)])
    items = conform(pd.DataFrame({S.ITEM_ID: ["i1", "i2"], S.GENRES: [["Drama"], ["Horror"]],
                                  S.RELEASE_YEAR: 1990, S.DURATION_S: 5400,
                                  S.CREATED_AT: 0}), ITEM_COLUMNS)
    users = conform(pd.DataFrame({S.USER_ID: ["u1", "u2"], S.SIGNUP_TS: 0}), USER_COLUMNS)
    catalog = E.Catalog.of(Dataset(events, items, users, "t"))
    only_impressions = events.assign(**{S.EVENT_TYPE: S.IMPRESSION})
    for history in (only_impressions, events.iloc[:0]):
        raw, recent = EP.session_rows(history, catalog, np.array([0, 1]), n_recent=3)
        assert len(raw) == 2 and raw[S.SESSION_LENGTH].tolist() == [0, 0]
        assert recent.shape == (2, 3)
    raw, _ = EP.session_rows(events, catalog, np.array([0, 1]), n_recent=3)
    assert raw[S.SESSION_LENGTH].tolist() == [1, 1]


def test_content_source_in_training_is_servings_on_the_same_rows():
    """The ranker's content candidates (evaluation, nightly) come from the function serving
    calls with the profile serving builds: user_genre_affinity + the last engaged items."""
    from serving.session_retrieval import SessionRetrieval
    from tandem.features import entity as F

    data = _world()
    catalog = E.Catalog.of(data)
    train, _ = E.temporal_split(data.events)
    fitted = ES.fit_sources(train, catalog, {**E.EVAL_CONFIG, "two_tower": None,
                                             "sequence": None,
                                             "als": {**E.EVAL_CONFIG["als"], "factors": 4,
                                                    "iterations": 2}})
    rows = np.array([0, 1, 5])
    inputs = ES.content_inputs(train, catalog, fitted.popularity, rows, None)
    got = ES.content_lists(inputs, fitted.seen[rows], 8)
    genres = F.genre_multi_hot(catalog.items[S.GENRES]) > 0
    served = SessionRetrieval.build(np.zeros((len(catalog.item_ids), 2), np.float32), genres,
                                    fitted.popularity.astype(np.float32))
    urows = EP.user_rows(train, catalog, rows, np.full(3, 10**12), None)
    _, recent = EP.session_rows(train, catalog, rows, 10)
    for local, row in enumerate(rows):
        seen = fitted.seen[row].indices
        items, scores = served.content({"user_genre_affinity": urows["user_genre_affinity"][local]},
                                       recent[local][recent[local] >= 0], 8 + len(seen))
        keep = ~np.isin(items, seen)
        mine = got[got["local"] == local]
        np.testing.assert_array_equal(mine["item"].to_numpy(), items[keep][:8])
        np.testing.assert_allclose(mine["score"].to_numpy(), scores[keep][:8], rtol=1e-6)
        assert len(mine) > 0
    # a user of the Action half gets Action items (rows 0-14) from it
    assert (got.loc[got["local"] == 0, "item"] < 15).all()


def test_two_stage_shows_servings_rerank_of_the_ranker_scores():
    """``diversified`` picks k per user with tandem.policy.diversify.rerank (serving's defaults)."""
    from tandem.features import entity as F
    from tandem.policy import diversify as D

    data = _world()
    catalog = E.Catalog.of(data)
    fitted = ES.fit_sources(data.events, catalog, {**E.EVAL_CONFIG, "two_tower": None,
                                                   "sequence": None,
                                                   "als": {**E.EVAL_CONFIG["als"], "factors": 4,
                                                          "iterations": 2}})
    cands = ES.candidates(fitted, np.array([0, 1]), {**E.EVAL_CONFIG, "als_k": 10,
                                                     "popular_k": 5, "content_k": 5})
    assert cands["content_score"].notna().any()
    scores = np.random.default_rng(0).random(len(cands))
    shown = EO.diversified(fitted, catalog, cands, scores, 4, D.DIVERSIFY_CONFIG)
    users = cands["user_row"].to_numpy()
    assert len(shown) == 8 and (users[shown[:4]] == 0).all() and (users[shown[4:]] == 1).all()
    first = users == 0
    vectors, genres = RF.unit_rows(fitted.als.item_factors), F.genre_multi_hot(
        catalog.items[S.GENRES])
    expected = D.rerank(scores[first], cands["item"].to_numpy()[first], vectors, genres, 4)
    np.testing.assert_array_equal(shown[:4], np.flatnonzero(first)[expected])
    # calibrated to each user's session intent, as serving reads it (the query history's genres)
    intents = EO.group_intents(fitted, catalog, cands, None)
    assert intents.shape == (2, F.N_GENRES) and intents.max() >= 0.5
    cfg = {**D.DIVERSIFY_CONFIG, "calibration": 3.0}
    shown = EO.diversified(fitted, catalog, cands, scores, 4, cfg, intents)
    expected = D.rerank(scores[first], cands["item"].to_numpy()[first], vectors, genres, 4, cfg,
                        intents[0])
    np.testing.assert_array_equal(shown[:4], np.flatnonzero(first)[expected])
