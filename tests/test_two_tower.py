"""tandem.models.two_tower training, the numpy export (tandem.models.user_tower), and the two
nightly jobs.

Synthetic world whose right answer is obvious: items belong to one of ``G`` genres (their only
content), each user likes one genre and interacts only with its items, so a user's next items are
predictable from their history and a fresh item's vector follows from its genre alone.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import build_index as build_index_job
from jobs import train_two_tower as train_job
from tandem import schema as s
from tandem.data.landing import write_events_parquet, write_items, write_users
from tandem.features.tower_features import ItemContentSpec, UserFeatureSpec
from tandem.models.ann import AnnIndex
from tandem.models.bundle import INDEX_ALS, INDEX_MAIN, ITEMS, TT_ITEM_VECTORS, TT_USER_TOWER
from tandem.models.two_tower import PAD, TwoTowerConfig, train_two_tower
from tandem.models.user_tower import QUERY_SAMPLE, UserTower

G, PER_GENRE, N_USERS, PER_USER, HELD_OUT = 6, 20, 90, 14, 3
GENRES = [f"g{j}" for j in range(G)]
CFG = TwoTowerConfig(dim=16, hidden=32, history_len=8, epochs=6, batch_size=128,
                     n_sampled_negatives=32, lr=1e-2, num_threads=1)


def world(seed: int = 0):
    """(interactions user_idx/item_idx/ts, item genres, user fav genre, ITEM spec)."""
    rng = np.random.default_rng(seed)
    item_genre = np.repeat(np.arange(G), PER_GENRE)
    fav = rng.integers(0, G, N_USERS)
    picks = np.stack([rng.choice(PER_GENRE, PER_USER, replace=False) for _ in range(N_USERS)])
    items = fav[:, None] * PER_GENRE + picks
    frame = pd.DataFrame({"user_idx": np.repeat(np.arange(N_USERS), PER_USER),
                          "item_idx": items.ravel(),
                          "ts": np.tile(np.arange(PER_USER), N_USERS) * 1000})
    genres = [[GENRES[g]] for g in item_genre]
    return frame, genres, fav


@pytest.fixture(scope="module")
def trained():
    frame, genres, fav = world()
    spec = ItemContentSpec.fit(genres)
    content = spec.encode(genres, [2000] * len(genres))
    users = pd.DataFrame({s.GENDER: np.where(np.arange(N_USERS) % 2, "F", "M")})
    uspec = UserFeatureSpec.fit(users, [s.GENDER])
    train = frame[frame["ts"] < (PER_USER - HELD_OUT) * 1000]
    model = train_two_tower(train, content, uspec.encode(users), CFG, item_spec=spec,
                            user_spec=uspec)
    return model, frame, train, content, uspec.encode(users), fav


def test_item_content_and_user_features_encode_to_fixed_slots():
    spec = ItemContentSpec(("Action", "Drama"), (1990, 2000))
    out = spec.encode([["Drama", "Nope"], None], [1995, None])
    np.testing.assert_array_equal(out, [[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]])
    uspec = UserFeatureSpec((("gender", ("F", "M")),))
    np.testing.assert_array_equal(uspec.encode({"gender": ["M", None]}), [[0, 1, 0], [0, 0, 1]])
    assert ItemContentSpec.from_json(spec.to_json()) == spec
    assert UserFeatureSpec.from_json(uspec.to_json()) == uspec


def test_training_lowers_loss_and_beats_random_retrieval(trained):
    model, frame, train, *_ = trained
    assert len(model.loss_history) == CFG.epochs
    assert model.loss_history[-1] < 0.95 * model.loss_history[0]
    vecs = model.item_vectors()
    assert vecs.shape == (G * PER_GENRE, CFG.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    scores = model.user_vectors() @ vecs.T
    scores[train["user_idx"], train["item_idx"]] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    test = frame[frame["ts"] >= (PER_USER - HELD_OUT) * 1000]
    hit = np.zeros_like(scores, dtype=bool)
    hit[test["user_idx"], test["item_idx"]] = True
    recall = np.take_along_axis(hit, top, 1).sum() / len(test)
    unseen = G * PER_GENRE - (PER_USER - HELD_OUT)
    print(f"loss {model.loss_history}, recall@10 {recall:.3f} vs random {10 / unseen:.3f}")
    assert recall > 0.4 > 4 * 10 / unseen


def test_same_seed_same_vectors(trained):
    model, _, train, content, feats, _ = trained
    again = train_two_tower(train, content, feats, CFG)
    np.testing.assert_array_equal(again.item_vectors(), model.item_vectors())


def test_exported_numpy_tower_equals_torch_tower(trained, tmp_path):
    model, _, _, content, feats, _ = trained
    paths = model.export(tmp_path)
    assert paths["item_vectors"] == tmp_path / TT_ITEM_VECTORS
    vectors = np.load(tmp_path / TT_ITEM_VECTORS)
    np.testing.assert_array_equal(vectors, model.item_vectors())
    tower = UserTower.load(tmp_path / TT_USER_TOWER, vectors)
    assert tower.item_spec == model.item_spec and tower.user_spec == model.user_spec
    assert tower.config["history_len"] == CFG.history_len
    np.testing.assert_allclose(tower.encode_batch(feats, model.histories), model.user_vectors(),
                               atol=1e-5)
    ragged = np.array([[3, 5, PAD, PAD], [PAD, PAD, PAD, PAD]])  # short and empty histories
    np.testing.assert_allclose(tower.encode_batch(feats[:2], ragged),
                               model.user_vectors(feats[:2], ragged), atol=1e-5)
    np.testing.assert_allclose(tower.encode(feats[7], model.histories[7]),
                               model.user_vectors()[7], atol=1e-5)
    np.testing.assert_allclose(tower.encode_items(content[:10]),
                               model.content_vectors(content[:10]), atol=1e-5)


def test_fresh_item_gets_a_vector_from_content_alone(trained, tmp_path):
    model, _, _, _, _, fav = trained
    tower = UserTower.load(model.export(tmp_path)["user_tower"], model.item_vectors())
    fresh = tower.item_spec.encode([[GENRES[g]] for g in range(G)], [2001] * G)  # one per genre
    vec = tower.encode_items(fresh)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    scores = model.user_vectors() @ vec.T  # [users, genres]
    # users rank the fresh item of their own genre first (content transfers the taste)
    assert (scores.argmax(axis=1) == fav).mean() > 0.9


def test_cold_catalog_item_uses_the_content_only_path():
    frame, genres, _ = world()
    spec = ItemContentSpec.fit(genres)
    content = spec.encode(genres, [2000] * len(genres))
    cold = frame["item_idx"] == 0
    model = train_two_tower(frame[~cold], content, None,
                            TwoTowerConfig(**{**CFG.__dict__, "epochs": 1}))
    assert model.item_counts[0] == 0
    np.testing.assert_allclose(model.item_vectors()[0], model.content_vectors(content[:1])[0],
                               atol=1e-6)


def _lake(paths, frame: pd.DataFrame, genres, t0_ms: int):
    events = pd.DataFrame({
        s.EVENT_ID: [f"e{k}" for k in range(len(frame))],
        s.EVENT_TYPE: s.RATING, s.USER_ID: "u" + frame["user_idx"].astype(str),
        s.ITEM_ID: "i" + frame["item_idx"].astype(str),
        s.TS: t0_ms + frame["ts"].to_numpy() * 60, s.VALUE: 5.0})
    write_events_parquet(events, paths.events, "test")
    write_items(pd.DataFrame({s.ITEM_ID: [f"i{k}" for k in range(len(genres))],
                              s.TITLE: "t", s.GENRES: genres, s.RELEASE_YEAR: 1999,
                              s.CREATED_AT: t0_ms - 1}), paths)
    write_users(pd.DataFrame({s.USER_ID: [f"u{k}" for k in range(N_USERS)],
                              s.SIGNUP_TS: t0_ms - 1, s.GENDER: "F"}), paths)


@pytest.mark.spark
def test_train_job_then_index_job_write_the_bundle_and_report_recall(spark, paths):
    from jobs import build_training_table

    frame, genres, _ = world()
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    _lake(paths, frame, genres, int(start.timestamp() * 1000))
    build_training_table.run(spark, paths, start, end)  # the int-coded table the job reads
    cfg = {"two_tower": {**CFG.__dict__, "epochs": 2}}
    counts = train_job.run(None, paths, start, end, cfg)
    bundle = paths.models / "20260102"
    assert counts["interactions"] == len(frame) and counts["items"] == G * PER_GENRE
    assert counts["users"] == N_USERS and counts["bundle_dir"] == str(bundle)
    items = pd.read_parquet(bundle / ITEMS)
    assert len(items) == G * PER_GENRE and items["popularity"].sum() == len(frame)
    assert np.load(bundle / QUERY_SAMPLE).shape == (N_USERS, CFG.dim)
    again = train_job.run(None, paths, start, end, cfg)  # idempotent re-run
    assert again == counts
    (bundle / "als").mkdir()
    rng = np.random.default_rng(0)
    np.save(bundle / "als" / "item_factors.npy", rng.normal(size=(G * PER_GENRE, 8)))
    np.save(bundle / "als" / "user_factors.npy", rng.normal(size=(N_USERS, 8)))
    out = build_index_job.run(None, paths, start, end)
    assert out["main_recall_at_500"] == 1.0 and out["als_recall_at_200"] == 1.0  # exact: small
    assert out["main_items"] == G * PER_GENRE and out["main_ivf"] == 0.0
    main = AnnIndex.load(bundle / INDEX_MAIN)
    assert main.metric == "ip" and AnnIndex.load(bundle / INDEX_ALS).metric == "mips"
    _, top = main.search(np.load(bundle / TT_ITEM_VECTORS)[:3], 1)
    np.testing.assert_array_equal(top[:, 0], [0, 1, 2])


def test_serving_runtime_never_imports_torch():
    code = ("import sys, tandem.models.user_tower, tandem.models.ann; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_step_budget_bounds_training_whatever_the_rows():
    """``fit_minibatches``' ``max_steps`` cuts the epochs (mid-epoch if need be): a nightly fit
    costs the budget's steps, not epochs x rows / batch; no budget runs every epoch."""
    import torch

    from tandem.models.two_tower import fit_minibatches

    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    seen: list[int] = []

    def batch_loss(idx):
        seen.append(len(idx))
        return ((w - 1.0) ** 2).sum()

    rng = np.random.default_rng(0)
    losses = fit_minibatches(opt, 1_000, 5, 100, rng, batch_loss, max_steps=23)
    assert len(seen) == 23 and len(losses) == 3  # two full epochs and a cut third
    seen.clear()
    assert len(fit_minibatches(opt, 1_000, 5, 100, rng, batch_loss)) == 5 and len(seen) == 50
    # the model's config carries the budget into the fit
    small = train_two_tower(*_budget_world(), cfg=TwoTowerConfig(
        dim=8, hidden=8, history_len=4, epochs=50, batch_size=16, n_sampled_negatives=8,
        num_threads=1, max_steps=7))
    assert len(small.loss_history) == 1  # 7 steps < one epoch of the world's rows


def _budget_world() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"user_idx": rng.integers(0, 20, 200),
                          "item_idx": rng.integers(0, 30, 200), "ts": np.arange(200)})
    return frame, np.eye(30, dtype=np.float32)
