"""A burst of events through the real broker and feature consumer changes a real gRPC feed.

The path under test is the one ``make demo`` shows: events -> Kafka (tansu) -> the feature
consumer (a subprocess) -> Feast's online store (SQLite) -> serving's per-request user read ->
retrieval and ranking. The bundle is the small synthetic one (tandem.models.synthetic_bundle).
"""

from __future__ import annotations

import time

import grpc
import pandas as pd
import pytest

from serving.app import App, FeastStore, ItemFeatures, ServingConfig
from serving.server import create_server, local_source, stop
from tandem import schema as s
from tandem.contracts import recommender_v1_pb2 as pb
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
from tandem.models import synthetic_bundle as S
from tests.test_streaming import new_topic, produce, start, wait_for
from tests.test_streaming import stop as stop_consumer

pytestmark = [pytest.mark.kafka, pytest.mark.serving, pytest.mark.feast]

SPEC = S.SyntheticSpec(n_items=600, n_users=400, n_als_users=200, n_trees=10, num_leaves=7,
                       n_train_groups=60, group_size=20)
# the first online read opens Feast's SQLite store: allow it, so the test sees the session row
CFG = ServingConfig(ranker_backend="lightgbm", online_store_timeout_ms=2000.0,
                    rank_deadline_ms=5000.0)
USER = "u7"  # has ALS factors, no profile rows online: a warm user whose session comes by stream


def _request() -> pb.RecommendRequest:
    # ts 0: the server clock, as a real client sends; the burst is "now" too
    return pb.RecommendRequest(user_id=USER, k=20, context=pb.Context(device="tv",
                                                                        surface="home"))


def _session_items(reply) -> set[str]:
    return {i.item_id for i in reply.items if pb.CANDIDATE_SOURCE_SESSION in i.sources}


def test_burst_through_kafka_changes_the_feed(kafka_broker, paths, tmp_path):
    from tandem.features.feature_store import apply, open_store, session_source_path

    bundle, item_parquet = S.build(tmp_path / "synthetic", SPEC)
    paths.root.mkdir(parents=True)
    apply(paths)
    topic = new_topic(kafka_broker.bootstrap)
    stats = paths.root / "features.json"
    proc = start("tandem.streaming.feature_consumer", paths, kafka_broker.bootstrap, topic,
                 "--stats", str(stats))
    frame = pd.read_parquet(item_parquet)
    fetch, probe = local_source(bundle)
    app = App(fetch, probe, cfg=CFG, store=FeastStore(open_store(paths)),
              item_features=lambda ids: ItemFeatures.from_frame(frame, pd.Index(ids)))
    server, port = create_server("127.0.0.1:0", app)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        recommender = pb_grpc.RecommenderStub(channel)
        before = recommender.Recommend(_request(), timeout=10)
        assert not before.cold_start and not before.fallbacks
        assert not _session_items(before)
        # the burst: one item outside the feed and its nearest neighbours, clicked and liked
        seed = next(f"i{j}" for j in range(SPEC.n_items)
                    if f"i{j}" not in {i.item_id for i in before.items})
        similar = recommender.SimilarItems(pb.SimilarItemsRequest(item_id=seed, k=5), timeout=10)
        burst = [seed] + [i.item_id for i in similar.items]
        now = int(time.time() * 1000)
        events = [{s.EVENT_ID: f"burst-{n}-{etype}", s.EVENT_TYPE: etype, s.USER_ID: USER,
                   s.ITEM_ID: item, s.TS: now - (len(burst) - n) * 1000,
                   s.SESSION_ID: "burst"}
                  for n, item in enumerate(burst) for etype in (s.CLICK, s.LIKE)]
        produce(kafka_broker.bootstrap, topic, events)
        replies = []

        def reacted() -> bool:
            replies.append(recommender.Recommend(_request(), timeout=10))
            return bool(_session_items(replies[-1]))

        wait_for(reacted, 60, "the feed to show session neighbours", proc)
        after = replies[-1]
    finally:
        channel.close()
        stop(server, app, grace_s=1.0)
        assert stop_consumer(proc) == 0
    assert not after.fallbacks
    assert not {i.item_id for i in after.items} & set(burst)  # engaged items count as seen
    assert {i.item_id for i in after.items} != {i.item_id for i in before.items}
    # the consumer also wrote the rows it pushed to the offline source the ranker trains on
    offline = pd.read_parquet(session_source_path(paths))
    mine = offline[offline[s.USER_ID] == USER]
    assert len(mine) and mine[s.SESSION_LENGTH].max() == 2 * len(burst)
