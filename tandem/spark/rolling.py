"""Window sums over hourly partials, rolled forward from a stored state, changed rows only.

``jobs/build_features.py`` keeps, per entity, counts over trailing windows (1h, 24h, 7d, the
lookback). Re-summing every window from the events at every snapshot reads the whole lookback
each run; this module rolls them forward instead.

A *partial* is one row per (key, hour ``a``) of additive integer columns plus columns combined
by ``max``. A snapshot at ``T`` sums, for a window of span ``W``, the partials with
``T - W <= a < T``. Each partial row becomes *points*:

- ``+values`` of every window at the first snapshot after ``a`` (it enters), and
- ``-values`` of window ``W`` at the first snapshot after ``a + W`` (it leaves ``W``).

A running sum of the points per key, ordered by snapshot and started from the state stored at
``base`` (the previous run's last snapshot), gives every window at every snapshot where the key
has points. The values are integers, so subtraction is exact: new = previous + what entered -
what left, equal to a full re-summation. A key without points in a run keeps its values, so only
keys with points can change their windows; :func:`changed` finds the rows that differ from the
key's previous one.

Cost: the points of a run whose snapshots lie in ``(base, last]`` come from the partials of
``[base, last)`` (entering) and of ``[base - W, last - W)`` per window (leaving): the run's own
hours plus one slice per window, never the history (:func:`needed`). Without a base (the first
run, a backfill) the partials of ``[first - max W, last)`` are read once.

Snapshots are evenly spaced (``first, first + step, ..., last``), as
``jobs.build_features.snapshot_times`` makes them, so "the first snapshot after ``x``" is
arithmetic (:meth:`Snapshots.after`), not a join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

SNAP = "snap_ms"  # snapshot time, epoch ms
HOUR_MS = "hour_ms"  # a partial's hour, epoch ms


@dataclass(frozen=True)
class Span:
    """A trailing window: partial ``columns`` summed over ``ms`` before a snapshot, stored as
    ``<column>_<name>``."""

    name: str
    ms: int
    columns: tuple[str, ...]

    def out(self, column: str) -> str:
        return f"{column}_{self.name}"


@dataclass(frozen=True)
class Rollup:
    """What is rolled per ``key``: windowed sums (``spans``) and running maxima (``maxima``,
    partial columns combined by ``max`` over every partial ever rolled; they never leave)."""

    key: str
    spans: tuple[Span, ...]
    maxima: tuple[str, ...] = ()

    @property
    def sums(self) -> list[str]:
        return [span.out(c) for span in self.spans for c in span.columns]

    @property
    def values(self) -> list[str]:
        """The state's value columns: every windowed sum, then the maxima."""
        return [*self.sums, *self.maxima]

    @property
    def longest(self) -> int:
        return max(span.ms for span in self.spans)


@dataclass(frozen=True)
class Snapshots:
    """Snapshot times ``first, first + step, ..., last`` (epoch ms)."""

    first: int
    last: int
    step: int

    def after(self, at: Column) -> Column:
        """The first snapshot later than ``at`` (beyond ``last`` when there is none)."""
        k = F.when(at < self.first, F.lit(0)).otherwise(F.floor((at - self.first) / self.step) + 1)
        return (F.lit(self.first) + k * F.lit(self.step)).cast("long")


def needed(rollup: Rollup, snaps: Snapshots, base: int | None) -> list[tuple[int, int]]:
    """The ``[start, end)`` hour ranges (epoch ms) of partials a run reads."""
    if base is None:
        return [(snaps.first - rollup.longest, snaps.last)]
    return [(base, snaps.last)] + [(base - span.ms, snaps.last - span.ms) for span in rollup.spans]


def _project(rows: DataFrame, rollup: Rollup, snap: Column, leaving: Span | None) -> DataFrame:
    """Points of ``rows`` at ``snap``: every window entering, or window ``leaving`` leaving."""
    sums = [(F.col(c) if leaving is None else -F.col(c) if span is leaving else F.lit(0))
            .cast("long").alias(span.out(c)) for span in rollup.spans for c in span.columns]
    maxima = [(F.col(m) if leaving is None else F.lit(None)).cast("long").alias(m)
              for m in rollup.maxima]
    return rows.select(rollup.key, snap.alias(SNAP), *sums, *maxima)


def points(partials: DataFrame, rollup: Rollup, snaps: Snapshots, base: int | None) -> DataFrame:
    """Per (key, snapshot in ``(base, last]``) the change of every value: what entered minus
    what left. ``partials`` has ``key``, ``HOUR_MS`` and the rolled columns (the hours of
    :func:`needed` at least; more are harmless)."""
    hour = F.col(HOUR_MS)
    entering = partials if base is None else partials.where(hour >= base)
    frames = [_project(entering, rollup, snaps.after(hour), None)]
    for span in rollup.spans:
        left = hour + span.ms
        leaving = partials if base is None else partials.where(left >= base)
        frames.append(_project(leaving, rollup, snaps.after(left), span))
    union = reduce(DataFrame.unionByName, frames).where(F.col(SNAP) <= snaps.last)
    return union.groupBy(rollup.key, SNAP).agg(*(F.sum(c).alias(c) for c in rollup.sums),
                                               *(F.max(m).alias(m) for m in rollup.maxima))


def roll(rollup: Rollup, deltas: DataFrame, state: DataFrame | None, base: int | None,
         touched: DataFrame, carry: Sequence[str] = ()) -> DataFrame:
    """Running values per (key, snapshot), the base rows (``SNAP = base``) included.

    ``deltas`` are :func:`points`; ``state`` the values at ``base`` (key, ``rollup.values`` and
    the ``carry`` columns, which only base rows have; none without a state); ``touched`` (key,
    ``SNAP``) rows add a row without changes (so a key can be compared there).
    """
    zeros = [F.lit(0).cast("long").alias(c) for c in rollup.sums]
    nulls = [F.lit(None).cast("long").alias(m) for m in rollup.maxima]
    frames = [deltas, touched.select(rollup.key, F.col(SNAP).cast("long").alias(SNAP), *zeros,
                                     *nulls)]
    if state is None:
        carry = ()
    else:
        frames.append(state.select(rollup.key, F.lit(base).cast("long").alias(SNAP),
                                   *rollup.values, *carry))
    rows = (reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
            .groupBy(rollup.key, SNAP)
            .agg(*(F.sum(c).alias(c) for c in rollup.sums),
                 *(F.max(m).alias(m) for m in rollup.maxima),
                 *(F.first(c, ignorenulls=True).alias(c) for c in carry)))
    running = (Window.partitionBy(rollup.key).orderBy(SNAP)
               .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    return rows.select(rollup.key, SNAP, *carry,
                       *(F.sum(c).over(running).alias(c) for c in rollup.sums),
                       *(F.max(m).over(running).alias(m) for m in rollup.maxima))


def changed(key: str, columns: Sequence[str]) -> Column:
    """True where a row's ``columns`` differ from its key's previous row (or it has none)."""
    values = F.struct(*columns)
    before = F.lag(values).over(Window.partitionBy(key).orderBy(SNAP))
    return before.isNull() | ~values.eqNullSafe(before)


def latest(timeline: DataFrame, key: str) -> DataFrame:
    """Each key's last row of a :func:`roll` timeline: its values at the run's last snapshot."""
    last = F.max(SNAP).over(Window.partitionBy(key))
    return timeline.withColumn("_last", last).where(F.col(SNAP) == F.col("_last")).drop("_last")
