"""Merge candidate lists from several retrieval sources into one deduplicated, filtered pool.

Sources are numbered by bit (``SOURCE_BITS``); an item found by several sources keeps all their
bits and each source's retrieval score (NaN where a source did not return it), which the ranker
features and the response's explanation use. Everything is array arithmetic over the
concatenated lists: no Python loop over candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# order = bit position = column of CandidatePool.scores; names match the proto's CandidateSource
SOURCES: tuple[str, ...] = ("two_tower", "als", "session", "fresh", "popularity", "content",
                            "similar", "sequence")
SOURCE_BITS: dict[str, int] = {name: 1 << i for i, name in enumerate(SOURCES)}


@dataclass(frozen=True)
class CandidatePool:
    """Deduplicated candidates in ascending row order.

    Attributes
    ----------
    rows : int64 array [n]
        Catalog rows (bundle order), unique.
    source_mask : int64 array [n]
        OR of ``SOURCE_BITS`` of every source that returned the row.
    scores : float32 array [n, len(SOURCES)]
        Retrieval score per source, NaN where that source did not return the row.
    """

    rows: np.ndarray
    source_mask: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> CandidatePool:
        return CandidatePool(self.rows[positions], self.source_mask[positions],
                             self.scores[positions])

    def count_by_source(self) -> dict[str, int]:
        """How many pooled candidates each source contributed (an item counts for each)."""
        return {name: int(np.count_nonzero(self.source_mask & bit))
                for name, bit in SOURCE_BITS.items()}


def merge(lists: Sequence[tuple[str, np.ndarray, np.ndarray]], exclude: np.ndarray,
          n_items: int) -> CandidatePool:
    """Union ``(source, rows, scores)`` lists, drop excluded and invalid rows.

    Parameters
    ----------
    lists : sequence of (source name, int rows [m], float scores [m])
        Rows may repeat across lists and be -1 (FAISS pads short results with -1).
    exclude : int array
        Rows never to return (seen, explicitly excluded); -1 entries are ignored.
    n_items : int
        Catalog size; rows outside ``[0, n_items)`` are dropped.
    """
    if lists:
        rows = np.concatenate([np.asarray(r, dtype=np.int64).ravel() for _, r, _ in lists])
        scores = np.concatenate([np.asarray(s, dtype=np.float32).ravel() for _, _, s in lists])
        col = np.concatenate([np.full(len(np.ravel(r)), SOURCES.index(n), dtype=np.int64)
                              for n, r, _ in lists])
    else:
        rows, scores, col = (np.zeros(0, np.int64), np.zeros(0, np.float32),
                             np.zeros(0, np.int64))
    keep = (rows >= 0) & (rows < n_items) & ~np.isin(rows, exclude)
    rows, scores, col = rows[keep], scores[keep], col[keep]
    unique, inverse = np.unique(rows, return_inverse=True)
    mask = np.zeros(len(unique), dtype=np.int64)
    np.bitwise_or.at(mask, inverse, np.left_shift(1, col))
    table = np.full((len(unique), len(SOURCES)), np.nan, dtype=np.float32)
    table[inverse, col] = scores
    return CandidatePool(unique, mask, table)


N_GENRE_TOP = 200  # popular items kept per genre for content retrieval
# the recent items' genre profile (share of the newest items per genre, so a burst's genre is 1)
# against the history's (user_genre_affinity scaled to sum 1)
RECENT_GENRE_WEIGHT = 2.0
N_RECENT_GENRE_ITEMS = 10  # newest engaged items whose genres form the recent profile


def genre_top_rows(item_genres: np.ndarray, popularity: np.ndarray,
                   m: int = N_GENRE_TOP) -> np.ndarray:
    """int64 [n_vocab, m]: per genre, its ``m`` most popular catalog rows (-1 padded), the
    ``genre_top`` of :func:`content_candidates` (built once per model, not per request)."""
    genres = np.asarray(item_genres, dtype=bool)
    by_pop = np.argsort(-np.asarray(popularity), kind="stable")
    top = np.full((genres.shape[1], m), -1, dtype=np.int64)
    for j in range(genres.shape[1]):  # over genres (a few dozen), not candidates
        hits = by_pop[genres[by_pop, j]][:m]
        top[j, : len(hits)] = hits
    return top


def content_profile(affinity: np.ndarray, item_genres: np.ndarray,
                    recent: np.ndarray) -> np.ndarray:
    """float32 [n_vocab]: the genre profile :func:`content_candidates` draws from.

    ``affinity`` is the user's ``user_genre_affinity`` (share of their positives per genre),
    scaled to sum 1; ``recent`` their newest engaged items (catalog rows, newest first, -1 for
    none), whose genre shares weigh :data:`RECENT_GENRE_WEIGHT` so a burst of one genre moves
    the profile. Serving (``serving.session_retrieval``) and training
    (``tandem.evaluation.protocol``) both build the profile here.
    """
    profile = np.clip(np.nan_to_num(np.asarray(affinity, np.float32)), 0.0, None)
    total = float(profile.sum())
    profile = profile / total if total > 0 else profile
    rows = np.asarray(recent, dtype=np.int64)[:N_RECENT_GENRE_ITEMS]
    rows = rows[rows >= 0]
    if len(rows):
        share = np.asarray(item_genres[rows], np.float32).sum(axis=0) / len(rows)
        profile = profile + RECENT_GENRE_WEIGHT * share
    return profile.astype(np.float32)


# a genre shared by at least this share of the newest engaged items is the session's intent
INTENT_SHARE = 0.5


def session_intent(item_genres: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """float32 [n_vocab]: the genres the user's newest engaged items AGREE on -- each genre's
    share of ``recent`` (catalog rows, newest first, -1 for none; the newest
    :data:`N_RECENT_GENRE_ITEMS`), zero below :data:`INTENT_SHARE`. Twelve Horror films in a row
    give Horror alone; a spread of genres (most histories) gives nothing or their one common
    genre. The re-ranking calibrates the shown list to it (``tandem.policy.diversify``)."""
    rows = np.asarray(recent, dtype=np.int64)[:N_RECENT_GENRE_ITEMS]
    rows = rows[rows >= 0]
    if not len(rows):
        return np.zeros(np.shape(item_genres)[1], np.float32)
    share = np.asarray(item_genres[rows], np.float32).sum(axis=0) / len(rows)
    return np.where(share >= INTENT_SHARE, share, 0.0).astype(np.float32)


def content_candidates(genre_top: np.ndarray, item_genres: np.ndarray, popularity: np.ndarray,
                       profile: np.ndarray, n: int, n_genres: int = 3
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Content-based retrieval: items whose genres match a user's genre profile.

    Parameters
    ----------
    genre_top : int array [n_vocab, m]
        Per genre, its ``m`` most popular catalog rows (-1 padded), precomputed at load.
    item_genres : bool or float array [n_items, n_vocab]
        Genre multi-hot of the catalog.
    popularity : float array [n_items]
        Breaks ties between equally matching items (more popular first).
    profile : float array [n_vocab]
        Weight per genre (>= 0): the user's history and session, see the caller.
    n, n_genres
        Candidates to return; how many of the profile's heaviest genres to draw from.

    Returns
    -------
    (rows [<= n] int64, scores [<= n] float32), best first: score is the cosine between the
    item's genre multi-hot and ``profile``. Only the drawn genres' lists are scored (no pass
    over the catalog), so the cost is ``n_genres * m`` whatever the catalog size.
    """
    top = _drawn_genres(profile, n, n_genres)
    if top is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = np.unique(genre_top[top].ravel())
    rows = rows[rows >= 0]
    hot = np.asarray(item_genres[rows], dtype=np.float32)
    return _rank_by_match(rows, hot, _root_counts(hot), popularity[rows], profile, n)


@dataclass(frozen=True)
class GenreLists:
    """:func:`content_candidates` with what it reads of each genre's list gathered once per
    model: serving draws from the same lists on every request, and gathering their rows' genres
    and popularity from the catalog-wide arrays (random rows of a 1M-item table) cost more
    than the scoring. Same rows and scores as :func:`content_candidates`.

    Attributes
    ----------
    rows : int64 [n_vocab, m] each genre's most popular rows (:func:`genre_top_rows`, -1 padded)
    hot : float32 [n_vocab, m, n_vocab] their genre multi-hot, ``root_counts`` [n_vocab, m] the
        square root of their genre counts (at least 1); popularity : [n_vocab, m] theirs
    """

    rows: np.ndarray
    hot: np.ndarray
    root_counts: np.ndarray
    popularity: np.ndarray

    @classmethod
    def build(cls, item_genres: np.ndarray, popularity: np.ndarray,
              m: int = N_GENRE_TOP) -> GenreLists:
        rows = genre_top_rows(item_genres, popularity, m)
        safe = np.maximum(rows, 0)  # padding slots are dropped before they are read
        hot = np.asarray(item_genres[safe], dtype=np.float32)
        return cls(rows, hot, _root_counts(hot), np.asarray(popularity)[safe])

    def candidates(self, profile: np.ndarray, n: int, n_genres: int = 3
                   ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`content_candidates` of ``profile`` (same arguments and result)."""
        top = _drawn_genres(profile, n, n_genres)
        if top is None:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, first = np.unique(self.rows[top].ravel(), return_index=True)
        first = first[rows >= 0]
        return _rank_by_match(rows[rows >= 0], self.hot[top].reshape(-1, self.hot.shape[2])[first],
                              self.root_counts[top].ravel()[first],
                              self.popularity[top].ravel()[first], profile, n)


def _drawn_genres(profile: np.ndarray, n: int, n_genres: int) -> np.ndarray | None:
    """The profile's ``n_genres`` heaviest genres with weight > 0 (None: nothing to draw)."""
    weights = np.asarray(profile, dtype=np.float32)
    if float(np.linalg.norm(weights)) == 0.0 or n <= 0:
        return None
    top = np.argsort(-weights, kind="stable")[:n_genres]
    return top[weights[top] > 0]


def _root_counts(hot: np.ndarray) -> np.ndarray:
    """sqrt(genres per item), at least 1: the item side of the cosine."""
    return np.sqrt(np.maximum(hot.sum(axis=-1), 1.0))


def _rank_by_match(rows: np.ndarray, hot: np.ndarray, root_counts: np.ndarray,
                   popularity: np.ndarray, profile: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``n`` of ``rows`` (genre multi-hot ``hot``, :func:`_root_counts`) by cosine
    with ``profile``, more popular first among equals."""
    weights = np.asarray(profile, dtype=np.float32)
    norm = float(np.linalg.norm(weights))
    scores = (hot @ weights) / (root_counts * norm)
    order = np.lexsort((-popularity, -scores))[:n]
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


def source_names(mask: int) -> list[str]:
    """Names of the sources set in one ``source_mask`` value (for building a reply)."""
    return [name for name, bit in SOURCE_BITS.items() if mask & bit]
