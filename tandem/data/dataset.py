"""The in-memory shape of a dataset: flat contract columns for events, items and users.

Every data source (MovieLens loaders, the synthetic world) returns a :class:`Dataset` whose frames
have exactly the columns below, in this order, so writers and tests never guess. Events are flat
as in the lake (``context`` flattened to ``ctx_device``/``ctx_country``/``ctx_surface``); absent
optional fields are null.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from tandem import schema as s

EVENT_COLUMNS: tuple[str, ...] = (
    s.EVENT_ID, s.EVENT_TYPE, s.USER_ID, s.ITEM_ID, s.TS, s.SESSION_ID, s.REQUEST_ID, s.POSITION,
    s.DWELL_MS, s.VALUE, s.CTX_DEVICE, s.CTX_COUNTRY, s.CTX_SURFACE, s.EXPERIMENT, s.VARIANT,
    s.MODEL_VERSION, s.PROPENSITY,
)
ITEM_COLUMNS: tuple[str, ...] = (
    s.ITEM_ID, s.TITLE, s.GENRES, s.RELEASE_YEAR, s.DURATION_S, s.LANGUAGE, s.CREATED_AT,
)
USER_COLUMNS: tuple[str, ...] = (
    s.USER_ID, s.SIGNUP_TS, s.AGE_BUCKET, s.GENDER, s.OCCUPATION, s.COUNTRY,
)

_INT = {s.TS, s.POSITION, s.DWELL_MS, s.RELEASE_YEAR, s.DURATION_S, s.CREATED_AT, s.SIGNUP_TS}
_FLOAT = {s.VALUE, s.PROPENSITY}


def _arrow_type(name: str) -> pa.DataType:
    if name in _INT:
        return pa.int64()
    if name in _FLOAT:
        return pa.float64()
    if name == s.GENRES:
        return pa.list_(pa.string())
    return pa.string()


EVENT_ARROW_SCHEMA = pa.schema([(c, _arrow_type(c)) for c in EVENT_COLUMNS])
ITEM_ARROW_SCHEMA = pa.schema([(c, _arrow_type(c)) for c in ITEM_COLUMNS])
USER_ARROW_SCHEMA = pa.schema([(c, _arrow_type(c)) for c in USER_COLUMNS])
# Columns a contract requires (never null); every other column may be null.
REQUIRED = {s.EVENT_ID, s.EVENT_TYPE, s.USER_ID, s.ITEM_ID, s.TS, s.TITLE, s.GENRES, s.CREATED_AT,
            s.SIGNUP_TS}


@dataclass
class Dataset:
    """One data source mapped into the contracts.

    Attributes
    ----------
    events : one row per event, columns :data:`EVENT_COLUMNS` (contract event.v1, flat).
    items : one row per item, columns :data:`ITEM_COLUMNS` (contract item.v1; genres are lists).
    users : one row per user, columns :data:`USER_COLUMNS` (contract user.v1).
    name : e.g. ``"ml-100k"``; bundles and reports record it.
    tags : MovieLens free-text tags (user_id, item_id, tag, ts) when the source has them. No
        contract carries tags; they are kept for feature work and never written to the lake.
    """

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    name: str
    tags: pd.DataFrame | None = None


def conform(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """Exactly ``columns`` in order: missing ones added as null, extra ones dropped.

    Integer columns become nullable ``Int64`` (so null stays null in JSON, never ``NaN``) except
    required ones, which stay ``int64``; floats ``float64``; strings ``object``.
    """
    out = pd.DataFrame(index=frame.index)
    for c in columns:
        col = frame[c] if c in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        if c in _INT:
            col = col.astype("int64" if c in REQUIRED else "Int64")
        elif c in _FLOAT:
            col = col.astype("float64")
        elif c != s.GENRES:
            col = col.astype(object).where(col.notna(), None)
        out[c] = col
    return out.reset_index(drop=True)


def positives(events: pd.DataFrame, play_dwell_ms: int | None = None) -> np.ndarray:
    """Boolean mask [n_events]: which events are positive engagements.

    Positive means: an event type in ``schema.POSITIVE_EVENT_TYPES``; a rating with
    ``value >= schema.POSITIVE_RATING``; with ``play_dwell_ms`` set, a play whose dwell is at least
    that long (None: plays alone are not positive).
    """
    etype = events[s.EVENT_TYPE].to_numpy()
    mask = np.isin(etype, s.POSITIVE_EVENT_TYPES)
    value = pd.to_numeric(events[s.VALUE], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    mask |= (etype == s.RATING) & (value >= s.POSITIVE_RATING)
    if play_dwell_ms is not None:
        dwell = events[s.DWELL_MS].to_numpy(dtype=float, na_value=np.nan)
        mask |= (etype == s.PLAY) & (dwell >= play_dwell_ms)
    return mask
