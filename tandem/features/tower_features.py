"""Dense input features of the two towers: item content and user profile, numpy only.

Training (``tandem.models.two_tower``) and serving (``tandem.models.user_tower``) encode with the
SAME spec object, saved inside the exported tower, so a fresh item or a new user is featurised
exactly as at training time (skew is a bug).

Item content = genre multi-hot (one slot per known genre) + release-year bucket one-hot (one slot
per bucket, plus one for "unknown year"). User profile = one one-hot block per categorical field
(e.g. age_bucket, gender, occupation), each with a trailing "unknown/other" slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

DEFAULT_YEAR_EDGES = (1960, 1970, 1980, 1990, 1995, 2000, 2005, 2010, 2015, 2020)


def _one_hot(codes: np.ndarray, width: int) -> np.ndarray:
    """Rows of a ``[len(codes), width]`` float32 identity, one per code in ``[0, width)``."""
    out = np.zeros((len(codes), width), dtype=np.float32)
    out[np.arange(len(codes)), codes] = 1.0
    return out


def _codes(values: Sequence, vocab: Sequence[str]) -> np.ndarray:
    """Index of each value in ``vocab``; ``len(vocab)`` (the unknown slot) when absent/None."""
    cat = pd.Categorical(pd.Series(values, dtype="object"), categories=list(vocab))
    codes = np.asarray(cat.codes, dtype=np.int64)
    return np.where(codes < 0, len(vocab), codes)


@dataclass(frozen=True)
class ItemContentSpec:
    """How an item's genres and release year become a float32 vector.

    Attributes
    ----------
    genres : tuple of str
        Known genres in slot order; unknown genres are ignored.
    year_edges : tuple of int
        Ascending bucket edges; bucket ``b`` holds ``edges[b-1] <= year < edges[b]``
        (``len(edges) + 1`` buckets) and one more slot is "year unknown".
    """

    genres: tuple[str, ...]
    year_edges: tuple[int, ...] = DEFAULT_YEAR_EDGES

    @property
    def dim(self) -> int:
        return len(self.genres) + len(self.year_edges) + 2

    @classmethod
    def fit(cls, genres: Sequence[Sequence[str] | None],
            year_edges: Sequence[int] = DEFAULT_YEAR_EDGES) -> ItemContentSpec:
        """The sorted genre vocabulary seen in ``genres`` (one list per item)."""
        vocab = pd.Series(list(genres), dtype="object").explode().dropna().unique()
        return cls(tuple(sorted(str(g) for g in vocab)), tuple(int(e) for e in year_edges))

    def encode(self, genres: Sequence[Sequence[str] | None],
               years: Sequence[float | int | None]) -> np.ndarray:
        """float32 ``[n_items, dim]``: genre multi-hot then year-bucket one-hot.

        Parameters
        ----------
        genres : one list of genre names per item (None = no genres)
        years : release year per item (None/NaN = unknown)
        """
        n = len(genres)
        exploded = pd.Series(list(genres), dtype="object").explode()
        rows = exploded.index.to_numpy()
        cols = _codes(exploded.to_numpy(), self.genres)
        keep = cols < len(self.genres)
        multi = np.zeros((n, len(self.genres)), dtype=np.float32)
        multi[rows[keep], cols[keep]] = 1.0
        y = pd.to_numeric(pd.Series(list(years), dtype="object"), errors="coerce").to_numpy(float)
        bucket = np.searchsorted(np.asarray(self.year_edges), y, side="right")
        bucket = np.where(np.isnan(y), len(self.year_edges) + 1, bucket)
        return np.hstack([multi, _one_hot(bucket, len(self.year_edges) + 2)])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ItemContentSpec:
        d = json.loads(text)
        return cls(tuple(d["genres"]), tuple(d["year_edges"]))


@dataclass(frozen=True)
class UserFeatureSpec:
    """How a user profile's categorical fields become a float32 vector.

    Attributes
    ----------
    fields : tuple of (name, vocabulary) pairs
        Each field gets ``len(vocabulary) + 1`` one-hot slots, the last for unknown/None.
    """

    fields: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def dim(self) -> int:
        return sum(len(v) + 1 for _, v in self.fields)

    @classmethod
    def fit(cls, profiles: pd.DataFrame, columns: Sequence[str]) -> UserFeatureSpec:
        """Sorted vocabulary of each of ``columns`` in ``profiles`` (one row per user)."""
        return cls(tuple(
            (c, tuple(sorted(str(v) for v in profiles[c].dropna().unique()))) for c in columns))

    def encode(self, profiles: pd.DataFrame | Mapping[str, Sequence]) -> np.ndarray:
        """float32 ``[n_users, dim]`` from columns named like the fields (missing column = unknown).

        ``profiles`` may be a DataFrame or a mapping of column -> values (one entry per user).
        """
        frame = pd.DataFrame(profiles)
        n = len(frame)
        blocks = [
            _one_hot(_codes(frame[name].to_numpy() if name in frame else [None] * n, vocab),
                     len(vocab) + 1)
            for name, vocab in self.fields
        ]
        return np.hstack(blocks) if blocks else np.zeros((n, 0), dtype=np.float32)

    def to_json(self) -> str:
        return json.dumps([[name, list(vocab)] for name, vocab in self.fields])

    @classmethod
    def from_json(cls, text: str) -> UserFeatureSpec:
        return cls(tuple((name, tuple(vocab)) for name, vocab in json.loads(text)))
