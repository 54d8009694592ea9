"""Gated promotion: evaluate ``challenger`` and ``champion``, move ``champion`` if the gates pass.

extract: the two versions the aliases point at. transform: ``evaluate_fn(version) -> metrics`` for
both on the same data, then ``tandem.ops.registry.promote`` (NDCG@10 may drop at most
``ndcg_tolerance`` relative; coverage@10 and diversity@10 above their floors). load: a ``promote``
MLflow run with the decision and its numbers, ``tandem.promotion*`` tags on the challenger, and
the ``champion`` alias when promoted.

The default ``evaluate_fn`` reads each version's metrics as logged when it was registered
(``tandem.ops.registry.version_metrics``): ``tandem.evaluation.protocol`` evaluates by refitting on
a dataset, not by scoring a stored bundle, so re-scoring both bundles on one holdout is left to a
callback that can do it. Re-running decides the same way (promoting the champion again is a no-op).

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m jobs.promote \
        --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00 [--force]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from tandem.config import Paths
from tandem.ops.job_cli import interval_parser, parse
from tandem.ops.registry import PromotionGates, client_for, promote_challenger, version_metrics

EvaluateFn = Callable[[int], Mapping[str, float]]


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None, evaluate_fn: EvaluateFn | None = None) -> dict[str, Any]:
    """Decide and apply one promotion; returns the verdict and both versions.

    ``spark``/``paths`` are unused (common job signature). ``cfg`` keys: ``gates`` (overrides of
    :class:`tandem.ops.registry.PromotionGates`), ``force``, ``tracking_uri``.
    """
    cfg = cfg or {}
    client = client_for(cfg.get("tracking_uri"))
    gates = PromotionGates(**cfg.get("gates", {}))
    evaluate_fn = evaluate_fn or functools.partial(version_metrics, client=client)
    params = {"start": start.isoformat(), "end": end.isoformat(), "run_id": run_id or ""}
    decision = promote_challenger(client, evaluate_fn, gates, force=bool(cfg.get("force")),
                                  params=params)
    return {"promoted": decision.promoted, "forced": decision.forced,
            "challenger": decision.challenger_version, "champion": decision.champion_version,
            "reasons": decision.reasons, "decision_run_id": decision.run_id}


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__, run_id_help="recorded with the decision")
    ap.add_argument("--force", action="store_true", help="promote even if the gates refuse")
    ap.add_argument("--ndcg-tolerance", type=float, default=PromotionGates.ndcg_tolerance)
    ap.add_argument("--min-coverage", type=float, default=PromotionGates.min_coverage)
    ap.add_argument("--min-diversity", type=float, default=PromotionGates.min_diversity)
    ap.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    args, paths, start, end = parse(ap, argv)
    gates = {"ndcg_tolerance": args.ndcg_tolerance, "min_coverage": args.min_coverage,
             "min_diversity": args.min_diversity}
    print(run(None, paths, start, end, {"gates": gates, "force": args.force,
                                        "tracking_uri": args.tracking_uri}, run_id=args.run_id))


if __name__ == "__main__":
    main()
