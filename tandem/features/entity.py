"""The ranker's entity features: names, dtypes, defaults and the transforms to numpy.

Stored feature rows (lake parquet, Feast offline and online stores) hold *raw* values: counts,
epoch-ms timestamps, genre lists, a genre-affinity vector. The functions here turn those rows into
float32 matrices relative to a reference time ``now_ms`` -- the label's timestamp in training, the
request time in serving -- so "days since the last event" is exact in both and never stale by a
batch interval. Training-set building and serving call the SAME functions on the same raw columns;
a missing entity or value gets the default listed here, never an error (skew is a bug).

Three entity blocks, each with its raw fields (``*_FIELDS``, stored) and its vector names
(``*_FEATURES``, the columns of the matrices):

- user: profile + activity (batch, ``jobs/build_features.py``)
- item: content + popularity/CTR (batch)
- session: the stream consumer's current-session row (Feast push source ``user_session_push``)

Genres use one fixed vocabulary, :data:`GENRE_VOCAB` (the MovieLens genre names); a genre outside
it is ignored. ``user_genre_affinity`` is stored as a float list aligned to that vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tandem import schema as s

GENRE_VOCAB: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
N_GENRES = len(GENRE_VOCAB)
_GENRE_INDEX = {g: i for i, g in enumerate(GENRE_VOCAB)}
AGE_BUCKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS: tuple[str, ...] = ("M", "F")  # code 1, 2; any other non-empty value is 3, missing 0

DAY_MS = 86_400_000
DEFAULT_RATING = 3.5  # prior mean of a rating; also the smoothing target (weight below)
RATING_PRIOR_WEIGHT = 5.0  # pseudo-ratings at DEFAULT_RATING added to every mean
CTR_PRIOR_A = 1.0  # smoothed CTR = (clicks + a) / (impressions + a + b)
CTR_PRIOR_B = 20.0
DEFAULT_CTR = CTR_PRIOR_A / (CTR_PRIOR_A + CTR_PRIOR_B)
MAX_DAYS = 3650.0  # recency/age cap; a missing timestamp (0) reads as MAX_DAYS
MAX_IDLE_S = 7 * 86_400.0  # session idle cap; no session reads as MAX_IDLE_S


@dataclass(frozen=True)
class Field:
    """One stored feature: its Feast name, dtype string (see ``tandem.schema``) and default."""

    name: str
    dtype: str
    default: object


_SPECIAL_DEFAULTS: dict[str, object] = {
    "user_avg_rating": DEFAULT_RATING,
    "item_avg_rating": DEFAULT_RATING,
    "item_ctr": DEFAULT_CTR,
    "user_genre_affinity": (0.0,) * N_GENRES,
}
_TYPE_DEFAULTS: dict[str, object] = {
    "int64": 0, "float32": 0.0, "string": "", "string_list": (), "float32_list": (),
}


def _fields(specs: Sequence[tuple[str, str]]) -> tuple[Field, ...]:
    return tuple(Field(n, t, _SPECIAL_DEFAULTS.get(n, _TYPE_DEFAULTS[t])) for n, t in specs)


USER_PROFILE_FIELDS = _fields(s.USER_PROFILE_FIELDS)
USER_ACTIVITY_FIELDS = _fields(s.USER_ACTIVITY_FIELDS)
ITEM_CONTENT_FIELDS = _fields(s.ITEM_CONTENT_FIELDS)
ITEM_POPULARITY_FIELDS = _fields(s.ITEM_POPULARITY_FIELDS)
USER_FIELDS = USER_PROFILE_FIELDS + USER_ACTIVITY_FIELDS
ITEM_FIELDS = ITEM_CONTENT_FIELDS + ITEM_POPULARITY_FIELDS
SESSION_FIELDS = _fields(s.SESSION_FIELDS)
DEFAULTS: dict[str, object] = {
    f.name: f.default for f in USER_FIELDS + ITEM_FIELDS + SESSION_FIELDS}

# Vector columns, in matrix order.
USER_FEATURES: tuple[str, ...] = (
    "user_log_events_1h", "user_log_events_24h", "user_log_events_7d", "user_log_events_total",
    "user_log_positives_7d", "user_avg_rating", "user_log_ratings_total",
    "user_days_since_last_event", "user_days_since_signup", "user_age_bucket_code",
    "user_gender_code", *(f"user_aff_{g}" for g in GENRE_VOCAB),
)
ITEM_FEATURES: tuple[str, ...] = (
    "item_log_pop_1h", "item_log_pop_24h", "item_log_pop_7d", "item_log_pop_total",
    "item_log_impressions_7d", "item_ctr", "item_avg_rating", "item_log_ratings_total",
    "item_release_year", "item_duration_min", "item_genre_count",
    "item_days_since_last_event", "item_age_days", *(f"item_genre_{g}" for g in GENRE_VOCAB),
)
SESSION_FEATURES: tuple[str, ...] = (
    "session_length", "session_duration_s", "session_idle_s", "session_active",
    "session_n_recent_items", *(f"session_cnt_{t}" for t in s.EVENT_TYPES),
    *(f"session_genre_{g}" for g in GENRE_VOCAB),
)
USER_AFFINITY_SLICE = slice(len(USER_FEATURES) - N_GENRES, len(USER_FEATURES))
ITEM_GENRE_SLICE = slice(len(ITEM_FEATURES) - N_GENRES, len(ITEM_FEATURES))
SESSION_GENRE_SLICE = slice(len(SESSION_FEATURES) - N_GENRES, len(SESSION_FEATURES))
# item columns that depend on now_ms (filled by fill_item_times, everything else is static)
ITEM_TIME_COLUMNS = (ITEM_FEATURES.index("item_days_since_last_event"),
                     ITEM_FEATURES.index("item_age_days"))

_NUMERIC = ("int64", "float32")
_SMALL = 8  # up to this many rows given as plain lists (serving) skip pandas; same results
Columns = Mapping[str, Sequence | np.ndarray | pd.Series]


# ---------------------------------------------------------------------------- raw column access

def to_epoch_ms(ts) -> np.ndarray:
    """Epoch milliseconds (int64) of ints, datetimes, a pandas Series or an array of either."""
    if isinstance(ts, (int, np.integer)):
        return np.asarray([ts], dtype=np.int64)
    series = ts if isinstance(ts, pd.Series) else pd.Series(np.atleast_1d(np.asarray(ts)))
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(np.int64)
    stamps = pd.to_datetime(series, utc=True)
    return (stamps.astype("datetime64[ms, UTC]").astype("int64")).to_numpy(np.int64)


def _is_missing(value: object) -> bool:
    """What ``pd.isna`` says of a scalar: None, NaN, ``pd.NA`` or ``pd.NaT``."""
    return (value is None or value is pd.NA or value is pd.NaT
            or (isinstance(value, (float, np.floating)) and value != value))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _numeric(cols: Columns, name: str, n: int) -> np.ndarray:
    """Column ``name`` as float64 [n], missing column/None/NaN replaced by its default.

    A request's row (a short list of plain numbers or missing values) skips pandas; anything
    else (strings to parse, many rows) goes through ``pd.to_numeric``. Same values either way.
    """
    default = float(DEFAULTS[name])
    if name not in cols:
        return np.full(n, default)
    values = cols[name]
    if isinstance(values, list) and n <= _SMALL and all(
            _is_number(v) or _is_missing(v) for v in values):
        return np.array([default if _is_missing(v) else float(v) for v in values])
    parsed = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce")
    return parsed.fillna(default).to_numpy(np.float64)


def _strings(cols: Columns, name: str, n: int) -> np.ndarray:
    """Column ``name`` as an object array [n] of str, missing replaced by ``""``."""
    if name not in cols:
        return np.full(n, "", dtype=object)
    if isinstance(cols[name], list) and n <= _SMALL:
        return np.array(["" if _is_missing(v) else v for v in cols[name]], dtype=object)
    return pd.Series(np.asarray(cols[name], dtype=object)).fillna("").to_numpy(object)


def _list_array(values, value_type: pa.DataType) -> pa.ListArray:
    """A pyarrow list array of ``values`` (lists, tuples, numpy arrays, None)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        return arr.cast(pa.list_(value_type))
    items = [None if _null_list(v) else list(v) for v in values]
    return pa.array(items, type=pa.list_(value_type))


def _null_list(value: object) -> bool:
    """A missing list cell: None, or NaN (how pandas fills a missing list)."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def _n_rows(cols: Columns) -> int:
    if isinstance(cols, pd.DataFrame):
        return len(cols)
    return len(next(iter(cols.values()))) if len(cols) else 0


# ---------------------------------------------------------------------------------- genre blocks

def genre_multi_hot(genres) -> np.ndarray:
    """Multi-hot [n, N_GENRES] float32 of genre lists (None or unknown genres give zeros)."""
    if isinstance(genres, list) and len(genres) <= _SMALL:  # a request's rows: skip Arrow
        out = np.zeros((len(genres), N_GENRES), dtype=np.float32)
        for row, names in enumerate(genres):
            cols = [] if _null_list(names) else [_GENRE_INDEX[g] for g in names
                                                 if g in _GENRE_INDEX]
            out[row, cols] = 1.0
        return out
    arr = _list_array(genres, pa.string())
    out = np.zeros((len(arr), N_GENRES), dtype=np.float32)
    flat = pc.list_flatten(arr)
    if len(flat) == 0:
        return out
    parents = pc.list_parent_indices(arr).to_numpy()
    idx = pc.index_in(flat, value_set=pa.array(GENRE_VOCAB)).fill_null(-1).to_numpy()
    keep = idx >= 0
    out[parents[keep], idx[keep]] = 1.0
    return out


def _fixed_float_lists(values, width: int, default: float = 0.0) -> np.ndarray:
    """[n, width] float32 of float lists; a row of any other length (or None) gets ``default``."""
    if isinstance(values, list) and len(values) <= _SMALL:
        out = np.full((len(values), width), default, dtype=np.float32)
        for row, v in enumerate(values):
            if isinstance(v, (list, tuple, np.ndarray)) and len(v) == width:
                out[row] = np.asarray([default if x is None else x for x in v], np.float32)
        return out
    arr = _list_array(values, pa.float32())
    out = np.full((len(arr), width), default, dtype=np.float32)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy()
    ok = lengths == width
    if ok.any():
        flat = pc.list_flatten(arr.filter(pa.array(ok))).fill_null(default).to_numpy()
        out[ok] = flat.reshape(-1, width)
    return out


def user_genre_affinity(cols: Columns) -> np.ndarray:
    """Users' genre-affinity vectors [n, N_GENRES] (share of positives per genre; 0 if none)."""
    name = "user_genre_affinity"
    n = _n_rows(cols)
    return (_fixed_float_lists(cols[name], N_GENRES) if name in cols
            else np.zeros((n, N_GENRES), dtype=np.float32))


def genre_affinity_cross(affinity: np.ndarray, item_genres: np.ndarray) -> np.ndarray:
    """Mean affinity of a user over each item's genres.

    Parameters
    ----------
    affinity : [N_GENRES] or [n, N_GENRES] float32 (one user broadcast, or one row per item)
    item_genres : [n, N_GENRES] multi-hot (``ITEM_FEATURES`` columns ``ITEM_GENRE_SLICE``)

    Returns
    -------
    [n] float32 in [0, 1]: sum of affinity over the item's genres / number of its genres.
    """
    counts = np.maximum(item_genres.sum(axis=1), 1.0)
    return ((item_genres * affinity).sum(axis=1) / counts).astype(np.float32)


# --------------------------------------------------------------------------------- matrix blocks

def _days_since(ts_ms: np.ndarray, now_ms: np.ndarray) -> np.ndarray:
    """(now - ts) in days, clipped to [0, MAX_DAYS]; ts 0 (never/unknown) gives MAX_DAYS."""
    days = (now_ms - ts_ms) / DAY_MS
    return np.where(ts_ms > 0, np.clip(days, 0.0, MAX_DAYS), MAX_DAYS)


def _codes(values: np.ndarray, vocab: Sequence[str], other: int | None) -> np.ndarray:
    """1-based index in ``vocab``; 0 when empty; ``other`` (or 0) when not in vocab."""
    unknown = 0.0 if other is None else float(other)
    if len(values) <= _SMALL:  # a request's row; identical to the vectorized branch below
        index = {v: i + 1.0 for i, v in enumerate(vocab)}
        return np.array([index.get(v, 0.0 if v == "" else unknown) for v in values])
    cat = pd.Categorical(values, categories=list(vocab)).codes.astype(np.float64) + 1.0
    return np.where(cat > 0, cat, np.where(values == "", 0.0, unknown))


def _now(now_ms, n: int) -> np.ndarray:
    now = to_epoch_ms(now_ms).astype(np.float64)
    return np.broadcast_to(now, (n,)) if now.size == 1 else now


def user_matrix(cols: Columns, now_ms) -> np.ndarray:
    """User features [n, len(USER_FEATURES)] float32 from raw user rows.

    Parameters
    ----------
    cols : mapping of raw column name -> [n] values (a DataFrame, ``to_dict()`` of Feast);
        absent columns and missing values take their defaults.
    now_ms : epoch ms (scalar or [n]) or datetimes: the label time or the request time.
    """
    n = _n_rows(cols)
    now = _now(now_ms, n)
    num = {f.name: _numeric(cols, f.name, n) for f in USER_FIELDS if f.dtype in _NUMERIC}
    blocks = [
        np.log1p(np.column_stack([num["user_events_1h"], num["user_events_24h"],
                                  num["user_events_7d"], num["user_events_total"],
                                  num["user_positives_7d"]])),
        num["user_avg_rating"][:, None],
        np.log1p(num["user_ratings_total"])[:, None],
        _days_since(num["user_last_event_ts"], now)[:, None],
        _days_since(num["user_signup_ts"], now)[:, None],
        _codes(_strings(cols, "user_age_bucket", n), AGE_BUCKETS, None)[:, None],
        _codes(_strings(cols, "user_gender", n), GENDERS, len(GENDERS) + 1)[:, None],
        user_genre_affinity(cols) if n else np.zeros((0, N_GENRES)),
    ]
    return np.hstack(blocks).astype(np.float32)


def item_static_matrix(cols: Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item features with the time columns left at 0, plus the two timestamps they need.

    Returns
    -------
    matrix : [n, len(ITEM_FEATURES)] float32 (``ITEM_TIME_COLUMNS`` are 0 until filled)
    last_event_ts, created_at : [n] float64 epoch ms (0 = unknown)
    """
    n = _n_rows(cols)
    num = {f.name: _numeric(cols, f.name, n) for f in ITEM_FIELDS if f.dtype in _NUMERIC}
    genres = (genre_multi_hot(cols["item_genres"]) if "item_genres" in cols
              else np.zeros((n, N_GENRES), dtype=np.float32))
    blocks = [
        np.log1p(np.column_stack([num["item_pop_1h"], num["item_pop_24h"], num["item_pop_7d"],
                                  num["item_pop_total"], num["item_impressions_7d"]])),
        num["item_ctr"][:, None],
        num["item_avg_rating"][:, None],
        np.log1p(num["item_ratings_total"])[:, None],
        num["item_release_year"][:, None],
        (num["item_duration_s"] / 60.0)[:, None],
        genres.sum(axis=1, keepdims=True),
        np.zeros((n, 2)),
        genres,
    ]
    return (np.hstack(blocks).astype(np.float32), num["item_last_event_ts"],
            num["item_created_at"])


def fill_item_times(matrix: np.ndarray, last_event_ts: np.ndarray, created_at: np.ndarray,
                    now_ms) -> np.ndarray:
    """Write the time-relative item columns in place (and return ``matrix``)."""
    now = _now(now_ms, len(matrix))
    matrix[:, ITEM_TIME_COLUMNS[0]] = _days_since(last_event_ts, now)
    matrix[:, ITEM_TIME_COLUMNS[1]] = _days_since(created_at, now)
    return matrix


def item_matrix(cols: Columns, now_ms) -> np.ndarray:
    """Item features [n, len(ITEM_FEATURES)] float32 from raw item rows (see ``user_matrix``)."""
    matrix, last_ts, created = item_static_matrix(cols)
    return fill_item_times(matrix, last_ts, created, now_ms)


def session_matrix(cols: Columns, now_ms) -> np.ndarray:
    """Session features [n, len(SESSION_FEATURES)] float32 from raw ``user_session`` rows.

    ``session_idle_s`` is the time from the last session event to ``now`` (capped at MAX_IDLE_S,
    and MAX_IDLE_S when there is no session); ``session_active`` is 1 when it is under the
    session gap (``tandem.schema.SESSION_GAP_MS``).
    """
    n = _n_rows(cols)
    now = _now(now_ms, n)
    num = {f.name: _numeric(cols, f.name, n) for f in SESSION_FIELDS if f.dtype == "int64"}
    last, start = num[s.SESSION_LAST_TS], num[s.SESSION_START_TS]
    idle = np.where(last > 0, np.clip((now - last) / 1000.0, 0.0, MAX_IDLE_S), MAX_IDLE_S)
    duration = np.where((last > 0) & (start > 0), np.maximum(last - start, 0.0) / 1000.0, 0.0)
    n_recent = _list_lengths(cols[s.SESSION_RECENT_ITEMS] if s.SESSION_RECENT_ITEMS in cols
                             else [None] * n)
    genres = (genre_multi_hot(cols[s.SESSION_RECENT_GENRES]) if s.SESSION_RECENT_GENRES in cols
              else np.zeros((n, N_GENRES), dtype=np.float32))
    blocks = [
        num[s.SESSION_LENGTH][:, None], duration[:, None], idle[:, None],
        (idle * 1000.0 < s.SESSION_GAP_MS).astype(np.float64)[:, None], n_recent[:, None],
        np.column_stack([num[s.SESSION_COUNT_PREFIX + t] for t in s.EVENT_TYPES]),
        genres,
    ]
    return np.hstack(blocks).astype(np.float32)


def _list_lengths(values) -> np.ndarray:
    """[n] float64 lengths of lists (None counts 0)."""
    if isinstance(values, list) and len(values) <= _SMALL:
        return np.array([0.0 if _null_list(v) else float(len(v)) for v in values])
    arr = _list_array(values, pa.string())
    return pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.float64)


def _one_row(row: Mapping[str, object]) -> dict[str, list]:
    return {k: [v] for k, v in row.items()}


def user_vector(row: Mapping[str, object], now_ms) -> np.ndarray:
    """One user's features [len(USER_FEATURES)] float32 from a raw row dict (defaults fill)."""
    return user_matrix(_one_row(row) or {"user_id": [None]}, now_ms)[0]


def session_vector(row: Mapping[str, object], now_ms) -> np.ndarray:
    """One user's session features [len(SESSION_FEATURES)] float32 from a raw row dict."""
    return session_matrix(_one_row(row) or {"user_id": [None]}, now_ms)[0]


def default_row(fields: Sequence[Field]) -> dict[str, object]:
    """The raw row of an entity nobody has seen: every field at its default."""
    return {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
            for f in fields}
