"""Register the nightly run's bundle in MLflow as ONE model version with alias ``challenger``.

extract: the run's bundle folder ``<models>/<run_id>`` (``tandem.data.catalog.run_bundle_dir``) and
its ``manifest.json`` (parts, dataset, the evaluation metrics the ``evaluate`` job recorded).
load: ``tandem.ops.registry.log_bundle`` — one run (params, metrics, manifest) and one model version
of ``tandem-recommender`` holding the whole folder; ``challenger`` moves to it. When the night
was tuned (``jobs/tune.py``), the folder's ``tuned.json`` travels with it, its chosen parameters
are logged as run params ``tuned.<model>.<param>`` and set as model-version tags
``tandem.tuned.<model>.<param>`` (``tandem.evaluation.tuning.summary_tags``).

Not idempotent by nature (each call creates a new version); a re-run registers the same files again
under a new number, which is harmless: serving follows aliases, never "the latest".

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m jobs.register_bundle \
        --start 2026-01-01T00:00:00 --end 2026-02-01T00:00:00
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tandem.config import Paths
from tandem.data.catalog import run_bundle_dir
from tandem.evaluation import tuning
from tandem.models.bundle import BundleManifest
from tandem.ops.job_cli import interval_parser, name_arg, parse
from tandem.ops.registry import MODEL_NAME, client_for, log_bundle


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None) -> dict[str, Any]:
    """Log ``<models>/<run_id>`` as a new model version; returns its number and file count.

    ``spark`` is unused (common job signature). ``cfg`` keys: ``dataset`` (recorded as a param;
    the manifest's dataset otherwise), ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``).
    """
    cfg = cfg or {}
    bundle_dir = run_bundle_dir(paths, end, run_id)
    manifest = BundleManifest.load(bundle_dir)
    tuned = tuning.read(bundle_dir) or {}
    params = {**manifest.params, "start": start.isoformat(), "end": end.isoformat(),
              "run_id": bundle_dir.name, "dataset": cfg.get("dataset") or manifest.dataset,
              **{f"tuned.{m}.{k}": v for m, r in tuned.get("models", {}).items()
                 for k, v in r["params"].items()}}
    version = log_bundle(bundle_dir, manifest, params=params,
                         tracking_uri=cfg.get("tracking_uri"))
    if tuned:
        client = client_for(cfg.get("tracking_uri"))
        for key, value in tuning.summary_tags(tuned).items():
            client.set_model_version_tag(MODEL_NAME, str(version), key, value)
    n_files = sum(1 for p in bundle_dir.rglob("*") if p.is_file())
    return {"model": MODEL_NAME, "version": version, "files": n_files,
            "tuned": tuned.get("source", "defaults")}


def main(argv: list[str] | None = None) -> None:
    ap = interval_parser(__doc__)
    ap.add_argument("--dataset", type=name_arg, default=None,
                    help="dataset label recorded with the version")
    ap.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI")
    args, paths, start, end = parse(ap, argv)
    print(run(None, paths, start, end, {"dataset": args.dataset,
                                        "tracking_uri": args.tracking_uri}, run_id=args.run_id))


if __name__ == "__main__":
    main()
