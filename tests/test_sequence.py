"""The session sequence model: it learns a next-item pattern, it is causal, and the numpy
runtime serving runs computes what the torch model trained."""

import numpy as np
import pytest
import torch

from tandem.models.sequence import PAD, SequenceEncoder, right_aligned
from tandem.models.sequence_train import SequenceConfig, train_sequence, training_rows

N_ITEMS = 30
SMALL = SequenceConfig(dim=16, max_len=10, epochs=15, lr=3e-3, batch_size=64)


def _cycles(n_users: int = 200, seed: int = 0):
    """Each user walks the catalog in a cycle (item i is followed by i + 1 mod N) from a random
    start for 5..20 steps."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        start, length = rng.integers(N_ITEMS), rng.integers(5, 21)
        users += [u] * length
        items += [(start + t) % N_ITEMS for t in range(length)]
        ts += list(range(length))
    return np.array(users), np.array(items), np.array(ts)


@pytest.fixture(scope="module")
def model():
    return train_sequence(*_cycles(), N_ITEMS, SMALL)


def test_training_rows_cut_users_from_their_newest_item():
    cfg = SequenceConfig(max_len=3, max_chunks_per_user=2)
    # user 0: items 10..16 at ts 0..6 given out of order; user 1 has one item (no row)
    users = np.array([0] * 7 + [1])
    items = np.array([16, 10, 11, 12, 13, 14, 15, 5])
    ts = np.array([6, 0, 1, 2, 3, 4, 5, 0])
    rows, targets = training_rows(users, items, ts, cfg)
    assert rows.tolist() == [[13, 14, 15, 16], [PAD, 10, 11, 12]]  # newest chunk first
    assert (targets == (rows >= 0)).all()  # every item a positive: every item a target
    assert training_rows(users, items, ts, SequenceConfig(max_len=3, max_chunks_per_user=1)
                         )[0].tolist() == [[13, 14, 15, 16]]


def test_engaged_items_are_context_and_only_positives_are_targets():
    """The rows hold every engaged item (the query history serving asks with); only positive
    ones are predicted, and a chunk with no positive to predict is dropped."""
    cfg = SequenceConfig(max_len=3, max_chunks_per_user=2)
    users = np.zeros(7, np.int64)
    items, ts = np.arange(10, 17), np.arange(7)
    positive = np.array([1, 1, 0, 0, 1, 0, 1], bool)  # 12, 13, 15 engaged, not positive
    rows, targets = training_rows(users, items, ts, cfg, positive)
    assert rows.tolist() == [[13, 14, 15, 16], [PAD, 10, 11, 12]]
    assert targets.tolist() == [[False, True, False, True], [False, True, True, False]]
    only_context = np.array([1, 1, 1, 0, 0, 0, 1], bool)  # old chunk's targets are 10, 11
    rows, _ = training_rows(users, items, ts, cfg, only_context)
    assert len(rows) == 2
    none_later = np.array([1, 0, 0, 0, 0, 0, 0], bool)  # 10 is first: never a target
    assert len(training_rows(users, items, ts, cfg, none_later)[0]) == 0


def test_learns_the_next_item_far_above_chance(model):
    enc = model.encoder()
    # every start item, with the 4 items before it as history (newest first)
    hist = np.array([[(s - k) % N_ITEMS for k in range(5)] for s in range(N_ITEMS)])
    scores = enc.encode_batch(hist) @ enc.item_vectors.T
    hit_at_1 = float((scores.argmax(1) == (np.arange(N_ITEMS) + 1) % N_ITEMS).mean())
    assert hit_at_1 >= 0.8  # chance is 1/30
    assert model.loss_history[-1] < 0.5 * model.loss_history[0]


def test_output_at_t_ignores_items_after_t(model):
    enc = model.encoder()
    rng = np.random.default_rng(1)
    seq = rng.integers(0, N_ITEMS, size=(4, SMALL.max_len))
    seq[0, :3] = PAD  # a short row: left slots empty
    changed = seq.copy()
    changed[:, 6:] = rng.integers(0, N_ITEMS, size=(4, SMALL.max_len - 6))
    a, b = enc.hidden(seq), enc.hidden(changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_numpy_runtime_matches_torch(model):
    enc = model.encoder()
    rng = np.random.default_rng(2)
    seq = rng.integers(0, N_ITEMS, size=(5, SMALL.max_len))
    seq[1, :7] = PAD
    with torch.no_grad():
        expected = model.net(torch.from_numpy(seq)).numpy()
    np.testing.assert_allclose(enc.hidden(seq), expected, atol=1e-5)


def test_histories_are_right_aligned_and_short_ones_padded(model, tmp_path):
    assert right_aligned(np.array([[3, 2, 1, PAD], [5, PAD, 4, PAD]]), 3).tolist() == [
        [1, 2, 3], [PAD, 4, 5]]
    model.export(tmp_path)
    enc = SequenceEncoder.load(tmp_path / "sequence/model.npz",
                               np.load(tmp_path / "sequence/item_vectors.npy"))
    np.testing.assert_array_equal(enc.encode(np.array([4, 3, 2])),
                                  model.encoder().encode(np.array([4, 3, 2])))
    assert not enc.encode_batch(np.full((1, 5), PAD)).any()  # no history: no query


def _write_table(paths, run_id: str, users, items, ts) -> None:
    """A training table as jobs/build_training_table writes it (the columns the job reads),
    plus one impression-only pair (positive_ts and engaged_ts null) that must not enter a
    sequence."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tandem.data import lake as L

    root = paths.training(run_id)
    n_users = int(users.max()) + 1
    for folder, table in {
        L.USERS_DIR: pa.table({"user_id": [f"u{u}" for u in range(n_users)],
                               L.USER_IDX: pa.array(range(n_users), pa.int32())}),
        L.ITEMS_DIR: pa.table({"item_id": [f"m{i:02d}" for i in range(N_ITEMS)],
                               L.ITEM_IDX: pa.array(range(N_ITEMS), pa.int32())}),
        L.INTERACTIONS_DIR: pa.table({
            L.USER_IDX: pa.array([*users, 0], pa.int32()),
            L.ITEM_IDX: pa.array([*items, 0], pa.int32()),
            L.POSITIVE_TS: pa.array([*(1000 * t for t in ts), None], pa.int64()),
            L.ENGAGED_TS: pa.array([*(1000 * t for t in ts), None], pa.int64())}),
    }.items():
        (root / folder).mkdir(parents=True)
        pq.write_table(table, root / folder / "part-0.parquet")


def test_job_trains_exports_and_indexes_from_the_training_table(paths):
    from datetime import datetime

    from jobs import build_index, train_sequence
    from tandem.models import bundle as B
    from tandem.models.ann import AnnIndex

    users, items, ts = _cycles()
    _write_table(paths, "20240120", users, items, ts)
    end = datetime(2024, 1, 20)
    cfg = {"sequence": {"dim": 16, "max_len": 10, "epochs": 15, "lr": 3e-3, "batch_size": 64},
           "n_query_sample": 50}
    out = train_sequence.run(None, paths, datetime(2024, 1, 1), end, cfg)
    assert out["positives"] == len(users) and out["items"] == N_ITEMS
    # 11-item rows: one per user of <= 11 items, two for longer ones (<= 20 items)
    assert out["rows"] == 200 + int((np.bincount(users) > 12).sum())
    assert out["final_loss"] < 0.5 * np.log(N_ITEMS + 1)  # chance: log(1 + 30 negatives)
    bundle = paths.models / "20240120"
    queries = np.load(bundle / B.SEQ_QUERY_SAMPLE)
    assert queries.shape == (50, 16)
    metrics = build_index.run(None, paths, datetime(2024, 1, 1), end)
    assert metrics["sequence_items"] == N_ITEMS and metrics["sequence_recall_at_200"] == 1.0
    index = AnnIndex.load(bundle / B.INDEX_SEQUENCE)
    enc = SequenceEncoder.load(bundle / B.SEQ_MODEL, np.load(bundle / B.SEQ_ITEM_VECTORS))
    # a user who just walked 3 -> 4 -> 5 is offered 6 first, through the index
    _, ids = index.search(enc.encode(np.array([5, 4, 3])), 1)
    assert ids[0, 0] == 6
