"""LightGBM lambdarank helpers: groups, negative sampling, a learnable toy signal, save/load."""

import numpy as np

from tandem.features.ranking_features import FEATURE_NAMES
from tandem.models import ranker as R


def test_group_sizes_of_contiguous_keys():
    assert R.group_sizes(np.array([3, 3, 1, 1, 1, 7])).tolist() == [2, 3, 1]
    assert R.group_sizes(np.array([])).tolist() == []


def test_sample_negatives_keeps_every_positive_and_is_seeded():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0] * 50)
    a = R.sample_negatives(labels, 0.25, seed=1)
    assert a[labels == 1].all()
    assert 0.1 < a[labels == 0].mean() < 0.4
    np.testing.assert_array_equal(a, R.sample_negatives(labels, 0.25, seed=1))
    assert R.sample_negatives(labels, 1.0, seed=1).all()


def test_ranker_learns_a_feature_that_marks_positives(tmp_path):
    rng = np.random.default_rng(0)
    n_groups, size = 60, 20
    X = rng.standard_normal((n_groups * size, len(FEATURE_NAMES))).astype(np.float32)
    y = (X[:, 0] > 1.0).astype(np.int32)  # column 0 decides relevance
    groups = np.repeat(np.arange(n_groups), size)
    cfg = {**R.RANKER_CONFIG, "n_estimators": 20, "min_child_samples": 5}
    model = R.train_ranker(X, y, groups, cfg)
    scores = R.predict(model, X)
    # AUC of positives vs negatives (Mann-Whitney on ranks): near 1 when column 0 was learnt
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    auc = (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auc > 0.95
    R.save(model, tmp_path / "ranker" / "model.txt")
    np.testing.assert_allclose(R.predict(R.load(tmp_path / "ranker" / "model.txt"), X), scores)


def test_training_rows_keep_explicit_negatives_and_drop_groups_without_positives():
    groups = np.repeat([1, 2, 3], 6)
    labels = np.array([1, 0, 0, 0, 0, 0] * 2 + [0] * 6)
    explicit = np.array([0, 1, 1, 0, 0, 0] * 3, dtype=bool)
    keep = R.training_rows(labels, explicit, groups, rate=0.0, seed=1)
    # group 3 has no positive: dropped, its explicit negatives too
    assert keep.tolist() == [True, True, True, False, False, False] * 2 + [False] * 6
    some = R.training_rows(labels, explicit, groups, rate=0.5, seed=1)
    assert (some >= keep).all() and not some[12:].any()
