"""A FAISS index split into S shards, each searched by its own process (scatter-gather).

For a catalog whose index outgrows one node (see the README's "When to shard"): items are split
by catalog row (``row % S``) into S indexes built like the whole one (``tandem.models.ann``, ids =
the catalog rows, so merged hits need no mapping), each loaded (memory-mapped) by one worker
process. :meth:`ShardedIndex.search` sends the queries to every shard at once and merges the S
top-k lists by score: the answer is the whole index's when each shard returns its exact top k,
and the latency is the slowest shard's plus the merge. Here the workers are local processes
over pipes; across nodes the same front would call each shard's search service.

``ShardedIndex`` has ``AnnIndex.search``'s signature, so the engine takes it as its index
(``serving.server --index-shards S``).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np

from tandem.models.ann import AnnIndex, build_index


def build_shards(vectors: np.ndarray, n_shards: int, folder: Path, metric: str = "ip",
                 **build_kwargs) -> list[Path]:
    """Write shard ``i`` (catalog rows ``i, i + S, ...``) of ``vectors`` to ``folder``; returns
    the index paths (an existing complete set is reused)."""
    folder = Path(folder)
    paths = [folder / f"shard-{i}-of-{n_shards}.faiss" for i in range(n_shards)]
    if all(Path(f"{p}.json").exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.arange(len(vectors), dtype=np.int64)
    for i, path in enumerate(paths):
        mine = rows[rows % n_shards == i]
        build_index(np.asarray(vectors[mine]), ids=mine, metric=metric, **build_kwargs).save(path)
    return paths


def _worker(path: str, conn) -> None:
    """One shard's process: search whatever queries arrive until the pipe closes."""
    index = AnnIndex.load(Path(path), mmap=True)
    conn.send("ready")
    while True:
        try:
            queries, k = conn.recv()
        except EOFError:
            return
        conn.send(index.search(queries, k))


class ShardedIndex:
    """Scatter-gather over one worker process per shard index in ``paths``.

    Searches are serialised (one request's queries are on every pipe at a time); the shards
    search in parallel. ``close()`` stops the workers.
    """

    def __init__(self, paths: list[Path]):
        ctx = mp.get_context("spawn")  # no fork: the parent holds threads and FAISS state
        self._conns, self._procs = [], []
        for path in paths:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(str(path), child), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            if conn.recv() != "ready":
                raise RuntimeError("a shard worker failed to load its index")
        self._lock = threading.Lock()

    @property
    def n_shards(self) -> int:
        return len(self._conns)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all shards: (scores float32 ``[m, k]``, ids int64 ``[m, k]``, -1 none)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._lock:
            for conn in self._conns:
                conn.send((q, k))
            parts = [conn.recv() for conn in self._conns]
        scores = np.hstack([p[0] for p in parts])
        ids = np.hstack([p[1] for p in parts])
        scores = np.where(ids >= 0, scores, -np.inf)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(scores, top, 1).astype(np.float32),
                np.take_along_axis(ids, top, 1))

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def sharded_engine(n_shards: int) -> type:
    """An ``Engine`` class whose two-tower index is split into ``n_shards`` shard processes
    (built once per bundle under the engine's cache folder, then reused)."""
    import hashlib
    import weakref

    from serving.engine import Engine
    from serving.shared_memory import DERIVED_DIR
    from tandem.models import bundle as B

    class ShardedEngine(Engine):
        def __init__(self, bundle_dir, version, item_features, cfg, cache_dir=None):
            super().__init__(bundle_dir, version, item_features, cfg, cache_dir)
            if self.main_index is None:
                return
            source = (Path(bundle_dir) / B.INDEX_MAIN).resolve()
            key = hashlib.sha256(f"{source}|{source.stat().st_mtime_ns}".encode()).hexdigest()
            folder = Path(cache_dir) / "derived" if cache_dir else DERIVED_DIR
            paths = build_shards(self.item_vectors, n_shards, folder / f"shards-{key[:24]}")
            self.main_index = ShardedIndex(paths)
            weakref.finalize(self, self.main_index.close)  # a swapped-out engine stops them

    return ShardedEngine
