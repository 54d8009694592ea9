"""Deterministic A/B assignment: a user's variant is a pure function of (salt, user id).

``bucket = sha256(salt ":" user_id)[:8] / 2**64`` is uniform on [0, 1); variants own consecutive
slices of that interval in proportion to their weights. The same user gets the same variant on
every server and every restart; changing the salt reshuffles everyone (a new experiment).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Variant:
    """One arm: a registry alias to serve and optional serving-config overrides.

    Attributes
    ----------
    name : str
        Reported in the response and the impression log (``variant``).
    weight : float
        Share of traffic, relative to the other variants' weights (> 0).
    alias : str
        MLflow registry alias of the bundle this arm serves (e.g. ``champion``, ``challenger``).
    overrides : mapping
        Serving-config fields this arm changes (e.g. ``{"mmr_lambda": 0.5}``).
    """

    name: str
    weight: float = 1.0
    alias: str = "champion"
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """A named split of users over variants, salted so experiments are independent."""

    name: str
    salt: str
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("an experiment needs at least one variant")
        if any(v.weight <= 0 for v in self.variants):
            raise ValueError("variant weights must be > 0")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError("variant names must be unique")

    @property
    def aliases(self) -> tuple[str, ...]:
        """Distinct registry aliases the variants serve, in first-seen order."""
        return tuple(dict.fromkeys(v.alias for v in self.variants))

    def assign(self, user_id: str) -> Variant:
        """The variant of ``user_id`` (stable across processes and restarts)."""
        return self.variants[int(np.searchsorted(self._edges, bucket(self.salt, user_id),
                                                 side="right"))]

    @property
    def _edges(self) -> np.ndarray:
        """Upper edges of all but the last variant's slice of [0, 1)."""
        w = np.array([v.weight for v in self.variants], dtype=np.float64)
        return np.cumsum(w / w.sum())[:-1]

    @classmethod
    def single(cls, alias: str = "champion") -> Experiment:
        """No experiment: everyone gets one variant serving ``alias``."""
        return cls("none", "", (Variant("control", 1.0, alias),))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        """From ``{"name", "salt", "variants": [{"name", "weight", "alias", "overrides"}]}``."""
        return cls(str(data["name"]), str(data.get("salt", data["name"])),
                   tuple(Variant(str(v["name"]), float(v.get("weight", 1.0)),
                                 str(v.get("alias", "champion")), dict(v.get("overrides", {})))
                         for v in data["variants"]))

    @classmethod
    def load(cls, path: Path) -> Experiment:
        return cls.from_dict(json.loads(Path(path).read_text()))


def bucket(salt: str, user_id: str) -> float:
    """Uniform hash of ``salt:user_id`` in [0, 1) from the first 8 bytes of SHA-256."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
