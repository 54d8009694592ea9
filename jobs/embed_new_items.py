"""Hourly: embed the items created since each recent nightly bundle was built, so serving can
retrieve them within the hour instead of the next night.

extract: the ``recent`` newest nightly bundles under ``<models>`` (serving's alias may lag the
newest build by a night or more); per bundle its catalog ids (``items.parquet``) and the lake's
catalog rows created before ``end`` and not older than the bundle's newest item.
transform: the two-tower's item tower on content (genres, release year, exactly the featuriser
and the content-only path the nightly export uses:
``tandem.models.user_tower.UserTower.encode_items``) for every item the bundle lacks.
load: ``<models>/deltas/<bundle_key>/items-<end hour>.{npz,json}``
(``tandem.models.bundle.ItemDelta``, cumulative, sha256 alongside); serving appends them to its
catalog and FAISS index on its next poll. A bundle without a two-tower (ALS-only) gets a delta
without vectors (fresh + content retrieval still see the items). No bundle yet: nothing to do.

Idempotent: a re-run for the same hour rewrites the same files from the same inputs.

Memory model: per bundle its catalog ids (1M x ~60 B = 60 MB as a pandas Index) and the new
items' rows only (the lake read is filtered on ``created_at`` by pyarrow): items created in a
day are thousands, their content and vectors a few MB.

    python -m jobs.embed_new_items --start 2026-02-01T00:00:00 --end 2026-02-01T01:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from tandem import schema as s
from tandem.config import Paths
from tandem.data.lake import epoch_ms
from tandem.models import bundle as B
from tandem.ops.job_cli import interval_parser, parse

RECENT_BUNDLES = 3


def recent_bundles(paths: Paths, n: int = RECENT_BUNDLES) -> list[Path]:
    """The ``n`` newest nightly bundle folders (those with a manifest), newest first."""
    if not paths.models.exists():
        return []
    found = [p for p in paths.models.iterdir() if p.is_dir() and (p / B.MANIFEST).exists()]
    return sorted(found, key=lambda p: B.BundleManifest.load(p).created_at, reverse=True)[:n]


def extract(paths: Paths, bundle_dir: Path, end: datetime) -> pd.DataFrame:
    """Catalog rows (item_id, genres, release_year, created_at) created before ``end`` that the
    bundle lacks, in catalog order (created_at, item_id)."""
    known = pd.read_parquet(bundle_dir / B.ITEMS, columns=[s.ITEM_ID, s.CREATED_AT])
    since = int(known[s.CREATED_AT].max()) if len(known) else 0
    rows = ds.dataset(paths.items, format="parquet").to_table(
        columns=[s.ITEM_ID, s.GENRES, s.RELEASE_YEAR, s.CREATED_AT],
        filter=(ds.field(s.CREATED_AT) >= since) & (ds.field(s.CREATED_AT) < epoch_ms(end)),
    ).to_pandas()
    rows[s.ITEM_ID] = rows[s.ITEM_ID].astype(str)
    rows = rows[~rows[s.ITEM_ID].isin(known[s.ITEM_ID].astype(str))]
    return (rows.drop_duplicates(s.ITEM_ID, keep="last")
            .sort_values([s.CREATED_AT, s.ITEM_ID], kind="stable").reset_index(drop=True))


def transform(bundle_dir: Path, new: pd.DataFrame, stamp: str) -> B.ItemDelta:
    """Content-only two-tower vectors of ``new`` (none in an ALS-only bundle)."""
    from tandem.models.user_tower import UserTower

    vectors = np.zeros((len(new), 0), np.float32)
    tower_file = bundle_dir / B.TT_USER_TOWER
    if tower_file.exists() and len(new):
        tower = UserTower.load(tower_file, np.zeros((0, 0), np.float32))
        if tower.item_spec is None:
            raise ValueError(f"{tower_file} has no item featuriser: cannot embed new items")
        genres = [list(g) if isinstance(g, (list, np.ndarray)) else [] for g in new[s.GENRES]]
        content = tower.item_spec.encode(genres, new[s.RELEASE_YEAR].tolist())
        vectors = tower.encode_items(content)
    return B.ItemDelta(stamp, new[s.ITEM_ID].to_numpy(object),
                       new[s.CREATED_AT].to_numpy(np.int64), vectors)


def run(spark, paths: Paths, start: datetime, end: datetime,
        cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one delta per recent bundle; returns the new items per bundle key.

    ``spark``, ``start`` and ``cfg`` are unused (common job signature; the catalog is read up to
    ``end``).
    """
    stamp = end.astimezone(UTC).strftime("%Y%m%dT%H")
    out: dict[str, Any] = {}
    for bundle_dir in recent_bundles(paths):
        delta = transform(bundle_dir, extract(paths, bundle_dir, end), stamp)
        key = B.bundle_key(bundle_dir)
        delta.save(paths.models / B.DELTAS / key)
        out[key] = {"bundle": bundle_dir.name, "new_items": len(delta.item_ids)}
    return {"bundles": out, "stamp": stamp}


def main(argv: list[str] | None = None) -> None:
    args, paths, start, end = parse(interval_parser(__doc__), argv)
    print(run(None, paths, start, end))


if __name__ == "__main__":
    main()
