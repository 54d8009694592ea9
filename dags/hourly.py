"""tandem_hourly: land -> lake -> labels -> features -> online store -> new items' vectors, once
per hour (``embed_new_items``: items created since the nightly build become retrievable).

Each task reads and overwrites only its data interval's partitions, so clearing and re-running a
run (or backfilling a range with the ``start``/``end`` params) is safe. Every task waits for the
same task of the previous hour (``depends_on_past``): ingest deduplicates against the ids the
earlier hours wrote, and the features roll forward from the previous hour's state.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import dag

from tandem.ops.orchestration import interval_param, materialize_features, python_job, spark_job


@dag(
    dag_id="tandem_hourly",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"depends_on_past": True},
    tags=["tandem", "data"],
    params={
        "start": interval_param("Interval start (ISO, UTC)"),
        "end": interval_param("Interval end (ISO, UTC)"),
    },
)
def tandem_hourly():
    """Hourly data pipeline: ingest_events -> build_labels -> build_features -> materialize ->
    embed_new_items -> precompute_feeds (the champion's feeds for the most active users,
    serving.precomputed)."""
    (spark_job("ingest_events") >> spark_job("build_labels") >> spark_job("build_features")
     >> materialize_features() >> python_job("embed_new_items", run_id=False)
     >> python_job("serving.precompute_feeds", run_id=False, task_id="precompute_feeds"))


tandem_hourly()
