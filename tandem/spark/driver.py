"""The one way a job brings a table to the driver: bounded, with an error that names the knob.

A driver-side step (the sampler's popularity CDF, say) is fine while its table is small (an item
table at platform scale is ~1M rows, ~50 MB in pandas); it must not silently grow into the
driver's memory as the platform grows. :func:`to_pandas_bounded` counts first and refuses past
``TANDEM_DRIVER_MAX_ROWS`` (``tandem.config.driver_max_rows``).
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame

from tandem.config import driver_max_rows


class DriverBudgetError(RuntimeError):
    """A driver-side step would collect more rows than the budget allows."""


def to_pandas_bounded(df: DataFrame, what: str, limit: int | None = None) -> pd.DataFrame:
    """``df.toPandas()`` when it has at most ``limit`` rows (default ``driver_max_rows()``)."""
    limit = driver_max_rows() if limit is None else limit
    n = df.count()
    if n > limit:
        raise DriverBudgetError(
            f"{what}: {n:,} rows would be collected to the driver, over its budget of "
            f"{limit:,}; raise TANDEM_DRIVER_MAX_ROWS (and spark.driver.memory, "
            f"SPARK_DRIVER_MEMORY) if the driver has the memory")
    return df.toPandas()
