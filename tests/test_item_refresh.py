"""Serving's Feast item table follows a materialization without a restart (a real Feast repo,
SQLite online store): a changed popularity shows up after the watcher's next poll."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from serving.item_refresh import MaterializationWatcher
from tandem.config import Paths
from tandem.features import entity as F
from tandem.features import feature_store as fs
from tandem.features import online as FO
from tests.test_feature_store import ITEMS, T0, T1, item_row, snapshot_folder, write_features

pytestmark = pytest.mark.feast

T2 = T1 + pd.Timedelta(hours=1)


def test_item_table_refreshes_after_a_materialization(tmp_path):
    paths = Paths(tmp_path)
    write_features(paths)
    store = fs.apply(paths)
    assert fs.materialization_watermark(store) is None
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T1.to_pydatetime(), store)
    watcher = MaterializationWatcher(lambda: fs.materialization_watermark(store), 0.05)
    table = watcher.track(lambda ids: FO.ItemFeatureTable(store, ids))(np.array(ITEMS))
    pop = F.ITEM_FEATURES.index("item_log_pop_total")
    before = table.static[:, pop].copy()
    assert watcher.poll_once() == 0  # nothing new materialized: no reload
    # the hourly job: i2 became ten times as popular, materialized an hour later
    row = {**item_row(2, T2), "item_pop_total": 80}
    pd.DataFrame([row]).to_parquet(snapshot_folder(paths.item_features, T2) / "part-1.parquet",
                                   index=False)
    fs.materialize(paths, T1.to_pydatetime(), T2.to_pydatetime(), store)
    assert fs.materialization_watermark(store) == T2.timestamp()
    watcher.start()
    try:
        deadline = pd.Timestamp.now() + pd.Timedelta(seconds=30)
        while watcher.refreshes == 0 and pd.Timestamp.now() < deadline:
            watcher._stop.wait(0.05)
    finally:
        watcher.stop()
    after = table.static[:, pop]
    assert watcher.refreshes == 1
    assert after[2] == pytest.approx(np.log1p(80)) and before[2] == pytest.approx(np.log1p(8))
    np.testing.assert_array_equal(np.delete(after, 2), np.delete(before, 2))


def test_shared_item_table_is_read_once_per_materialization_and_mapped(tmp_path):
    """Two server processes' tables (``SharedItemTable``) over one catalog: the first reads the
    online store and writes the arrays, the second maps them without a read; both answer like
    ``ItemFeatureTable`` (an id without a row too). After a materialization the first refresh
    reads once more and deletes the old files, which the second still maps until it moves."""
    from serving.item_table import SharedItemTable
    from serving.shared_memory import is_mapped

    paths = Paths(tmp_path / "home")
    write_features(paths)
    store = fs.apply(paths)
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T1.to_pydatetime(), store)
    reads = []

    def read(ids):
        reads.append(len(ids))
        return FO.ItemFeatureTable(store, ids)

    def watermark():
        return fs.materialization_watermark(store)

    ids = np.array([*ITEMS, "not-in-the-store"])
    folder = tmp_path / "derived"
    first = SharedItemTable(read, watermark, ids, folder)
    second = SharedItemTable(read, watermark, ids, folder)
    assert reads == [len(ids)]
    control = FO.ItemFeatureTable(store, ids)
    for got, want in zip((first.table.static, first.table.last_event_ts, first.table.created_at),
                         control.arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    rows = np.array([len(ITEMS), 2, 0, 2])
    np.testing.assert_array_equal(second.take(rows, T1.value // 10**6),
                                  control.take(rows, T1.value // 10**6))
    assert is_mapped(first.static) and is_mapped(second.static)
    files = sorted(folder.glob("*.npy"))
    assert len(files) == 3

    pop = F.ITEM_FEATURES.index("item_log_pop_total")
    row = {**item_row(2, T2), "item_pop_total": 80}
    pd.DataFrame([row]).to_parquet(snapshot_folder(paths.item_features, T2) / "part-1.parquet",
                                   index=False)  # the date=/hour= layout build_features writes
    fs.materialize(paths, T1.to_pydatetime(), T2.to_pydatetime(), store)
    first.refresh()
    assert reads == [len(ids)] * 2 and first.static[2, pop] == pytest.approx(np.log1p(80))
    assert not any(f.exists() for f in files)  # the old watermark's files are gone ...
    assert second.static[2, pop] == pytest.approx(np.log1p(8))  # ... still mapped here
    second.refresh()
    assert reads == [len(ids)] * 2 and second.static[2, pop] == pytest.approx(np.log1p(80))
    assert len(list(folder.glob("*.npy"))) == 3
