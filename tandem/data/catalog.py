"""A bundle's catalog order: which dense row every item and user id gets, and where a run's bundle
lives.

Every item array of a bundle (ALS factors, two-tower vectors, index ids) is indexed by the row of
``items.parquet``; user arrays by ``users.parquet``. ``jobs/build_training_table.py``, the first
learner step of a nightly run, writes both files from the int-coded training table's dictionaries
(``tandem.data.lake.TrainingTable``), whose indexes every learner reads, so all parts agree. Items
are ordered by (created_at, item_id): a later catalog mostly appends, and the order is a pure
function of the lake at the run's end time; users by id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from tandem.config import Paths


def run_bundle_dir(paths: Paths, end: datetime, run_id: str | None = None) -> Path:
    """The bundle directory of the nightly run ending at ``end``: ``<models>/<run_id>``, where
    ``run_id`` defaults to the end date as YYYYMMDD (the DAG's ``--run-id``)."""
    return paths.models / (run_id or end.astimezone(UTC).strftime("%Y%m%d"))
