"""Tune ALS and the two-tower on the night's training table; write the chosen parameters.

extract: the run's int-coded training table (``lake/training/run_id=``,
    ``jobs/build_training_table.py``): the pair columns, and for the two-tower the catalog's
    content and the users' profile columns (``tandem.models.tower_inputs``).
transform: ``tandem.evaluation.tuning``: the validation split carved from the window BEFORE the
    ranker's label cut (the period the nightly evaluation scores is never seen), a seeded sample of
    users; one Optuna study per model (ALS: factors, regularization, alpha, iterations; two-tower:
    dim, lr, epochs, temperature), seeded TPE, at most ``TANDEM_TUNE_TRIALS`` trials and
    ``TANDEM_TUNE_TIMEOUT_S`` seconds each, every trial an MLflow run nested under its study's
    run (under this job's run ``tune``), scored by validation NDCG@10.
load: ``<models>/<run_id>/tuned.json`` (overwritten on re-run), which ``train_als`` and
    ``train_two_tower`` overlay on their defaults and ``register_bundle`` records with the bundle.

How often: a study every ``TANDEM_TUNE_EVERY_DAYS`` nights (default 1); in between the task
copies the latest earlier study's choice (``"source": "reused"``, ``"reused_from": <run_id>``),
so the nightly chain always states which parameters it trained with. ``0`` turns tuning off: no
``tuned.json``, the trainers use their defaults. Without a validation label in the window, no
study runs either. Deterministic for a given table and settings except for the time bound
(a slower machine may finish fewer trials).

Memory model at 5M users x 1M items x 50M events (~30M pairs): the pair columns in numpy,
30M x 28 B = 0.85 GB (checked against ``TANDEM_DRIVER_BUDGET_MB`` by ``tandem.data.lake``); the fit
sample (``TANDEM_TUNE_FIT_USERS``, 50k users x ~6 pairs a user x 12 B x 2 CSRs: ~10 MB) and a
trial's model on it: ALS (50k + 1M) x 128 x 4 B = 0.5 GB, the two-tower's item side
1M x 128 x 4 B x 3 (Adam) = 1.5 GB; scoring ``SCORE_CHUNK`` (128) users x 1M items x 4 B
= 0.5 GB at a time; the profiles 5M x 4 fields (~0.8 GB as pandas objects): ~3.5 GB peak.

    python -m jobs.tune --start 2026-01-01T00:00:00 --end 2026-01-29T00:00:00 --run-id 20260129
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

from tandem.config import Paths, TuningSettings
from tandem.data.catalog import run_bundle_dir
from tandem.data.lake import TrainingTable, epoch_ms
from tandem.evaluation import night as N
from tandem.evaluation import tuning
from tandem.models import als as A
from tandem.models.bundle import TUNED_PARAMS
from tandem.models.tower_inputs import TRAIN_CONFIG, catalog_frames
from tandem.models.tracking import start_run
from tandem.ops.job_cli import interval_parser, parse

log = logging.getLogger(__name__)

# base configurations the trials vary (TwoTowerConfig overrides under "two_tower")
CONFIG: dict[str, Any] = {**N.CUT_CONFIG, "als": A.ALS_CONFIG, "two_tower": {}}


def _reuse(bundle_dir, end: datetime, paths: Paths, settings: TuningSettings
           ) -> dict[str, Any] | None:
    """The latest earlier study's document, marked reused, when it is recent enough."""
    last = tuning.last_study(paths.models, end, bundle_dir.name)
    if last is None:
        return None
    run_id, doc = last
    if end - datetime.fromisoformat(doc["tuned_on"]["end"]) >= timedelta(days=settings.every_days):
        return None
    return {**doc, "source": "reused", "reused_from": run_id}


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None, settings: TuningSettings | None = None,
        skip_two_tower: bool = False) -> dict[str, Any]:
    """Tune (or reuse) and write ``tuned.json``; returns its source and validation NDCG@10.

    ``spark`` is unused (common job signature). ``cfg`` overrides :data:`CONFIG` (the label cut
    and the models' base configurations); ``settings`` default to the environment's.
    """
    cfg = {**CONFIG, **(cfg or {})}
    settings = settings or TuningSettings.from_env()
    bundle_dir = run_bundle_dir(paths, end, run_id)
    (bundle_dir / TUNED_PARAMS).unlink(missing_ok=True)  # a re-run never keeps a stale choice
    if settings.every_days <= 0:
        return {"source": "defaults", "reason": "TANDEM_TUNE_EVERY_DAYS=0"}
    reused = _reuse(bundle_dir, end, paths, settings)
    if reused is not None:
        if skip_two_tower:  # the bundle has no two-tower: record only what is trained
            reused["models"] = {m: r for m, r in reused["models"].items()
                                if m != tuning.TWO_TOWER}
        tuning.write(bundle_dir, reused)
        return {"source": "reused", "reused_from": reused["reused_from"]}
    table = TrainingTable.of(paths, bundle_dir.name)
    cut = N.label_cut(start, end, cfg)
    split = tuning.validation_split(table, epoch_ms(start), epoch_ms(cut), settings)
    if len(split.val_rows) == 0:
        log.warning("no validation labels in [%s, %s): no study, the trainers use defaults",
                    datetime.fromtimestamp(split.val_cut_ms / 1000), cut)
        return {"source": "defaults", "reason": "no validation labels"}
    tuned_on = {"run_id": bundle_dir.name, "start": start.isoformat(), "end": end.isoformat(),
                "val_cut": datetime.fromtimestamp(split.val_cut_ms / 1000, cut.tzinfo)
                .isoformat(), "cut": cut.isoformat(), "fit_users": len(split.users),
                "val_users": len(split.val_rows), "val_labels": len(split.relevant)}
    with start_run("tune", tuned_on) as job_run:
        results = {tuning.ALS: tuning.run_study(
            tuning.ALS, tuning.als_objective(split, cfg["als"]), settings, job_run)}
        if not skip_two_tower:
            items, users = catalog_frames(paths, end, table, TRAIN_CONFIG["user_fields"])
            base = {**TRAIN_CONFIG, "two_tower": cfg["two_tower"]}
            results[tuning.TWO_TOWER] = tuning.run_study(
                tuning.TWO_TOWER, tuning.two_tower_objective(split, items, users, base),
                settings, job_run)
        doc = tuning.study_doc(results, tuned_on, settings)
        tuning.write(bundle_dir, doc)
        job_run.log_artifact(bundle_dir / TUNED_PARAMS)
    return {"source": "study", **{f"{m}.{tuning.METRIC}": r.value for m, r in results.items()},
            **{f"{m}.trials": r.trials for m, r in results.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__)
    ap.add_argument("--skip-two-tower", action="store_true",
                    help="tune ALS only (DAG param skip_two_tower)")
    args, paths, start, end = parse(ap, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(run(None, paths, start, end, run_id=args.run_id,
                         skip_two_tower=args.skip_two_tower)))


if __name__ == "__main__":
    main()
