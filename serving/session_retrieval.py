"""Retrieval that learns between nightly runs: ALS fold-in and genre content from the session.

The nightly ALS user vector knows nothing of what the user did since the build, and the
two-tower session query pools only five items. So a burst of engagements (``make demo`` sends 24
Horror clicks and likes) barely moved a known user's feed. Per request, from the session row the
online store already returns (no extra read):

* **ALS fold-in**: the user's vector is re-solved from their nightly vector plus the session's
  recent items (``tandem.models.als.fold_in_one``, the closed-form ALS user step; ~30 us for f = 32
  and 20 items, one f x f solve). Each recent item gets the confidence the session's events
  carry per item (``tandem.models.als`` event weights, capped like the nightly matrix): a click and
  a like on an item weigh 4, as they would in the next nightly fit. A user without ALS factors
  (not in the last build) is folded in from the session alone.
* **Content**: the user's genre profile (their history's ``user_genre_affinity`` plus the
  genres of their recent session items, which weigh more) retrieves the best-matching popular
  items of its top genres (``tandem.policy.retrieval.GenreLists``); the re-ranking can
  calibrate the shown list's genre mix to the genres the session's items agree on
  (``tandem.policy.diversify``), since the ranker, trained on histories, does not rank a
  session's genre up by itself.

Both are functions of the bundle (factors, genres, popularity) and the request's rows, so they
need no state and cannot go stale: the feature consumer writes the session row within a second
of the events (``tandem.streaming.feature_consumer``), and the next request sees them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.features import entity as F
from tandem.models import als as A
from tandem.policy.retrieval import GenreLists, content_profile, session_intent


@dataclass(frozen=True)
class SessionRetrieval:
    """Per-bundle arrays for the fold-in and content sources (built once at engine load).

    Attributes
    ----------
    als_items : float32 [n_items, f] ALS item factors; ``yty`` their Gram matrix [f, f]
    item_genres : bool [n_items, N_GENRES] genre multi-hot (``tandem.features.entity.GENRE_VOCAB``)
    genre_lists : each genre's most popular rows, with their genres and popularity
        (``tandem.policy.retrieval.GenreLists``)
    als_cfg : the ALS configuration the bundle's factors were fitted with (``als/meta.json``:
        the night's tuned regularization and alpha); fold-in must solve with the same
    """

    als_items: np.ndarray
    yty: np.ndarray
    item_genres: np.ndarray
    genre_lists: GenreLists
    als_cfg: Mapping[str, Any] = field(default_factory=lambda: A.ALS_CONFIG)

    @classmethod
    def build(cls, als_items: np.ndarray, item_genres: np.ndarray, popularity: np.ndarray,
              als_cfg: Mapping[str, Any] = A.ALS_CONFIG) -> SessionRetrieval:
        genres = np.asarray(item_genres, bool)
        return cls(als_items, A.gram(als_items), genres,
                   GenreLists.build(genres, np.asarray(popularity, np.float32)),
                   {**A.ALS_CONFIG, **als_cfg})

    def als_query(self, prior: np.ndarray | None, history: np.ndarray,
                  session: Mapping[str, Any] | None) -> np.ndarray | None:
        """The user's ALS vector refolded with the session's recent items (``history``: catalog
        rows, newest first); ``prior`` = the nightly vector (None: not in the build). None when
        there is nothing to fold (no history and no prior)."""
        return A.session_query(self.als_items, self.yty, prior, history, session,
                               dict(self.als_cfg))

    def intent(self, history: np.ndarray) -> np.ndarray:
        """The genres the session's newest items agree on [N_GENRES]: the re-ranking calibrates
        the shown list to them (``tandem.policy.retrieval.session_intent``)."""
        return session_intent(self.item_genres, history)

    def content(self, user: Mapping[str, Any], history: np.ndarray,
                n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the content source for a genre profile from the user's history
        (``user_genre_affinity``) and the session's newest items' genres."""
        profile = content_profile(_affinity(user.get("user_genre_affinity")), self.item_genres,
                                  history)
        return self.genre_lists.candidates(profile, n)


def _affinity(value: Any) -> np.ndarray:
    """``user_genre_affinity`` as float32 [N_GENRES] (a list or an array from the store; zeros
    when absent or malformed, like the feature's default)."""
    out = np.zeros(F.N_GENRES, np.float32) if value is None else np.asarray(value, np.float32)
    if out.shape != (F.N_GENRES,):
        return np.zeros(F.N_GENRES, np.float32)
    return np.clip(np.nan_to_num(out), 0.0, None)
