"""The session sequence model as a serving retrieval source (its own FAISS query).

The query is the user's real-time history as the engine keeps it: the request's session items,
then the online store's ``recent_item_ids`` (the feature consumer's last 20 engaged items, kept
across sessions), newest first and deduplicated, at most 20 -- the query history of
``tandem.features.query_history``, which the model's training rows, the night's ranker and ``make
eval`` compute with the same rule. The model (``tandem.models.sequence``) turns them
into one vector; ``index/sequence.faiss`` returns the items with the largest ``h . E[item]``.

A bundle without the sequence parts (older, or trained without them) has no such source:
:meth:`SequenceSource.load` returns None and the engine retrieves without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tandem.models import bundle as B
from tandem.models.ann import AnnIndex
from tandem.models.sequence import SequenceEncoder

NAME = "sequence"  # the tandem.policy.retrieval source and ranking_features source name


class SequenceSource:
    """The numpy sequence model and its index, read-only after load."""

    def __init__(self, encoder: SequenceEncoder, index: AnnIndex):
        self.encoder = encoder
        self.index = index

    @classmethod
    def load(cls, root: Path) -> SequenceSource | None:
        """The bundle's sequence parts, or None when it has none."""
        root = Path(root)
        if not (root / B.SEQ_MODEL).exists():
            return None
        return cls(SequenceEncoder.load(root / B.SEQ_MODEL, np.load(root / B.SEQ_ITEM_VECTORS)),
                   AnnIndex.load(root / B.INDEX_SEQUENCE))

    def lists(self, history: np.ndarray, n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``[(NAME, rows, scores)]`` of the ``n`` best next items after ``history`` (catalog
        rows, newest first); empty without history."""
        if len(history) == 0 or n <= 0:
            return []
        query = self.encoder.encode(history[: self.encoder.max_len])
        scores, hits = self.index.search(query[None], n)
        ok = hits[0] >= 0
        return [(NAME, hits[0][ok], scores[0][ok])]
