"""Tandem's Feast objects, top to bottom: entities, sources, feature views, feature services.

Names and fields come from ``tandem.schema`` (the only import allowed here); defaults and
transforms live in ``tandem/features/entity.py``. Sources are the lake's feature parquet under
``$TANDEM_HOME/lake`` (``<repo>/var`` by default, as in ``tandem.config``), as absolute globs: the
DuckDB offline store reads paths as given. ``tandem.features.feature_store.apply(paths)`` loads this
file with ``TANDEM_HOME`` set to that state root and registers the objects in ``paths.feast``.

TTLs: none (``ttl=timedelta(0)``: a row holds until its entity's next row). Serving reads the
online store, which keeps each entity's latest row whatever its age (Feast 0.67 applies no TTL
there); a TTL only the point-in-time join applies is a second definition of every feature in the
view, and it shows as training-serving skew once a row is older than it: ``make demo`` served
MovieLens's 1998 rows in 2026, and the skew gate measured PSI up to 18 (``item_log_pop_total``;
``item_avg_rating`` 17.7, ``user_log_events_total`` 11.8) on the activity and popularity columns
the join had expired to defaults (a user back after 2 h would show the same on the session
columns). Expiry is written as rows instead: ``jobs/build_features.py`` writes a row
whenever an entity's counts change, including as events leave the 1h, 24h, 7d and lookback
windows (the last of them holds only defaults); the feature consumer starts a new session row
on the first event after the session gap, and ``session_idle_s``/``session_active`` tell the
ranker how old a session row is at the request (``tandem/features/entity.py``).
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
    name=s.USER_ACTIVITY_VIEW, entities=[user], ttl=timedelta(0),
    schema=_schema(s.USER_ACTIVITY_FIELDS), source=user_source, online=True, tags=_TAGS,
    description="engagement counts over 1h/24h/7d/lookback and the last event time")
item_content = FeatureView(
    name=s.ITEM_CONTENT_VIEW, entities=[item], ttl=timedelta(0),
    schema=_schema(s.ITEM_CONTENT_FIELDS), source=item_source, online=True, tags=_TAGS,
    description="genres, release year, duration, catalog entry time")
item_popularity = FeatureView(
    name=s.ITEM_POPULARITY_VIEW, entities=[item], ttl=timedelta(0),
    schema=_schema(s.ITEM_POPULARITY_FIELDS), source=item_source, online=True, tags=_TAGS,
    description="popularity over 1h/24h/7d, smoothed CTR, smoothed mean rating")
user_session = FeatureView(
    name=s.SESSION_FEATURE_VIEW, entities=[user], ttl=timedelta(0),
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
