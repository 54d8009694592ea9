"""Approximate nearest-neighbour indexes over item vectors (FAISS), so serving never scans.

Choice by catalog size (measurements in ../shared/notes/perf-floor.md, 1M x 64, top-500):

- fewer than ``EXACT_BELOW`` items: exact ``IndexFlatIP`` in an ``IndexIDMap2`` (a flat scan of
  20k x 64 costs about what IVF does, and recall is 1);
- otherwise ``IndexIVFFlat``. :func:`tune_index` (the nightly build, both ALS and two-tower)
  tries ``nlist`` in ``NLIST_FACTORS x sqrt(n)``, gives each the smallest ``nprobe`` whose mean
  recall@k against exact search on a sample of the queries serving sends (user vectors, folded-in
  sessions; not items) reaches ``target_recall``, keeps the cheapest (fewest vectors compared per
  query, a deterministic cost) and measures recall and single-thread latency on held-out
  queries; :func:`build_index` is one nlist (default ``4 sqrt(n)``). IVF-PQ fast-scan (4-bit
  codes, ~17 B per item) with an exact re-rank of its best 4-16 x k was measured at 1M items and
  rejected: at equal recall@200 it cost as much CPU per one-query search or more (the probed
  lists hold ~70-125 items each, and fast-scan's per-list work dominates; README, issue 17).
  IVF is preferred over HNSW: HNSW was 3x slower at equal recall, 70x slower to build, and left some
  queries stuck in one popular cluster (per-query recall < 0.5); IVF with enough probes did not.

Metrics: ``"ip"`` for L2-normalised vectors (two-tower; cosine = inner product) and ``"mips"`` for
unnormalised vectors (ALS factors, whose norms grow with popularity). For an IVF ``"mips"`` index
each item gets one extra coordinate ``sqrt(M^2 - |x|^2)`` (``M`` = the largest norm at build) and
each query a 0, which turns maximum inner product into nearest L2 neighbour (Bachrach et al.,
RecSys 2014); returned scores are mapped back to inner products. Queries are scaled to norm ``M``
first (the top-k by inner product does not depend on the query's norm): the coarse quantizer
ranks lists by ``|c|^2 - 2 q.c``, so a short query (an ALS vector folded in from a few session
items has norm ~0.05 where nightly user vectors have ~1) picked lists by centroid norm instead
of direction: on a 200k-item synthetic set, recall@200 of such queries at nprobe 64 was 0.56,
0.94 once scaled.

Ids are the caller's int64 ids (catalog rows), so fresh items can be :meth:`AnnIndex.add`-ed with
new ids between nightly builds. Recall is measured per query (mean, min, 5th percentile).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

EXACT_BELOW = 20_000
# nprobe candidates, in steps of 64 from 256 to 768: at 1M items the ALS index needs 5-10 % of
# its 8000 lists, and a step from 512 to 768 cost 0.9 ms per query (make bench's ALS mix, 8000
# lists: recall@200 0.953 / 0.965 / 0.974 at nprobe 512 / 640 / 768, 3.4 / 4.3 / 5.1 ms CPU).
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 576,
               640, 704, 768, 896, 1024)
NLIST_FACTORS = (2, 4, 8)  # tune_index's candidate nlist = factor * sqrt(n)
TRAIN_POINTS_PER_LIST = 64  # k-means sample size per list: 1M x 64, nlist 4000 trains in ~20 s


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int,
                ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k: (scores ``[m, k]``, ids ``[m, k]``), best first."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(_f32(vectors))
    scores, rows = flat.search(_f32(queries), min(k, len(vectors)))
    return scores, (rows if ids is None else np.asarray(ids, np.int64)[rows])


def recall_stats(approx_ids: np.ndarray, exact_ids: np.ndarray) -> dict[str, float]:
    """Per-query recall ``|approx ∩ exact| / k`` summarised as mean, min and 5th percentile.

    Both arrays are int ``[m, k]`` of distinct ids per row (``-1`` = no result, never a hit).
    """
    both = np.sort(np.hstack([approx_ids, exact_ids]), axis=1)
    hits = ((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum(1)
    per_query = hits / exact_ids.shape[1]
    return {"recall_mean": float(per_query.mean()), "recall_min": float(per_query.min()),
            "recall_p5": float(np.percentile(per_query, 5)), "n_queries": int(len(per_query)),
            "k": int(exact_ids.shape[1])}


@dataclass
class AnnIndex:
    """A FAISS index plus what is needed to query it the same way it was built.

    Attributes
    ----------
    index : ``IndexIDMap2(IndexFlatIP)`` (kind "flat") or ``IndexIVFFlat`` (kind "ivf")
    kind : "flat" or "ivf"
    metric : "ip" (normalised vectors) or "mips" (unnormalised; L2 transform when IVF)
    max_norm : M of the inner-product -> L2 transform ("mips" + "ivf" only, else 0)
    nprobe : IVF lists scanned per query (0 for flat)
    report : build facts: n, nlist, nprobe, recall of the tuning queries
    """

    index: faiss.Index
    kind: str
    metric: str
    max_norm: float = 0.0
    nprobe: int = 0
    report: dict = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def _transformed(self) -> bool:
        return self.metric == "mips" and self.kind == "ivf"

    def _item_side(self, vectors: np.ndarray) -> np.ndarray:
        x = _f32(vectors)
        if not self._transformed:
            return x
        extra = np.sqrt(np.maximum(self.max_norm ** 2 - (x * x).sum(1), 0.0))
        return _f32(np.hstack([x, extra[:, None]]))

    def _query_side(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the queries FAISS searches with, their scale factors or None).

        With the "mips" transform each query is scaled to norm ``max_norm`` (zero queries stay
        zero) and gets a 0 extra coordinate; see the module docstring for why."""
        q = _f32(queries).reshape(-1, self.index.d - int(self._transformed))
        if not self._transformed:
            return q, None
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        scale = np.where(norm > 0, self.max_norm / np.maximum(norm, 1e-30), 1.0).astype(np.float32)
        return _f32(np.hstack([q * scale, np.zeros((len(q), 1), np.float32)])), scale

    def set_nprobe(self, nprobe: int) -> None:
        if self.kind == "ivf":
            self.nprobe = int(nprobe)
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores float32 ``[m, k]``, ids int64 ``[m, k]``, -1 = none).

        ``queries`` is ``[m, d]`` or one ``[d]`` vector (then m = 1).
        """
        q, scale = self._query_side(queries)
        dist, ids = self.index.search(q, k)
        if scale is not None:  # |sq - x'|^2 = |sq|^2 + M^2 - 2 s q.x  ->  q.x; empty slots
            # (id -1, distance float max: clamped so the division cannot overflow) -> -inf
            dist = np.where(ids >= 0, ((q * q).sum(1, keepdims=True) + self.max_norm ** 2
                                       - np.minimum(dist, 4 * self.max_norm ** 2 + 1))
                            / (2 * scale), -np.inf).astype(np.float32)
        return dist, ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Insert or replace items ``ids`` (int64 ``[m]``) with ``vectors [m, d]``.

        Fresh items between nightly builds get new ids (e.g. catalog rows past the bundle's).
        With the "mips" IVF transform, an item whose norm exceeds the build-time ``max_norm`` is
        stored with a 0 extra coordinate and may rank slightly low until the next build.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.index.remove_ids(ids)
        self.index.add_with_ids(self._item_side(vectors), ids)

    def save(self, path: Path) -> Path:
        """Write ``path`` (faiss.write_index) and ``path.json`` (kind, metric, M, nprobe...)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(path))
        meta = {k: v for k, v in asdict(self).items() if k != "index"}
        Path(f"{path}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> AnnIndex:
        """The index saved at ``path``; ``mmap`` maps its vectors from the file instead of
        reading them (IVF lists or flat codes): processes serving one file share one copy in
        the page cache. A mapped index is read-only (no :meth:`add`)."""
        meta = json.loads(Path(f"{path}.json").read_text())
        flags = 0
        if mmap:
            flags = faiss.IO_FLAG_MMAP if meta["kind"] == "ivf" else faiss.IO_FLAG_MMAP_IFC
        out = cls(faiss.read_index(str(path), flags), **meta)
        out.set_nprobe(out.nprobe)
        if mmap and meta["kind"] == "ivf":
            _no_prefetch_threads(out.index)
        return out


def _no_prefetch_threads(index: faiss.Index) -> None:
    """Turn off the prefetch of a mapped IVF index's lists (``OnDiskInvertedLists``).

    By default every ``search`` call starts 32 threads to read the probed lists ahead (meant
    for lists on a slow disk) and joins them: a one-query search of the 1M-item bench index
    at nprobe 24 took 3.3 ms instead of 0.6 ms (0.6 ms loaded into memory), and concurrent
    requests spawned threads by the hundred. The pages are in the page cache (shared by the
    server processes); reading them in the search thread returns the same ids."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0


def measure_recall(index: AnnIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 500,
                   ids: np.ndarray | None = None) -> dict[str, float]:
    """Recall@k of ``index`` against exact inner-product search over ``vectors`` (ids = rows
    unless ``ids`` is given), per query; see :func:`recall_stats`."""
    _, exact = exact_top_k(vectors, queries, k, ids)
    _, approx = index.search(queries, exact.shape[1])
    return recall_stats(approx, exact)


def build_index(vectors: np.ndarray, ids: np.ndarray | None = None, metric: str = "ip",
                kind: str = "auto", exact_below: int = EXACT_BELOW, nlist: int | None = None,
                target_recall: float = 0.95, k: int = 500, queries: np.ndarray | None = None,
                n_tune_queries: int = 200, margin: float = 0.01,
                random_state: int = 0) -> AnnIndex:
    """Build the index for ``vectors`` and, for IVF, tune ``nprobe`` to ``target_recall``.

    Parameters
    ----------
    vectors : float32 ``[n, d]`` item vectors (normalised for "ip", raw for "mips")
    ids : int64 ``[n]`` ids to return (default: row numbers = catalog order)
    metric : "ip" or "mips" (see module docstring)
    kind : "auto" (flat below ``exact_below`` items, else IVF), "flat" or "ivf"
    nlist : IVF lists (default ``4 sqrt(n)``)
    target_recall, k, margin : nprobe is the smallest in ``NPROBE_GRID`` whose mean recall@k
        on the tuning queries is >= ``target_recall + margin`` (the margin keeps unseen queries
        at the target: at 1M items, tuning to exactly 0.95 gave 0.93 on other queries)
    queries : ``[m, d]`` tuning queries: what serving searches with (user vectors); the
        default, ``n_tune_queries`` items, only suits item-to-item search
    random_state : seeds the query sample and k-means

    Returns
    -------
    AnnIndex whose ``report`` holds n, kind, nlist, nprobe, the tuning recall stats and
    ``cost`` (vectors compared per tuning query: the nlist centroids plus the probed lists)
    """
    if metric not in ("ip", "mips"):
        raise ValueError(f"metric must be 'ip' or 'mips', not {metric!r}")
    x = _f32(vectors)
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, np.int64)
    rng = np.random.default_rng(random_state)
    if queries is None:
        queries = x[rng.choice(n, size=min(n_tune_queries, n), replace=False)]
    kind = ("flat" if n < exact_below else "ivf") if kind == "auto" else kind
    if kind == "flat":
        out = AnnIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(d)), "flat", metric)
        out.add(x, ids)
    elif kind == "ivf":
        out = _build_ivf(x, ids, metric, nlist or max(1, int(4 * math.sqrt(n))), random_state)
    else:
        raise ValueError(f"kind must be 'auto', 'flat' or 'ivf', not {kind!r}")
    _, exact = exact_top_k(x, queries, k, ids)
    nlist = out.report.get("nlist", 0)
    stats: dict[str, float] = {}
    for nprobe in [p for p in NPROBE_GRID if p < nlist] + [0]:
        out.set_nprobe(nprobe or nlist)
        faiss.cvar.indexIVF_stats.reset()
        stats = recall_stats(out.search(queries, exact.shape[1])[1], exact)
        if stats["recall_mean"] >= min(target_recall + margin, 1.0):
            break
    cost = (nlist + faiss.cvar.indexIVF_stats.ndis / len(queries)) if kind == "ivf" else n
    out.report.update({"n": n, "kind": out.kind, "nprobe": out.nprobe, "cost": float(cost),
                       **stats})
    return out


def tune_index(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip",
               ids: np.ndarray | None = None, target_recall: float = 0.95,
               exact_below: int = EXACT_BELOW, nlist_factors: tuple[float, ...] = NLIST_FACTORS,
               margin: float = 0.01, random_state: int = 0) -> AnnIndex:
    """The cheapest index over ``vectors`` whose recall@k reaches ``target_recall`` on the
    queries serving sends, with its recall and latency measured on queries it was not tuned on.

    The nightly build of every retrieval index (``jobs/build_index.py``: ALS, two-tower,
    sequence) calls this one function with its own queries and its serving ``k``.

    Parameters
    ----------
    vectors, ids, metric : as :func:`build_index`
    queries : ``[m, d]`` a sample of real serving queries (user vectors, folded-in sessions,
        session centroids), m >= 2: the first half tunes, the second half is held out
    k : the number of neighbours serving asks this index for
    target_recall, margin : per nlist, ``nprobe`` is the smallest reaching
        ``target_recall + margin`` on the tuning half (:func:`build_index`)
    nlist_factors : candidate ``nlist = factor * sqrt(n)``; each candidate is trained and
        filled in turn (peak memory: two indexes, ~2 x 1M x 65 x 4 B for ALS at 1M items)
    random_state : seeds k-means

    Returns
    -------
    The chosen AnnIndex. Its ``report`` (saved in the ``.json`` sidecar, which serving loads
    with the index: :meth:`AnnIndex.load` applies ``nprobe``) adds ``k``, ``target_recall``,
    ``candidates`` (nlist, nprobe, tuning recall, cost each), ``measured_recall_*`` on the
    held-out half and ``latency_ms_p50`` / ``latency_ms_p99`` (one query per call, one
    thread, held-out half). The choice is by ``cost`` (vectors compared per query), not by
    timing, so a re-run on the same inputs picks the same index on a busy machine too.
    """
    x = _f32(vectors)
    queries = _f32(queries)
    half = max(1, len(queries) // 2)
    tune_q, held_out = queries[:half], (queries[half:] if len(queries) > half else queries)
    common = {"ids": ids, "metric": metric, "target_recall": target_recall, "k": k,
              "queries": tune_q, "margin": margin, "random_state": random_state}
    if len(x) < exact_below:
        nlists: list[int | None] = [None]
        common["kind"] = "flat"
    else:
        nlists = sorted({max(1, int(f * math.sqrt(len(x)))) for f in nlist_factors})
        common["kind"] = "ivf"
    best, candidates = None, []
    for nlist in nlists:
        index = build_index(x, nlist=nlist, **common)
        candidates.append({key: index.report.get(key) for key in
                           ("nlist", "nprobe", "recall_mean", "cost")})
        if best is None or index.report["cost"] < best.report["cost"]:
            best = index
        del index  # at most two candidates alive at once
    best.report.update({"k": k, "target_recall": target_recall, "candidates": candidates,
                        "n_tune_queries": len(tune_q)})
    recall = measure_recall(best, x, held_out, k=k, ids=ids)
    best.report.update({f"measured_{key}": v for key, v in recall.items()})
    best.report.update(measure_latency(best, held_out, k))
    return best


def sample_sessions(vectors: np.ndarray, users: np.ndarray, max_len: int,
                    rng: np.random.Generator, pool: int = 100) -> list[np.ndarray]:
    """One made-up session per user query for tuning: 1..``max_len`` distinct catalog rows
    drawn from the user's exact top-``pool`` items (what they are shown and engage with).

    The nightly build has no sessions, yet serving folds them into its queries (ALS fold-in,
    the two-tower session centroid), which land elsewhere than the users' nightly vectors."""
    _, top = exact_top_k(vectors, users, pool)
    return [rng.choice(row[row >= 0], size=min(int(rng.integers(1, max_len + 1)),
                                               int((row >= 0).sum())), replace=False)
            for row in top]


def measure_latency(index: AnnIndex, queries: np.ndarray, k: int,
                    warmup: int = 10) -> dict[str, float]:
    """Single-thread latency of one-query searches (as serving sends them): median and p99 in
    ms over ``queries`` after ``warmup`` untimed calls. Informational (a busy machine inflates
    it); FAISS's thread count is restored after."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for one in queries[:warmup]:
            index.search(one, k)
        times = np.empty(len(queries))
        for i, one in enumerate(queries):
            start = time.perf_counter()
            index.search(one, k)
            times[i] = time.perf_counter() - start
    finally:
        faiss.omp_set_num_threads(threads)
    return {"latency_ms_p50": float(np.median(times) * 1e3),
            "latency_ms_p99": float(np.percentile(times, 99) * 1e3)}


def _build_ivf(x: np.ndarray, ids: np.ndarray, metric: str, nlist: int,
               random_state: int) -> AnnIndex:
    """Train and fill an IndexIVFFlat (k-means on a sample of ``TRAIN_POINTS_PER_LIST * nlist``)."""
    max_norm = float(np.linalg.norm(x, axis=1).max()) if metric == "mips" else 0.0
    out = AnnIndex(None, "ivf", metric, max_norm=max_norm)
    xt = out._item_side(x)
    if metric == "mips":
        quantizer, faiss_metric = faiss.IndexFlatL2(xt.shape[1]), faiss.METRIC_L2
    else:
        quantizer, faiss_metric = faiss.IndexFlatIP(xt.shape[1]), faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexIVFFlat(quantizer, xt.shape[1], nlist, faiss_metric)
    index.cp.seed = random_state
    rng = np.random.default_rng(random_state)
    sample = rng.choice(len(xt), size=min(len(xt), TRAIN_POINTS_PER_LIST * nlist), replace=False)
    index.train(xt[np.sort(sample)])
    index.add_with_ids(xt, ids)
    out.index = index
    out.report["nlist"] = nlist
    return out
