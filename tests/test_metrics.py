"""Metrics on hand-written frames: perfect lists, no hits, and pinned values."""

import math

import numpy as np
import pandas as pd
import pytest

from tandem.evaluation import metrics as M

# user a: relevant x, y, z (3); user b: relevant w (1)
TRUE = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["x", "y", "z", "w"]})
# a's top-3 by prediction: x (hit, rank 1), q (miss), y (hit, rank 3); b's: p (miss), w (hit, 2)
PRED = pd.DataFrame({
    "user_id": ["a", "a", "a", "a", "b", "b"],
    "item_id": ["x", "q", "y", "r", "p", "w"],
    "prediction": [0.9, 0.8, 0.7, 0.1, 0.9, 0.5],
})
PERFECT = TRUE.assign(prediction=1.0)
NO_HITS = pd.DataFrame({"user_id": ["a", "b"], "item_id": ["q", "p"], "prediction": [1.0, 1.0]})


def _dcg(ranks):
    return sum(1 / math.log2(r + 1) for r in ranks)


PINNED_K3 = {
    "precision_at_k": (2 / 3 + 1 / 3) / 2,
    "recall_at_k": (2 / 3 + 1 / 1) / 2,
    "ndcg_at_k": (_dcg([1, 3]) / _dcg([1, 2, 3]) + _dcg([2]) / _dcg([1])) / 2,
    "map_at_k": ((1 / 1 + 2 / 3) / 3 + (1 / 2) / 1) / 2,
    "mrr_at_k": (1 / 1 + 1 / 2) / 2,
    "hit_rate_at_k": 1.0,
}


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_pinned_values(name):
    assert M.METRICS[name](TRUE, PRED, k=3) == pytest.approx(PINNED_K3[name])


@pytest.mark.parametrize("name", sorted(M.METRICS))
def test_no_hits_is_zero(name):
    assert M.METRICS[name](TRUE, NO_HITS, k=3) == 0.0


@pytest.mark.parametrize("name", ["recall_at_k", "ndcg_at_k", "map_at_k", "mrr_at_k",
                                  "hit_rate_at_k"])
def test_perfect_is_one(name):
    assert M.METRICS[name](TRUE, PERFECT, k=3) == pytest.approx(1.0)


def test_precision_cannot_reach_one_with_fewer_relevant_than_k():
    # a has 3 relevant, b has 1: perfect lists give (3/3 + 1/3) / 2 at k=3
    assert M.precision_at_k(TRUE, PERFECT, k=3) == pytest.approx((1 + 1 / 3) / 2)


def test_k_cuts_the_list():
    # at k=1: a hits x at rank 1, b misses (p)
    assert M.ndcg_at_k(TRUE, PRED, k=1) == pytest.approx(0.5)
    assert M.recall_at_k(TRUE, PRED, k=1) == pytest.approx((1 / 3 + 0) / 2)


def test_users_without_predictions_count_zero_and_extra_users_are_ignored():
    pred = pd.concat([PRED[PRED.user_id == "a"],
                      pd.DataFrame({"user_id": ["c"], "item_id": ["x"], "prediction": [1.0]})])
    only_a = M.hit_rate_at_k(TRUE, pred, k=3)
    assert only_a == pytest.approx(0.5)


def test_missing_column_raises():
    with pytest.raises(M.ColumnMismatchError):
        M.ndcg_at_k(TRUE, PRED.drop(columns="prediction"))


def test_catalog_coverage():
    # top-2: a -> x, q ; b -> p, w : 4 distinct of 10
    assert M.catalog_coverage(PRED, n_items=10, k=2) == pytest.approx(0.4)


def test_intra_list_diversity():
    vectors = pd.DataFrame({"g1": [1.0, 1.0, 0.0, 1.0], "g2": [0.0, 0.0, 1.0, 1.0]},
                           index=["x", "q", "p", "w"])
    # a's top-2 (x, q) identical -> distance 0; b's (p, w): cos = 1/sqrt(2) -> 1 - 0.7071
    expected = (0.0 + (1 - 1 / math.sqrt(2))) / 2
    assert M.intra_list_diversity(PRED, vectors, k=2) == pytest.approx(expected)


def test_novelty():
    train = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "item_id": ["x", "x", "q", "p"]})
    # top-1: a -> x (p=2/4, 1 bit), b -> p (p=1/4, 2 bits)
    assert M.novelty(PRED, train, k=1) == pytest.approx(1.5)
    # an item never seen in training gets p = 1/n_users
    pred = pd.DataFrame({"user_id": ["a"], "item_id": ["new"], "prediction": [1.0]})
    assert M.novelty(pred, train, k=1) == pytest.approx(np.log2(4))


def test_metric_registry_names():
    assert set(M.METRICS) == {"precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k",
                              "mrr_at_k", "hit_rate_at_k"}
    assert set(M.BEYOND_ACCURACY) == {"catalog_coverage", "intra_list_diversity", "novelty",
                                      "serendipity"}


def test_serendipity():
    # hits at k=3: a -> x, y; b -> w. The primitive's top-3: a -> y, z, q; b -> p, w.
    # a: x is relevant and unexpected, y relevant but expected -> 1/3; b: w expected -> 0
    primitive = pd.DataFrame({"user_id": ["a", "a", "a", "a", "b", "b"],
                              "item_id": ["y", "z", "q", "x", "p", "w"],
                              "prediction": [4.0, 3.0, 2.0, 1.0, 2.0, 1.0]})
    assert M.serendipity(TRUE, PRED, primitive, k=3) == pytest.approx((1 / 3 + 0) / 2)
    # at k=4 the primitive's list reaches x too: nothing is unexpected for a either
    assert M.serendipity(TRUE, PRED, primitive, k=4) == 0.0
    # an empty primitive model leaves precision: every hit is unexpected
    empty = primitive.iloc[:0]
    assert M.serendipity(TRUE, PRED, empty, k=3) == pytest.approx(M.precision_at_k(TRUE, PRED, 3))
    assert M.serendipity(TRUE, PRED, PRED, k=3) == 0.0
