"""Names that are contracts: event types, column names, lake datasets.

Every job, the feature repo and serving take names from here (and the JSON Schemas in
``schemas/``), never from string literals of their own. To change a name add a ``_v2``; never
rename in place.
"""

from __future__ import annotations

from typing import Final

EVENT_SCHEMA_VERSION: Final = 1

# event types, in the order the contract lists them
IMPRESSION: Final = "impression"
CLICK: Final = "click"
PLAY: Final = "play"
COMPLETE: Final = "complete"
LIKE: Final = "like"
DISLIKE: Final = "dislike"
RATING: Final = "rating"
SHARE: Final = "share"
ADD_TO_LIST: Final = "add_to_list"
EVENT_TYPES: Final = (
    IMPRESSION, CLICK, PLAY, COMPLETE, LIKE, DISLIKE, RATING, SHARE, ADD_TO_LIST,
)
# Engagements that count as positive whatever their value. A rating is positive when
# value >= POSITIVE_RATING; a play when dwell_ms >= the configured dwell threshold.
POSITIVE_EVENT_TYPES: Final = (CLICK, COMPLETE, LIKE, SHARE, ADD_TO_LIST)
POSITIVE_RATING: Final = 4.0

# event columns (flat, as stored in the lake; context is flattened to ctx_*)
EVENT_ID: Final = "event_id"
EVENT_TYPE: Final = "event_type"
USER_ID: Final = "user_id"
ITEM_ID: Final = "item_id"
TS: Final = "ts"
SESSION_ID: Final = "session_id"
REQUEST_ID: Final = "request_id"
POSITION: Final = "position"
DWELL_MS: Final = "dwell_ms"
VALUE: Final = "value"
CONTEXT: Final = "context"
CTX_DEVICE: Final = "ctx_device"
CTX_COUNTRY: Final = "ctx_country"
CTX_SURFACE: Final = "ctx_surface"
EXPERIMENT: Final = "experiment"
VARIANT: Final = "variant"
MODEL_VERSION: Final = "model_version"
PROPENSITY: Final = "propensity"

# lake bookkeeping columns
DATE: Final = "date"  # partition, yyyy-MM-dd (UTC)
HOUR: Final = "hour"  # partition, 0-23 (UTC)
REASON: Final = "reason"  # quarantine: why the row was rejected
RAW: Final = "raw"  # quarantine: the original line/record, as text
EVENT_TIMESTAMP: Final = "event_timestamp"  # Feast's timestamp column on feature tables
LABEL: Final = "label"

# item catalog / user profile columns
TITLE: Final = "title"
GENRES: Final = "genres"
RELEASE_YEAR: Final = "release_year"
DURATION_S: Final = "duration_s"
LANGUAGE: Final = "language"
CREATED_AT: Final = "created_at"
SIGNUP_TS: Final = "signup_ts"
AGE_BUCKET: Final = "age_bucket"
GENDER: Final = "gender"
OCCUPATION: Final = "occupation"
COUNTRY: Final = "country"

# Real-time session features: the stream consumer computes them, pushes them to the Feast push
# source below, and serving reads them per request. Columns of one pushed row:
SESSION_FEATURE_VIEW: Final = "user_session"
SESSION_PUSH_SOURCE: Final = "user_session_push"
SESSION_RECENT_ITEMS: Final = "recent_item_ids"  # Array(String), newest first, at most 20
SESSION_RECENT_GENRES: Final = "recent_genres"  # Array(String), newest first, distinct, at most 5
SESSION_LENGTH: Final = "session_length"  # Int64, events in the current session
SESSION_START_TS: Final = "session_start_ts"  # Int64, epoch ms
SESSION_LAST_TS: Final = "last_event_ts"  # Int64, epoch ms
SESSION_COUNT_PREFIX: Final = "cnt_"  # Int64 cnt_<event_type> per event type, current session
SESSION_GAP_MS: Final = 30 * 60 * 1000  # inactivity that ends a session

# Feast feature store names. feature_repo/definitions.py builds its objects from these and
# tandem/features/entity.py adds defaults and transforms. dtype strings: int64, float32, string,
# string_list, float32_list. All are features of an entity (join key user_id or item_id).
USER_ENTITY: Final = "user"
ITEM_ENTITY: Final = "item"
USER_PROFILE_VIEW: Final = "user_profile"
USER_ACTIVITY_VIEW: Final = "user_activity"
ITEM_CONTENT_VIEW: Final = "item_content"
ITEM_POPULARITY_VIEW: Final = "item_popularity"
USER_SOURCE: Final = "user_features_source"
ITEM_SOURCE: Final = "item_features_source"
SESSION_BATCH_SOURCE: Final = "user_session_batch"
# jobs/build_features.py's totals look this far back (no view has a TTL: see definitions.py)
FEATURE_LOOKBACK_DAYS: Final = 365
RANKER_SERVICE: Final = "ranker_v1"  # every view below: training (user_id, item_id, time)
RANKER_USER_SERVICE: Final = "ranker_user_v1"  # serving, per request: profile, activity, session
RANKER_ITEM_SERVICE: Final = "ranker_item_v1"  # serving, at model load: item content, popularity
USER_PROFILE_FIELDS: Final = (
    ("user_age_bucket", "string"),
    ("user_gender", "string"),
    ("user_signup_ts", "int64"),  # epoch ms
    ("user_avg_rating", "float32"),  # smoothed toward the prior
    ("user_ratings_total", "int64"),
    ("user_genre_affinity", "float32_list"),  # share of positives per genre, features.GENRE_VOCAB
)
USER_ACTIVITY_FIELDS: Final = (
    ("user_events_1h", "int64"),  # engagements (not impressions) in the window before the row
    ("user_events_24h", "int64"),
    ("user_events_7d", "int64"),
    ("user_events_total", "int64"),  # over the job's lookback
    ("user_positives_7d", "int64"),
    ("user_last_event_ts", "int64"),  # epoch ms; 0 = never
)
ITEM_CONTENT_FIELDS: Final = (
    ("item_genres", "string_list"),
    ("item_release_year", "int64"),  # 0 = unknown
    ("item_duration_s", "int64"),  # 0 = unknown
    ("item_created_at", "int64"),  # epoch ms
)
ITEM_POPULARITY_FIELDS: Final = (
    ("item_pop_1h", "int64"),  # engagements (not impressions) in the window before the row
    ("item_pop_24h", "int64"),
    ("item_pop_7d", "int64"),
    ("item_pop_total", "int64"),
    ("item_impressions_7d", "int64"),
    ("item_clicks_7d", "int64"),
    ("item_ctr", "float32"),  # (clicks_7d + a) / (impressions_7d + a + b)
    ("item_avg_rating", "float32"),  # smoothed toward the prior
    ("item_ratings_total", "int64"),
    ("item_last_event_ts", "int64"),  # epoch ms; 0 = never
)
SESSION_FIELDS: Final = (
    (SESSION_RECENT_ITEMS, "string_list"),
    (SESSION_RECENT_GENRES, "string_list"),
    (SESSION_LENGTH, "int64"),
    (SESSION_START_TS, "int64"),
    (SESSION_LAST_TS, "int64"),
    *((SESSION_COUNT_PREFIX + t, "int64") for t in EVENT_TYPES),
)
