"""The synthetic world's knobs and vocabularies (:class:`WorldConfig`, genre and profile
names, event kinds), the simulator's answer (:class:`Engagement`) and the vectorized draws
:class:`tandem.data.world.World` is built from (unit vectors, id arrays, weighted draws within
segments, in-slate duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tandem import schema as s

DAY_MS = 86_400_000


ARRIVAL_TS = "arrival_ts"  # not a contract column: when the event reached the landing zone


GENRE_NAMES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
               "Sci-Fi", "Thriller", "War", "Western")


DEVICES = ("mobile", "web", "tv")


COUNTRIES = ("US", "GB", "DE", "FR", "BR", "IN", "JP", "CA", "ES", "MX")


SURFACES = ("home", "browse", "detail", "search")


LANGUAGES = ("en", "es", "fr", "de", "ja", "ko")


AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


GENDERS = ("F", "M")


OCCUPATIONS = ("student", "engineer", "educator", "artist", "healthcare", "sales", "retired",
               "other")


# event types in the order the generator emits them, with the short code used in event ids
EVENT_KINDS = (s.IMPRESSION, s.CLICK, s.PLAY, s.COMPLETE, s.LIKE, s.DISLIKE, s.SHARE, s.ADD_TO_LIST)


EVENT_CODES = ("imp", "clk", "ply", "cmp", "lik", "dis", "shr", "atl")


@dataclass(frozen=True)
class WorldConfig:
    """Size, time window and behaviour knobs of a synthetic world (defaults: a small world)."""

    n_users: int = 2_000
    n_items: int = 500
    n_events_target: int = 200_000
    n_genres: int = 18
    dim: int = 16
    seed: int = 0
    start_ms: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    days: int = 7
    slate_size: int = 10
    popularity_alpha: float = 1.0
    catalog_at_start: float = 0.7
    users_at_start: float = 0.8
    taste_weight: float = 4.0
    popularity_weight: float = 0.4
    fresh_weight: float = 0.5
    base_logit: float = -2.0
    personalized_share: float = 0.5
    explore_share: float = 0.1
    late_share: float = 0.01
    duplicate_share: float = 0.0
    chunk_requests: int = 200_000  # requests per generated chunk (bounds memory)


@dataclass
class Engagement:
    """What simulated users did with the slates shown to them; every array is [n_users, k].

    ``click``/``play``/``complete``/``like``/``dislike``/``share``/``add_to_list`` are bool,
    ``dwell_ms`` int64 (0 where not played), ``p_click`` the click probability used.
    """

    click: np.ndarray
    play: np.ndarray
    dwell_ms: np.ndarray
    complete: np.ndarray
    like: np.ndarray
    dislike: np.ndarray
    share: np.ndarray
    add_to_list: np.ndarray
    p_click: np.ndarray


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def id_array(prefix: str, n: int) -> pa.Array:
    """``prefix0 .. prefix<n-1>`` as an Arrow string array (vectorized)."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(n)), pa.string()), "")


def years_of(ms: np.ndarray) -> np.ndarray:
    return ms.astype("datetime64[ms]").astype("datetime64[Y]").astype(np.int64) + 1970


def named(names: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    return pa.array(names).take(pa.array(codes))


def segment_draw(cum: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index in ``[lo, hi)`` drawn with weights ``diff(cum)`` (``cum`` inclusive cumsum)."""
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    target = base + u * (cum[np.maximum(hi - 1, 0)] - base)
    idx = np.clip(np.searchsorted(cum, target, side="right"), lo, np.maximum(hi - 1, lo))
    return np.minimum(idx, len(cum) - 1)


def duplicate_mask(slate: np.ndarray) -> np.ndarray:
    """Mask [n, k]: True where the row already holds that item at another (earlier) slot."""
    order = np.argsort(slate, axis=1, kind="stable")
    srt = np.take_along_axis(slate, order, axis=1)
    dup = np.zeros_like(slate, dtype=bool)
    repeat = np.c_[np.zeros((len(slate), 1), bool), srt[:, 1:] == srt[:, :-1]]
    np.put_along_axis(dup, order, repeat, axis=1)
    return dup
