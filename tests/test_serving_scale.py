"""Serving at scale: precomputed feeds (freshness), caches (hits, invalidation on swap),
memory-mapped bundle arrays shared by processes, and the bulk Redis load of the benchmark.

The engine runs for real over a small synthetic bundle; feeds are stored in a real SQLite file
(the SQLite online store's) or a real redis-server; session rows change through the feature
consumer's own session code (``tandem.streaming.session_state``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import psutil
import pytest
import scipy.sparse as sp

from serving import metrics
from serving import shared_memory as shm
from serving.app import App, ItemFeatures, ServingConfig, UserRows
from serving.bundle_sync import fetch_once
from serving.engine import Engine
from serving.id_index import IdIndex
from serving.precompute_feeds import active_users, compute_feeds
from serving.precomputed import MAX_AGE_MS, SqliteFeeds, WithFeeds
from serving.server import local_source
from serving.validation import RecommendQuery
from tandem import schema as s
from tandem.features import ranking_features as RF
from tandem.models import bundle as B
from tandem.models import synthetic_bundle as S
from tandem.streaming.session_state import apply_event, session_row
from tests.conftest import free_port, free_ports, wait_for_metrics
from tests.test_serving import SPEC, SynthStore

pytestmark = pytest.mark.serving

CFG = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=500.0,
                    rank_deadline_ms=5000.0)
NOW = S.NOW_MS


class SessionStore(SynthStore):
    """The synthetic world's rows, with session rows a test can change (as the consumer does)."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}

    def fetch(self, user_id: str) -> UserRows:
        rows = super().fetch(user_id)
        if rows.user is None:
            return rows
        return UserRows(rows.user, self.sessions.get(user_id, rows.session))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two versions of test_serving's synthetic world (seeds 0 and 7) and its item table."""
    root = tmp_path_factory.mktemp("scale")
    built = [S.build(root / f"seed{seed}", S.SyntheticSpec(**{**SPEC.__dict__, "seed": seed}))
             for seed in (0, 7)]
    frame = pd.read_parquet(built[0][1])
    return {"bundle": built[0][0], "bundle2": built[1][0], "features": built[0][1],
            "items": lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids))}


def _app(world, store, bundles: list[Path]) -> App:
    """An App whose alias moves to the next of ``bundles`` at each ``poll_once`` (versions
    ``v0``, ``v1``, ...: ``local_source``'s ``local-<created_at seconds>`` is the same for two
    bundles built within one second, and then no swap happens)."""
    current = [0]

    def fetch(alias):
        return local_source(bundles[current[0]])[0](alias)[0], f"v{current[0]}"

    def probe(alias):
        return f"v{current[0]}"

    app = App(fetch, probe, None, CFG, store, item_features=world["items"])
    app.advance = lambda: current.__setitem__(0, current[0] + 1)
    return app


def _q(user_id: str, **kw) -> RecommendQuery:
    return RecommendQuery(user_id, 10, "tv", "DE", "home", NOW, **kw)


def test_precomputed_feed_is_served_until_a_session_event_or_a_model_swap(world, tmp_path):
    base = SessionStore()
    feeds = SqliteFeeds(tmp_path / "online_store.db")
    app = _app(world, WithFeeds(base, feeds), [world["bundle"], world["bundle2"]])
    engine = app.engines["champion"]
    users = ["u1", "u2", "u3"]
    done = compute_feeds(engine, base, users, CFG, 50, feeds, now_ms=NOW)
    assert done == {"users": 3, "written": 3, "skipped": 0}
    stored = feeds.get("u1")
    assert stored.model_version == engine.version and len(stored.item_ids) == 50

    # fresh and valid: the stored feed, first k items
    first = app.recommend(_q("u1"))
    assert first.path == "precomputed" and first.model_version == engine.version
    assert first.item_ids == list(stored.item_ids[:10])
    # live filter: an excluded item is dropped and the next stored item moves up
    excluded = app.recommend(_q("u1", exclude_item_ids=(stored.item_ids[0],)))
    assert excluded.path == "precomputed"
    assert excluded.item_ids == list(stored.item_ids[1:11])
    # too old: computed
    late = app.recommend(RecommendQuery("u1", 10, "tv", ts=NOW + MAX_AGE_MS + 1))
    assert late.path == "computed"
    # a request carrying its own session items: computed
    assert app.recommend(_q("u1", session_item_ids=("i5",))).path == "computed"

    # a session event arrives: the feature consumer rewrites u1's session row
    watched = stored.item_ids[3]
    state = None
    for ts, item in ((NOW - 120_000, "i7"), (NOW - 1_000, watched)):
        state = apply_event(state, {s.TS: ts, s.EVENT_TYPE: "play", s.ITEM_ID: item,
                                    s.USER_ID: "u1"}, {})
    base.sessions["u1"] = session_row("u1", state)
    after = app.recommend(_q("u1"))
    assert after.path == "computed" and watched not in after.item_ids
    assert app.recommend(_q("u2")).path == "precomputed"  # untouched users keep theirs

    # a model swap: no feed of the old version is served
    app.advance()
    assert app.poll_once() == ["champion"]
    swapped = app.recommend(_q("u2"))
    assert swapped.path == "computed" and swapped.model_version != engine.version
    app.close()


def test_a_server_started_on_a_state_root_accepts_the_hourly_jobs_feeds(tmp_path):
    """The feed's config key ignores deployment knobs: the server's --feast-home gives it a
    deltas folder (and it logs feature rows), the hourly job builds its own config; with those
    in the key no stored feed was ever served (make bench: 0 % precomputed)."""
    from serving.precomputed import config_key
    from serving.server import arg_parser, config_from_args
    from tandem.config import Paths
    from tandem.models.bundle import DELTAS

    paths = Paths(tmp_path)
    server = config_from_args(arg_parser().parse_args(["--feast-home", str(tmp_path)]))
    job = ServingConfig(deltas_dir=str(paths.models.resolve() / DELTAS))
    assert server.deltas_dir == job.deltas_dir
    assert config_key(server) == config_key(job) == config_key(ServingConfig())
    assert config_key(server) != config_key(config_from_args(arg_parser().parse_args(
        ["--feast-home", str(tmp_path), "--mmr-lambda", "0.3"])))  # ranking knobs still count


def test_active_users_takes_the_top_share_of_the_days_latest_rows(tmp_path):
    part = tmp_path / f"{s.DATE}=2026-01-01"
    part.mkdir()
    ts = pd.Timestamp("2026-01-01T10:00:00Z")
    pd.DataFrame({s.USER_ID: ["a", "b", "c", "d", "a"],
                  "user_events_7d": [5, 50, 7, 1, 90],
                  s.EVENT_TIMESTAMP: [ts, ts, ts, ts, ts + pd.Timedelta(hours=1)]}
                 ).to_parquet(part / "part-0.parquet")
    end = pd.Timestamp("2026-01-01T12:00:00Z").to_pydatetime()
    assert active_users(tmp_path, end, 0.5, 100) == ["a", "b"]  # a's latest row counts
    assert active_users(tmp_path, end, 1.0, 3) == ["a", "b", "c"]
    early = pd.Timestamp("2026-01-01T10:30:00Z").to_pydatetime()  # a's 11:00 row is later
    assert active_users(tmp_path, early, 0.25, 100) == ["b"]


def test_cold_start_and_similar_items_are_cached_and_a_swap_empties_the_caches(world):
    app = _app(world, SessionStore(), [world["bundle"], world["bundle2"]])
    cold = "u99999999"  # past n_users: no rows, no factors
    hits = metrics.CACHE_LOOKUPS.labels("cold_start", "hit")
    before = hits._value.get()
    q = _q(cold, onboarding_genres=("Comedy",))
    first = app.recommend(q)
    second = app.recommend(q)
    assert first.cold_start and second.cold_start and second.path == "cached"
    assert hits._value.get() == before + 1 + (first.path == "cached")
    # the live filter still applies to a cached pool
    excluded = app.recommend(_q(cold, onboarding_genres=("Comedy",),
                                exclude_item_ids=tuple(second.item_ids)))
    assert excluded.path == "cached" and not set(excluded.item_ids) & set(second.item_ids)
    item = first.item_ids[0]
    a = app.similar(item, 5)
    b = app.similar(item, 5)
    assert a.item_ids == b.item_ids and len(app.engines["champion"].similar_cache) >= 1
    old = app.engines["champion"]
    app.advance()
    assert app.poll_once() == ["champion"]
    new = app.engines["champion"]
    row = int(old.item_index.get_loc(item))
    assert (row, 5) in old.similar_cache._lru
    # the new engine's caches hold only what its own warm-up asked (one cold pool, one list)
    assert new is not old and len(new.cold_cache) == 1 and (row, 5) not in new.similar_cache._lru
    misses = metrics.CACHE_LOOKUPS.labels("cold_start", "miss")
    before_miss = misses._value.get()
    assert app.recommend(_q(cold, onboarding_genres=("Drama", "Comedy"))).path == "computed"
    assert misses._value.get() == before_miss + 1
    app.close()


_CHILD = """
import sys, time
import numpy as np
from pathlib import Path
from serving import shared_memory as shm
from tandem.features import ranking_features as RF
from tandem.models.ann import AnnIndex
root, mapped = Path(sys.argv[1]), sys.argv[2] == "mmap"
if mapped:
    arr = shm.load_array(root / "vectors.npy")
    unit = shm.derived_array(root / "vectors.npy", "unit", RF.unit_rows, root / "derived")
    index = shm.load_index(root / "index.faiss")
else:  # the control: the same arrays read into private memory
    arr = np.load(root / "vectors.npy")
    unit = RF.unit_rows(arr)
    index = AnnIndex.load(root / "index.faiss")
index.set_nprobe(index.report["nlist"])
total = float(arr.sum()) + float(unit.sum())
index.search(np.asarray(arr[:64]), 10)
print("ready", flush=True)
time.sleep(120)
"""


def test_two_processes_share_the_mapped_bundle_arrays(tmp_path):
    """Two processes map the same vectors, derived unit rows and IVF index: each one's unique
    memory (USS) is smaller by about those arrays than that of a process reading them into
    memory (the control), and one derived file serves both."""
    from tandem.models.ann import build_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((120_000, 64)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", vectors)
    build_index(vectors, metric="mips", kind="ivf", nlist=64, k=10,
                n_tune_queries=20).save(tmp_path / "index.faiss")
    mapped_mb = 3 * vectors.nbytes / 2**20  # vectors, unit rows, the index's lists
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode], cwd=repo,
                              stdout=subprocess.PIPE, text=True)
             for mode in ("mmap", "mmap", "copy")]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        uss = [psutil.Process(p.pid).memory_full_info().uss / 2**20 for p in procs]
        for mapped in uss[:2]:
            assert mapped < uss[2] - 0.8 * mapped_mb, (uss, mapped_mb)
        assert len(list((tmp_path / "derived").glob("*.npy"))) == 1  # one file, both map it
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_id_index_finds_rows_like_a_pandas_index():
    ids = ["i10", "i2", "b", "i1", "ü-7", "i100"]
    index, control = IdIndex.of(ids), pd.Index(ids)
    keys = ["i1", "i10", "i100", "i1000", "i", "", "zz", "ü-7", "b", "a", "i2"]
    np.testing.assert_array_equal(index.get_indexer(keys), control.get_indexer(keys))
    assert index.get_indexer(np.array(keys, dtype=object)).tolist() == \
        control.get_indexer(keys).tolist()
    assert index.get_loc("i100") == 5 and index[[4, 0]].tolist() == ["ü-7", "i10"]
    with pytest.raises(KeyError):
        index.get_loc("i1000")
    assert index.get_indexer([]).shape == (0,)
    assert IdIndex.of([]).get_indexer(["i1"]).tolist() == [-1] and len(IdIndex.of([])) == 0


def test_mapped_catalog_item_table_and_cooc_answer_like_the_in_memory_ones(world, tmp_path):
    """The engine's catalog ids, user ids, item feature table and co-occurrence matrix are
    files mapped read-only, written once (a second engine maps the same files, computing
    nothing), and answer exactly like the in-memory ``pd.Index`` / ``ItemFeatures`` / CSR."""
    bundle = tmp_path / "bundle"
    shutil.copytree(world["bundle"], bundle)
    items = pd.read_parquet(bundle / B.ITEMS)[s.ITEM_ID].astype(str)
    users = pd.read_parquet(bundle / B.USERS)[s.USER_ID].astype(str)
    rng = np.random.default_rng(5)
    inter = (rng.random((400, len(items))) < 0.01).astype(np.float32)
    cooc = RF.cooccurrence(sp.csr_matrix(inter))
    sp.save_npz(bundle / B.RANKER_COOC, cooc)
    derived = tmp_path / "cache" / "derived"

    def table(ids):
        return ItemFeatures.shared(world["features"], ids, derived)

    engine = Engine(bundle, "v0", table, CFG, tmp_path / "cache")
    assert engine.item_ids.tolist() == items.tolist()
    for mapped in (engine.item_ids, engine.item_index.sorted_ids, engine.user_index.order,
                   engine.item_features.static, engine.popularity):
        assert shm.is_mapped(mapped) and not mapped.flags.writeable
    keys = [items[5], "nope", items[0], items.iloc[-1], items[5] + "-x", items[5][:-1], ""]
    np.testing.assert_array_equal(engine.item_index.get_indexer(keys),
                                  pd.Index(items).get_indexer(keys))
    assert engine.rows_of(keys).tolist() == [5, 0, len(items) - 1]  # unknown ids dropped
    user_keys = [users[0], users.iloc[-1], "u99999999", users[7], users[7] + "x"]
    np.testing.assert_array_equal(engine.user_index.get_indexer(user_keys),
                                  pd.Index(users).get_indexer(user_keys))

    memory = ItemFeatures.from_frame(pd.read_parquet(world["features"]), pd.Index(items))
    for name in ("static", "last_event_ts", "created_at"):
        np.testing.assert_array_equal(getattr(engine.item_features, name), getattr(memory, name))
    rows = np.array([3, 0, len(items) - 1, 3])
    np.testing.assert_array_equal(engine.item_features.take(rows, NOW), memory.take(rows, NOW))
    # ids the parquet has no row for read as the default row, as in memory
    extra = np.array([*items, "new-item"])
    unknown = ItemFeatures.shared(world["features"], extra, derived)
    control = ItemFeatures.from_frame(pd.read_parquet(world["features"]), pd.Index(extra))
    np.testing.assert_array_equal(unknown.take(np.array([len(items), 1]), NOW),
                                  control.take(np.array([len(items), 1]), NOW))

    memory_space = RF.ItemSpace(engine.space.unit_vectors, cooc)
    cols = np.repeat(rng.integers(0, len(items), 12), 50)
    at = rng.integers(0, len(items), len(cols))
    np.testing.assert_array_equal(engine.space.cooc_values(at, cols),
                                  memory_space.cooc_values(at, cols))
    assert engine.space.cooc_values(at, cols).any()
    assert shm.is_mapped(engine.space.cooc_columns().data)  # mapped, not rebuilt

    files = {f: f.stat().st_mtime_ns for f in derived.glob("*.npy")}
    again = Engine(bundle, "v0", table, CFG, tmp_path / "cache")  # written once: mapped again
    assert {f: f.stat().st_mtime_ns for f in derived.glob("*.npy")} == files
    assert again.item_index.get_indexer(keys).tolist() == \
        engine.item_index.get_indexer(keys).tolist()


def test_fetch_once_downloads_a_version_once_and_prunes_unlinked_downloads(world, tmp_path):
    shared, calls = tmp_path / "shared", []

    def download(version):
        def into(dest: Path) -> Path:
            calls.append(version)
            out = dest / f"v{version}" / "bundle"
            shutil.copytree(world["bundle"], out)
            return out
        return into

    first = fetch_once("1", shared, tmp_path / "process-0", download("1"))
    second = fetch_once("1", shared, tmp_path / "process-1", download("1"))
    assert calls == ["1"] and first != second and (first / B.ITEMS).exists()
    manifest = [p.relative_to(first) for p in first.rglob("*") if p.is_file()]
    for rel in manifest:  # the same inodes: one download, page cache shared
        assert (first / rel).stat().st_ino == (second / rel).stat().st_ino \
            == (shared / "v1" / "bundle" / rel).stat().st_ino

    shutil.rmtree(tmp_path / "process-0" / "v1")  # what each ledger's prune does after a swap
    fetch_once("2", shared, tmp_path / "process-0", download("2"))
    assert (shared / "v1").exists()  # process-1 still links it
    shutil.rmtree(tmp_path / "process-1" / "v1")
    fetch_once("2", shared, tmp_path / "process-1", download("2"))
    assert calls == ["1", "2"] and sorted(p.name for p in shared.iterdir()
                                          if not p.name.startswith(".")) == ["v2", "v2.json"]

    def broken(dest: Path) -> Path:
        raise RuntimeError("digest")

    with pytest.raises(RuntimeError):
        fetch_once("3", shared, tmp_path / "process-0", broken)
    assert not (shared / "v3.json").exists()  # no record: the next call downloads again
    assert (fetch_once("3", shared, tmp_path / "process-0", download("3")) / B.ITEMS).exists()


@pytest.mark.mlflow
def test_two_server_processes_with_a_registry_download_the_bundle_once(world, mlflow_server,
                                                                       tmp_path):
    """``--processes 2`` with a registry: one download, hard-linked into each process's
    folder (same inodes, so the mapped arrays are one copy in the page cache), both serve it."""
    from serving.bundle_sync import BundleLedger
    from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
    from tandem.ops import registry
    from tests.test_serving import _req

    alias = f"uss-{uuid.uuid4().hex[:8]}"
    version = str(registry.log_bundle(world["bundle"], tracking_uri=mlflow_server.url,
                                      alias=alias))
    cache = tmp_path / "cache"
    port, (metrics_port, _) = free_port(), free_ports(2)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--alias", alias, "--tracking-uri",
         mlflow_server.url, "--cache-dir", str(cache), "--port", str(port), "--metrics-port",
         str(metrics_port), "--processes", "2", "--ranker-backend", "lightgbm"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_metrics(proc, (metrics_port, metrics_port + 1), 600, tmp_path / "server.log")
        download = cache / "shared" / f"v{version}"
        assert [p.name for p in (cache / "shared").iterdir() if p.is_dir()] == [download.name]
        files = {p.relative_to(download): p.stat() for p in download.rglob("*") if p.is_file()}
        assert files and all(st.st_nlink == 3 for st in files.values())  # + one link each
        for i in (0, 1):
            own = (cache / f"process-{i}").resolve()
            assert {rel: (own / download.name / rel).stat().st_ino for rel in files} == \
                {rel: st.st_ino for rel, st in files.items()}
            good = BundleLedger(own).last_good(alias)
            assert good is not None and good[1] == version and own in good[0].parents
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        reply = pb_grpc.RecommenderStub(channel).Recommend(_req("u3"), timeout=30)
        assert reply.model_version == version and len(reply.items) == 10
        channel.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.redis
@pytest.mark.feast
def test_bulk_loaded_redis_users_read_like_feast_writes_and_serve_stored_feeds(world, tmp_path):
    """``write_shared_rows`` (the benchmark's 5M-user load) stores exactly what Feast's own
    ``write_to_online_store`` stores, and feeds in the same Redis are served by the App."""
    from serving.precomputed import open_feeds
    from serving.stores import FeastStore
    from tandem.config import Paths
    from tandem.features import feature_store as FS
    from tandem.features import online as FO
    from tandem.ops.redis_server import RedisServer

    try:
        redis = RedisServer(tmp_path / "redis", free_port())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        fs = FS.apply(Paths(tmp_path / "home"), profile="redis", redis=redis.url)
        views = [s.USER_PROFILE_VIEW, s.USER_ACTIVITY_VIEW]
        now = pd.Timestamp(NOW, unit="ms", tz="UTC")
        profiles = S.profile_rows(8, SPEC.n_items).assign(**{s.EVENT_TIMESTAMP: now})
        rows = np.arange(300)
        assert FS.write_shared_rows(fs, views, profiles, S.user_id(rows),
                                    S.profile_of(rows, 8), batch=128) == 300
        # the control: u299's profile written by Feast itself under another id
        control = profiles.iloc[[S.profile_of(np.array([299]), 8)[0]]].assign(
            **{s.USER_ID: "control"})
        for view in views:
            fields = [f.name for f in fs.get_feature_view(view).features]
            fs.write_to_online_store(view, control[[s.USER_ID, s.EVENT_TIMESTAMP, *fields]])
        reader = FO.user_row_reader(fs)
        assert reader.read("u299") == reader.read("control")
        assert reader.read("u299")["user_age_bucket"] is not None
        names = {ref.split(":")[1] for ref in FS.USER_REFS}
        assert set(reader.read("u1")) == set(reader.read("u2")) == names  # no names pile up
        assert redis.used_memory_mb() > 0

        feeds = open_feeds(fs)
        app = _app(world, WithFeeds(FeastStore(fs), feeds), [world["bundle"]])
        done = compute_feeds(app.engines["champion"], FeastStore(fs), ["u5", "u6"], CFG, 40,
                             feeds, now_ms=NOW)
        assert done["written"] == 2 and feeds.get("u5").item_ids
        served = app.recommend(_q("u5"))
        assert served.path == "precomputed"
        assert served.item_ids == list(feeds.get("u5").item_ids[:10])
        assert app.recommend(_q("u7")).path == "computed"  # no feed stored
        app.close()
    finally:
        redis.stop()


def test_sharded_index_answers_like_the_whole_catalog(tmp_path):
    """Two shard processes (flat shards: exact) return the exact top-k of all items, ids being
    catalog rows, for several queries at once and for one."""
    from serving.shards import ShardedIndex, build_shards
    from tandem.models.ann import exact_top_k

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = build_shards(vectors, 2, tmp_path, kind="flat", k=20, n_tune_queries=10)
    assert len(paths) == 2 and build_shards(vectors, 2, tmp_path) == paths  # reused
    index = ShardedIndex(paths)
    try:
        queries = rng.standard_normal((5, 16)).astype(np.float32)
        scores, ids = index.search(queries, 20)
        exact_scores, exact_ids = exact_top_k(vectors, queries, 20)
        np.testing.assert_array_equal(ids, exact_ids)
        np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
        assert set(ids[0] % 2) == {0, 1}  # both shards contributed
        assert index.search(queries[0], 20)[1].shape == (1, 20)
    finally:
        index.close()
