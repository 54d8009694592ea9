"""tandem.spark.io: the atomic partition swap never leaves a partition missing, re-runs replace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tandem import schema as s

pytestmark = pytest.mark.spark

H0 = datetime(2024, 1, 1, 10, tzinfo=UTC)
H2 = H0 + timedelta(hours=2)


def _frame(spark, tag: str, hours=(10, 11)):
    rows = [(f"{tag}-{h}-{k}", "2024-01-01", h) for h in hours for k in range(3)]
    return spark.createDataFrame(rows, f"{s.EVENT_ID} string, {s.DATE} string, {s.HOUR} int")


def _ids(spark, root) -> dict[int, set[str]]:
    """hour -> the ids the table holds now (what any reader of the table would see)."""
    out: dict[int, set[str]] = {}
    for r in spark.read.parquet(str(root)).collect():
        out.setdefault(r.hour, set()).add(r.event_id)
    return out


def _old_and_new(spark, root):
    from tandem.spark.io import overwrite_interval

    overwrite_interval(_frame(spark, "old"), root, H0, H2)
    return _ids(spark, root)


def test_rerun_replaces_the_interval_and_empty_partitions_go(spark, tmp_path):
    from tandem.spark.io import SWAP_PREFIX, overwrite_interval

    root = tmp_path / "t"
    old = _old_and_new(spark, root)
    assert {h: len(v) for h, v in old.items()} == {10: 3, 11: 3}
    overwrite_interval(_frame(spark, "new", hours=(11,)), root, H0, H2)
    assert _ids(spark, root) == {11: {f"new-11-{k}" for k in range(3)}}
    assert not list(root.glob(f"{SWAP_PREFIX}*"))  # the staging folder is gone after a swap


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_an_exception_between_renames_puts_the_old_partitions_back(spark, tmp_path,
                                                                   monkeypatch, fail_at):
    """Renames: hour 10 aside (1), new hour 10 in (2), hour 11 aside (3): fail at each."""
    from tandem.spark import io

    root = tmp_path / "t"
    old = _old_and_new(spark, root)
    real, calls = io.rename, []

    def flaky(spark_, src, dst):
        calls.append(src)
        if len(calls) == fail_at:
            raise OSError("disk went away")
        real(spark_, src, dst)

    monkeypatch.setattr(io, "rename", flaky)
    with pytest.raises(OSError, match="went away"):
        io.overwrite_interval(_frame(spark, "new"), root, H0, H2)
    monkeypatch.setattr(io, "rename", real)
    assert _ids(spark, root) == old  # every partition is there, with its old rows


def test_a_writer_killed_mid_swap_is_repaired_by_the_next_write(spark, tmp_path, monkeypatch):
    """A killed process runs no rollback: the next write finds every partition restored."""
    from tandem.spark import io

    root = tmp_path / "t"
    old = _old_and_new(spark, root)
    real, calls = io.rename, []

    class Killed(BaseException):
        pass

    def dies(spark_, src, dst):  # the process dies after moving hour 10 aside
        calls.append(src)
        if len(calls) >= 2:
            raise Killed
        real(spark_, src, dst)

    monkeypatch.setattr(io, "rename", dies)
    monkeypatch.setattr(io, "delete", lambda *a: None)  # ... and the rollback never ran
    monkeypatch.setattr(io, "_swap_rollback", lambda *a: None)
    with pytest.raises(Killed):
        io.overwrite_interval(_frame(spark, "new"), root, H0, H2)
    monkeypatch.undo()
    assert 10 not in _ids(spark, root)  # the hole a killed writer leaves ...
    assert io.recover_swaps(spark, root) == 1  # ... which the next writer closes first
    assert _ids(spark, root) == old
    assert not list(root.glob(f"{io.SWAP_PREFIX}*"))


def test_a_write_that_fails_before_the_swap_touches_nothing(spark, tmp_path):
    from pyspark.sql import functions as F

    from tandem.spark.io import overwrite_interval

    root = tmp_path / "t"
    old = _old_and_new(spark, root)
    boom = _frame(spark, "new").withColumn(
        s.EVENT_ID, F.when(F.col(s.HOUR) == 11, F.raise_error("task died")).otherwise("x"))
    with pytest.raises(Exception, match="task died"):
        overwrite_interval(boom, root, H0, H2)
    assert _ids(spark, root) == old


def test_a_small_write_of_many_partitions_uses_every_core_and_one_file_each(spark, tmp_path):
    """Rebalanced by partition, a few MB over 48 hours is not coalesced to one writer task (the
    default 1 MB minimum did that), and each hour still gets one file."""
    from pyspark.sql import functions as F

    from tandem.spark.io import overwrite_interval

    n = 48 * 200
    digest = F.sha2(F.col("id").cast("string"), 256)  # ~2 MB that the shuffle cannot compress
    df = spark.range(n).select(
        F.concat(digest, F.sha2(digest, 256), F.sha2(F.sha2(digest, 256), 256)).alias(s.EVENT_ID),
        F.concat(F.lit("2024-01-0"), (1 + F.col("id") % 48 / 24).cast("int").cast("string"))
        .alias(s.DATE), (F.col("id") % 24).cast("int").alias(s.HOUR))
    day = H0.replace(hour=0)
    overwrite_interval(df, tmp_path, day, day + timedelta(days=2), sort_by=[s.EVENT_ID])
    files = list(tmp_path.glob("date=*/hour=*/*.parquet"))
    assert len(files) == 48  # one file per hour
    writers = {f.name.split("-")[1] for f in files}  # part-<task partition>-<uuid>...
    assert len(writers) == spark.sparkContext.defaultParallelism == 2
    assert spark.read.parquet(str(tmp_path)).distinct().count() == n
