"""The hourly new-item embedding: items created after the nightly build get content vectors from
the bundle's item tower, filed as a digest-checked delta next to the bundle."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from jobs import embed_new_items as job
from tandem import schema as s
from tandem.models import bundle as B
from tandem.models.synthetic_bundle import NOW_MS, SyntheticSpec, build
from tandem.models.user_tower import UserTower

SPEC = SyntheticSpec(n_items=300, n_users=200, n_als_users=100, n_clusters=8, n_trees=20,
                     n_train_groups=50, group_size=20)
END = datetime.fromtimestamp(NOW_MS / 1000 + 3600, tz=UTC)  # one hour after the build


def nightly_with_new_items(paths, tmp_path):
    """A nightly bundle under <models>/20260101 and a lake catalog holding its items plus two
    created after the build (one of them after ``END``: not yet in the hour)."""
    built, _ = build(tmp_path / "synthetic", SPEC)
    bundle_dir = paths.models / "20260101"
    shutil.copytree(built, bundle_dir)
    items = pd.read_parquet(bundle_dir / B.ITEMS)
    catalog = pd.DataFrame({
        s.ITEM_ID: [*items[s.ITEM_ID], "new-horror", "new-later"],
        s.GENRES: [["Drama"]] * len(items) + [["Horror", "Thriller"], ["Comedy"]],
        s.RELEASE_YEAR: [1990] * len(items) + [2026, 2026],
        s.CREATED_AT: [*items[s.CREATED_AT], NOW_MS + 60_000, NOW_MS + 7_200_000],
    })
    paths.items.mkdir(parents=True)
    catalog.to_parquet(paths.items / "part-0.parquet", index=False)
    return bundle_dir


def test_new_items_get_item_tower_vectors_in_a_delta(paths, tmp_path):
    bundle_dir = nightly_with_new_items(paths, tmp_path)
    out = job.run(None, paths, END, END)
    key = B.bundle_key(bundle_dir)
    assert out == {"bundles": {key: {"bundle": "20260101", "new_items": 1}},
                   "stamp": END.strftime("%Y%m%dT%H")}
    folder = paths.models / B.DELTAS / key
    assert B.ItemDelta.latest_stamp(folder) == out["stamp"]
    delta = B.ItemDelta.load(folder, out["stamp"])
    assert delta.item_ids.tolist() == ["new-horror"]
    assert delta.created_at.tolist() == [NOW_MS + 60_000]
    # exactly the content-only path of the bundle's item tower
    tower = UserTower.load(bundle_dir / B.TT_USER_TOWER, np.zeros((0, 0), np.float32))
    expected = tower.encode_items(tower.item_spec.encode([["Horror", "Thriller"]], [2026]))
    np.testing.assert_allclose(delta.vectors, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(delta.vectors, axis=1), 1.0, rtol=1e-5)
    # a re-run rewrites the same delta; a later hour's is cumulative
    assert job.run(None, paths, END, END) == out
    later = datetime.fromtimestamp(NOW_MS / 1000 + 3 * 3600, tz=UTC)
    job.run(None, paths, END, later)
    stamp = B.ItemDelta.latest_stamp(folder)
    assert stamp == later.strftime("%Y%m%dT%H")
    assert B.ItemDelta.load(folder, stamp).item_ids.tolist() == ["new-horror", "new-later"]


def test_a_tampered_delta_is_refused_and_no_bundle_means_no_work(paths, tmp_path):
    assert job.run(None, paths, END, END)["bundles"] == {}
    bundle_dir = nightly_with_new_items(paths, tmp_path)
    stamp = job.run(None, paths, END, END)["stamp"]
    folder = paths.models / B.DELTAS / B.bundle_key(bundle_dir)
    npz = folder / f"items-{stamp}.npz"
    npz.write_bytes(npz.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        B.ItemDelta.load(folder, stamp)


def test_serving_appends_a_delta_and_skips_a_bad_one(paths, tmp_path):
    from serving import item_deltas
    from tandem.models.ann import build_index

    bundle_dir = nightly_with_new_items(paths, tmp_path)
    deltas = paths.models / B.DELTAS
    known = pd.Index(pd.read_parquet(bundle_dir / B.ITEMS)[s.ITEM_ID].astype(str))
    assert item_deltas.load(bundle_dir, deltas, known) is None  # none filed yet
    stamp = job.run(None, paths, END, END)["stamp"]
    delta = item_deltas.load(bundle_dir, deltas, known)
    assert delta.stamp == stamp and delta.item_ids.tolist() == ["new-horror"]
    # two-tower: vectors appended and searchable under the next catalog row
    vectors = np.load(bundle_dir / B.TT_ITEM_VECTORS)
    index = build_index(vectors, metric="ip")
    n = len(known) + 1
    extended = item_deltas.extend_vectors(vectors, delta, n)
    item_deltas.add_to_index(index, delta, len(vectors), vectors.shape[1])
    assert extended.shape == (n, vectors.shape[1])
    np.testing.assert_array_equal(extended[-1], delta.vectors[0])
    assert index.search(delta.vectors, 1)[1][0, 0] == n - 1
    # ALS-only: zero rows; the new item's factors are zero until the next nightly fit
    als = item_deltas.pad_rows(np.ones((len(known), 4), np.float32), n)
    np.testing.assert_array_equal(als[-1], 0.0)
    no_vectors = B.ItemDelta(stamp, delta.item_ids, delta.created_at, np.zeros((1, 0)))
    np.testing.assert_array_equal(item_deltas.extend_vectors(als[:-1], no_vectors, n), als)
    # a delta whose bytes do not match its digest is skipped: the bundle serves as built
    npz = deltas / B.bundle_key(bundle_dir) / f"items-{stamp}.npz"
    npz.write_bytes(npz.read_bytes()[:-8] + b"\0" * 8)
    assert item_deltas.load(bundle_dir, deltas, known) is None
