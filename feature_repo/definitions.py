"""Tandem's Feast objects, top to bottom: entities, sources, feature views, feature services.

Names and fields come from ``tandem.schema`` (the only import allowed here); defaults and
transforms live in ``tandem/features/entity.py``. Sources are the lake's feature parquet under
``$TANDEM_HOME/lake`` (``<repo>/var`` by default, as in ``tandem.config``), as absolute globs: the
DuckDB offline store reads paths as given. ``tandem.features.feature_store.apply(paths)`` loads this
file with ``TANDEM_HOME`` set to that state root and registers the objects in ``paths.feast``.

TTLs (how far back a point-in-time join or online read may reach for a row).
``jobs/build_features.py`` writes a row only when an entity's values change, so a TTL must cover
the longest gap between two rows of an entity whose values are not the defaults:

- user_profile, item_content: none (lives forever). Demographics and catalog columns may never
  change again after an entity's first row; the lookback-based ones (mean rating, affinity) are
  rewritten whenever they change.
- user_activity, item_popularity: the lookback (``FEATURE_LOOKBACK_DAYS``). After an entity's
  last landed event, rows follow as it leaves the 1h, 24h, 7d and lookback windows; the longest
  gap between two of them (leaving 7d, then the lookback: at most a day between snapshots more)
  is under the lookback, and the last of them holds only defaults.
- user_session 2 h: a session ends after 30 min of inactivity; older rows describe a past visit.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String

from tandem import schema as s

_TYPES = {"int64": Int64, "float32": Float32, "string": String,
          "string_list": Array(String), "float32_list": Array(Float32)}
_HOME = Path(os.environ.get("TANDEM_HOME", Path(__file__).resolve().parents[1] / "var"))
_LAKE = (_HOME / "lake" / "features").resolve()
_TAGS = {"team": "tandem"}


def _schema(fields):
    return [Field(name=name, dtype=_TYPES[dtype]) for name, dtype in fields]


# ------------------------------------------------------------------------------------ entities
user = Entity(name=s.USER_ENTITY, join_keys=[s.USER_ID], value_type=ValueType.STRING,
              description="A viewer (contract user.v1)", tags=_TAGS)
item = Entity(name=s.ITEM_ENTITY, join_keys=[s.ITEM_ID], value_type=ValueType.STRING,
              description="A catalog title (contract item.v1)", tags=_TAGS)

# ------------------------------------------------------------------------------------- sources
user_source = FileSource(
    name=s.USER_SOURCE, path=f"{_LAKE}/user/*/*/*.parquet", timestamp_field=s.EVENT_TIMESTAMP,
    description="jobs/build_features.py: a row per user per snapshot it changed in", tags=_TAGS)
item_source = FileSource(
    name=s.ITEM_SOURCE, path=f"{_LAKE}/item/*/*/*.parquet", timestamp_field=s.EVENT_TIMESTAMP,
    description="jobs/build_features.py: a row per item per snapshot it changed in", tags=_TAGS)
session_batch = FileSource(
    name=s.SESSION_BATCH_SOURCE, path=f"{_LAKE}/session/*.parquet",
    timestamp_field=s.EVENT_TIMESTAMP,
    description="pushed session rows, also written here (the training copy of the stream)",
    tags=_TAGS)
session_push = PushSource(name=s.SESSION_PUSH_SOURCE, batch_source=session_batch,
                          description="the stream consumer's current-session rows", tags=_TAGS)

# ------------------------------------------------------------------------------- feature views
user_profile = FeatureView(
    name=s.USER_PROFILE_VIEW, entities=[user], ttl=timedelta(0),
    schema=_schema(s.USER_PROFILE_FIELDS), source=user_source, online=True, tags=_TAGS,
    description="demographics, signup, smoothed mean rating, genre affinity")
user_activity = FeatureView(
    name=s.USER_ACTIVITY_VIEW, entities=[user], ttl=timedelta(days=s.FEATURE_LOOKBACK_DAYS),
    schema=_schema(s.USER_ACTIVITY_FIELDS), source=user_source, online=True, tags=_TAGS,
    description="engagement counts over 1h/24h/7d/lookback and the last event time")
item_content = FeatureView(
    name=s.ITEM_CONTENT_VIEW, entities=[item], ttl=timedelta(0),
    schema=_schema(s.ITEM_CONTENT_FIELDS), source=item_source, online=True, tags=_TAGS,
    description="genres, release year, duration, catalog entry time")
item_popularity = FeatureView(
    name=s.ITEM_POPULARITY_VIEW, entities=[item], ttl=timedelta(days=s.FEATURE_LOOKBACK_DAYS),
    schema=_schema(s.ITEM_POPULARITY_FIELDS), source=item_source, online=True, tags=_TAGS,
    description="popularity over 1h/24h/7d, smoothed CTR, smoothed mean rating")
user_session = FeatureView(
    name=s.SESSION_FEATURE_VIEW, entities=[user], ttl=timedelta(hours=2),
    schema=_schema(s.SESSION_FIELDS), source=session_push, online=True, tags=_TAGS,
    description="current session: recent items and genres, counts by event type, length")

# ---------------------------------------------------------------------------- feature services
ranker_v1 = FeatureService(
    name=s.RANKER_SERVICE, tags=_TAGS,
    features=[user_profile, user_activity, user_session, item_content, item_popularity],
    description="ranker training rows: (user_id, item_id, event_timestamp)")
ranker_user_v1 = FeatureService(
    name=s.RANKER_USER_SERVICE, features=[user_profile, user_activity, user_session],
    description="ranker serving, one user per request", tags=_TAGS)
ranker_item_v1 = FeatureService(
    name=s.RANKER_ITEM_SERVICE, features=[item_content, item_popularity],
    description="ranker serving, the whole catalog at model load", tags=_TAGS)
