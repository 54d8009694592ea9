"""Seeded popularity-smoothed negative sampling that gives the same draws on every re-run.

Why hashing instead of ``rand(seed)``: Spark's ``rand`` depends on how rows are partitioned, so a
re-run on another cluster (or after a shuffle change) would sample differently. Here
``h(d) = xxhash64(seed, salt, key, d) mod 2^53 / 2^53`` is uniform in [0, 1) and a pure function
of its inputs. Items are weighted ``popularity(item) ** alpha`` (word2vec's smoothing: alpha = 1
is popularity, alpha = 0 uniform over the items seen); the CDF (items sorted by id) is built on
the driver with numpy. The inverse-CDF lookup is pure Spark (no Python workers): [0, 1) is cut
into ``cells`` equal cells (one per item, at least 1024), a table lists for each cell the items
whose CDF interval ``[lo, hi)`` overlaps it (about ``2 x n_items`` rows, ~100 MB at 1M items), and
a draw ``u`` is equi-joined on its cell and kept on the one row with ``lo <= u < hi``; exact, and
about two candidates per draw. The table is always broadcast, so the draws are never shuffled
(the item count it may hold is bounded by the driver's budget, ``tandem.spark.driver``).

Each anchor makes ``n = ratio * oversample`` draws, stratified: draw ``d`` takes
``u = (d + h(d)) / n``, so every draw is still distributed exactly by the weights over all ``d``
while the draws spread over the whole CDF (a very popular item fills about its share of the ``n``
strata instead of crowding out the rest). Draws on the user's positives and repeated items are
dropped, and ``ratio`` of the rest are kept in a second hashed (random) order, which also becomes
``k``. Fewer than ``ratio`` come back only when the user's positives cover almost all the mass.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from tandem import schema as s
from tandem.spark.tables import DRAW

_TWO_53 = 2**53


def hash_uniform(seed: int, salt: str, *cols: str) -> Column:
    """A uniform [0, 1) double per row from a hash of (seed, salt, cols): seeded, stable."""
    h = F.xxhash64(F.lit(seed), F.lit(salt), *[F.col(c) for c in cols])
    return F.pmod(h, F.lit(_TWO_53)).cast("double") / float(_TWO_53)


def smoothed_cdf(counts: pd.DataFrame, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(items sorted by id, cumulative probability [n_items]) from ``item_id``, ``count`` rows."""
    counts = counts[counts["count"] > 0].sort_values(s.ITEM_ID)
    weights = counts["count"].to_numpy(dtype=np.float64) ** alpha
    cdf = np.cumsum(weights) / weights.sum() if len(weights) else weights
    return counts[s.ITEM_ID].to_numpy(dtype=object), cdf


def cdf_cells(items: np.ndarray, cdf: np.ndarray, cells: int) -> pd.DataFrame:
    """The lookup table: one row per (cell, item overlapping it): _cell, item_id, _lo, _hi."""
    hi = cdf.astype(np.float64).copy()
    hi[-1] = 1.0
    lo = np.r_[0.0, hi[:-1]]
    first = np.floor(lo * cells).astype(np.int64)
    last = np.maximum(np.minimum(np.floor(hi * cells).astype(np.int64), cells - 1), first)
    span = last - first + 1
    idx = np.repeat(np.arange(len(items)), span)
    offset = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
    return pd.DataFrame({"_cell": first[idx] + offset, s.ITEM_ID: items[idx],
                         "_lo": lo[idx], "_hi": hi[idx]})


def sample_negatives(anchors: DataFrame, key: str, exclude: DataFrame, counts: pd.DataFrame,
                     ratio: int, alpha: float, seed: int, salt: str,
                     oversample: int = 4) -> DataFrame:
    """Up to ``ratio`` negative items per anchor row.

    Parameters
    ----------
    anchors : one row per positive: ``key`` (unique string id) and ``user_id``.
    exclude : (user_id, item_id) pairs never to return (the users' positives).
    counts : pandas ``item_id``, ``count``: the popularity the sampler smooths.
    salt : separates samplers that share keys (e.g. "retrieval", "ranking").

    Returns
    -------
    DataFrame of ``key``, ``user_id``, ``item_id`` (the negative), ``k`` (0..ratio-1, draw order).
    """
    items, cdf = smoothed_cdf(counts, alpha)
    if len(items) == 0 or ratio <= 0:
        return anchors.select(key, s.USER_ID, F.lit(None).cast("string").alias(s.ITEM_ID),
                              F.lit(None).cast("int").alias(DRAW)).limit(0)
    n, cells = ratio * oversample, max(1024, len(items))
    table = anchors.sparkSession.createDataFrame(cdf_cells(items, cdf, cells))
    u = (F.col("_draw") + hash_uniform(seed, salt, key, "_draw")) / n
    draws = (anchors.select(key, s.USER_ID,
                            F.explode(F.sequence(F.lit(0), F.lit(n - 1))).alias("_draw"))
             .select(key, s.USER_ID, u.alias("_u"), F.floor(u * cells).alias("_cell"),
                     hash_uniform(seed, salt + "/order", key, "_draw").alias("_order"))
             .join(F.broadcast(table), "_cell")
             .where((F.col("_u") >= F.col("_lo")) & (F.col("_u") < F.col("_hi")))
             .join(exclude.select(s.USER_ID, s.ITEM_ID), [s.USER_ID, s.ITEM_ID], "left_anti")
             .groupBy(key, s.USER_ID, s.ITEM_ID).agg(F.min("_order").alias("_order")))
    order = Window.partitionBy(key).orderBy("_order", s.ITEM_ID)
    return (draws.withColumn(DRAW, (F.row_number().over(order) - 1).cast("int"))
            .where(F.col(DRAW) < ratio).drop("_order"))
