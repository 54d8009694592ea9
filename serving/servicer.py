"""The gRPC servicer: validate, call the app, build the reply. No decisions are made here.

Bad input becomes ``INVALID_ARGUMENT`` (serving.validation), an unknown item for SimilarItems
``NOT_FOUND``; any other error is ``INTERNAL`` with a generic message, logged with its traceback,
so the process never crashes on input.

Client deadlines are honoured: a request whose deadline has (nearly) passed when a worker picks
it up (it queued behind others) is answered ``DEADLINE_EXCEEDED`` at once, without work
(``tandem_shed_total{reason="deadline"}``); otherwise the time left bounds the stage deadlines
(``ServingConfig.within``), so the answer, degraded if need be, comes before the deadline.
"""

from __future__ import annotations

import logging
import time

import grpc

from serving import metrics as m
from serving.app import App
from serving.result import Result
from serving.validation import InvalidRequest, parse_recommend, parse_similar
from tandem.contracts import recommender_v1_pb2 as pb
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
from tandem.policy.retrieval import SOURCES

log = logging.getLogger(__name__)

# tandem.policy.retrieval source name -> proto enum value (CANDIDATE_SOURCE_<NAME>)
_SOURCE_ENUM = {name: pb.CandidateSource.Value(f"CANDIDATE_SOURCE_{name.upper()}")
                for name in SOURCES}
# less time than this left before the client's deadline: not even a fallback answer arrives
MIN_BUDGET_MS = 2.0


def _items(result: Result) -> list[pb.ScoredItem]:
    return [
        pb.ScoredItem(item_id=item_id, score=float(score), explanation=why,
                      propensity=float(prop), position=pos,
                      sources=[_SOURCE_ENUM[n] for i, n in enumerate(SOURCES) if mask >> i & 1])
        for pos, (item_id, score, mask, prop, why) in enumerate(zip(
            result.item_ids, result.scores.tolist(), result.source_masks.tolist(),
            result.propensities.tolist(), result.explanations, strict=True))
    ]


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Translates ``tandem.serving.v1.Recommender`` RPCs to :class:`serving.app.App` calls."""

    def __init__(self, app: App):
        self.app = app

    def Recommend(self, request, context):  # noqa: N802 - gRPC method name
        t0 = time.perf_counter()
        budget_ms = _budget_ms("Recommend", context, t0)
        try:
            query = parse_recommend(request, self.app.cfg.max_k)
            result = self.app.recommend(query, budget_ms)
        except InvalidRequest as exc:
            _done("Recommend", "INVALID_ARGUMENT", t0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:  # noqa: BLE001 - never leak an exception to the transport
            log.exception("Recommend failed")
            _done("Recommend", "INTERNAL", t0)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        _done("Recommend", "OK", t0)
        m.path(result.path).observe(time.perf_counter() - t0)
        return pb.RecommendResponse(
            request_id=result.request_id, model_version=result.model_version,
            experiment=result.experiment, variant=result.variant, items=_items(result),
            cold_start=result.cold_start, fallbacks=result.fallbacks)

    def SimilarItems(self, request, context):  # noqa: N802 - gRPC method name
        t0 = time.perf_counter()
        _budget_ms("SimilarItems", context, t0)
        try:
            item_id, k = parse_similar(request, self.app.cfg.max_k)
            result = self.app.similar(item_id, k)
        except InvalidRequest as exc:
            _done("SimilarItems", "INVALID_ARGUMENT", t0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:  # noqa: BLE001
            log.exception("SimilarItems failed")
            _done("SimilarItems", "INTERNAL", t0)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        if result is None:
            _done("SimilarItems", "NOT_FOUND", t0)
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown item_id {item_id!r}")
        _done("SimilarItems", "OK", t0)
        return pb.SimilarItemsResponse(request_id=result.request_id,
                                       model_version=result.model_version, items=_items(result))


def _budget_ms(method: str, context, t0: float) -> float:
    """Milliseconds left before the client's deadline (huge without one); aborts the RPC with
    ``DEADLINE_EXCEEDED`` when less than :data:`MIN_BUDGET_MS` is left."""
    budget_ms = context.time_remaining() * 1000.0
    if budget_ms < MIN_BUDGET_MS:
        m.SHED.labels(method, "deadline").inc()
        _done(method, "DEADLINE_EXCEEDED", t0)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request "
                      "was served")
    return budget_ms


def _done(method: str, code: str, t0: float) -> None:
    m.REQUESTS.labels(method, code).inc()
    m.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - t0)
