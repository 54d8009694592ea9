"""One place that builds SparkSessions, so jobs, tests and spark-submit agree on settings."""

from __future__ import annotations

import os
from pathlib import Path

from pyspark.sql import SparkSession

from tandem.config import spark_master, spark_shuffle_partitions, spark_write_partition_bytes


def get_spark(app_name: str = "tandem", master: str | None = None,
              local_dir: Path | None = None, shuffle_partitions: int | None = None) -> SparkSession:
    """Get or create the session.

    ``master`` defaults to ``SPARK_MASTER`` (``local[*]``). Partition overwrite is *dynamic* so a
    job that writes one interval replaces exactly that interval's partitions (idempotent re-runs).
    Timestamps are UTC everywhere.

    Shuffle partitions: ``shuffle_partitions``, else ``TANDEM_SHUFFLE_PARTITIONS``, else three per
    core the cluster has (``defaultParallelism``), so a bigger cluster gets more, smaller tasks;
    adaptive execution coalesces them when the data is small and splits skewed ones. A write
    aims at ``TANDEM_WRITE_PARTITION_MB`` per task (``REBALANCE`` in ``tandem.spark.io``).
    """
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON", "python3"))
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master or spark_master())
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        .config("spark.sql.adaptive.advisoryPartitionSizeInBytes",
                str(spark_write_partition_bytes()))
        # a small write of many partitions (a backfill's thousands of hourly folders, each a
        # parquet file to open and commit) keeps one writer per core instead of being coalesced
        # to one task by the default 1 MB minimum; each partition still goes to one writer
        .config("spark.sql.adaptive.coalescePartitions.minPartitionSize", str(64 << 10))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "2g"))
        .config("spark.sql.parquet.compression.codec", "snappy")
    )
    if (master or spark_master()).startswith("local"):
        # local mode talks only to itself: keep the driver on loopback, not the host's address.
        # The lake's thousands of small hourly files on a local disk: no .crc side files
        # (Hadoop's checksummed local FS opens one per file read and forks a `chmod` per file
        # written), partition folders listed on the driver (not a job of one task per folder),
        # and small files packed into few read tasks (a file "costs" 64 KiB, not 4 MiB).
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.hadoop.fs.file.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
                   .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "100000")
                   .config("spark.sql.files.openCostInBytes", str(64 << 10)))
    if local_dir is not None:
        builder = builder.config("spark.local.dir", str(local_dir))
    spark = builder.getOrCreate()
    partitions = (shuffle_partitions or spark_shuffle_partitions()
                  or 3 * spark.sparkContext.defaultParallelism)
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    spark.sparkContext.setLogLevel("ERROR")
    return spark
