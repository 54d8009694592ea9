"""The bundle's LightGBM ranker as serving calls it: lleaves-compiled when available."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class Ranker:
    """The bundle's LightGBM model, compiled with lleaves when available (same scores)."""

    def __init__(self, model_file: Path, backend: str = "auto", cache_dir: Path | None = None):
        import lightgbm as lgb

        self.booster = lgb.Booster(model_file=str(model_file))
        self.n_features = self.booster.num_feature()
        self.compiled = None
        if backend in ("auto", "lleaves"):
            try:
                self.compiled = _compile_lleaves(Path(model_file), cache_dir)
            except ImportError:
                if backend == "lleaves":
                    raise
        self.backend = "lleaves" if self.compiled is not None else "lightgbm"

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores [n] float64 for features [n, n_features]."""
        if self.compiled is not None:
            return self.compiled.predict(np.ascontiguousarray(x, dtype=np.float64), n_jobs=1)
        return self.booster.predict(x, num_threads=1)


def _compile_lleaves(model_file: Path, cache_dir: Path | None):
    """lleaves model compiled once per model text (cached as ``<sha256>.so``)."""
    import lleaves

    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:24]
    cache = Path(cache_dir or Path.home() / ".cache" / "tandem" / "lleaves")
    cache.mkdir(parents=True, exist_ok=True)
    compiled = lleaves.Model(model_file=str(model_file))
    compiled.compile(cache=str(cache / f"{digest}.so"), fblocksize=34)
    return compiled

