"""tandem_daily: the nightly retrain, from negative sampling to a promoted champion.

negative_sampling -> int-coded training table -> tune (Optuna; every TANDEM_TUNE_EVERY_DAYS
nights, else the last choice) -> ALS -> two-tower -> session sequence model -> FAISS indexes
-> ranker -> evaluate -> the feature-skew gate (serve-time feature vectors against the training
features; fails above ``TANDEM_SKEW_THRESHOLD``) -> register the bundle as `challenger` ->
promote to `champion` if the offline gates pass (or ``force_promotion``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Param, dag

from tandem.ops.orchestration import interval_param, name_param, python_job, spark_job


@dag(
    dag_id="tandem_daily",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["tandem", "training"],
    params={
        "start": interval_param("Training data start (ISO, UTC)"),
        "end": interval_param("Training data end (ISO, UTC)"),
        "window_days": Param(28, type="integer", minimum=1, title="Training window (days)",
                             description="Train on the days before the interval end "
                                         "(ignored when start is set)."),
        "dataset": name_param("movielens-100k", "Dataset label",
                              "Recorded with the model version and the evaluation."),
        "force_promotion": Param(False, type="boolean", title="Force promotion",
                                 description="Move `champion` even if the gates refuse."),
        "skip_two_tower": Param(False, type="boolean", title="Skip two-tower training",
                                description="Reuse ALS only for retrieval (faster retrain)."),
    },
)
def tandem_daily():
    """Nightly retrain and gated promotion through the MLflow registry."""
    dataset = ["--dataset", "{{ params.dataset }}"]
    skip_tt = ["{{ '--skip' if params.skip_two_tower else '' }}"]
    force = ["{{ '--force' if params.force_promotion else '' }}"]
    skip_tt_tune = ["{{ '--skip-two-tower' if params.skip_two_tower else '' }}"]
    (spark_job("negative_sampling", run_id=True)
     >> spark_job("build_training_table", run_id=True)
     >> python_job("tune", skip_tt_tune)
     >> python_job("train_als")
     >> python_job("train_two_tower", skip_tt)
     >> python_job("train_sequence")
     >> python_job("build_index")
     >> python_job("train_ranker")
     >> python_job("evaluate", dataset)
     >> python_job("feature_skew")
     >> python_job("register_bundle", dataset)
     >> python_job("promote", force))


tandem_daily()
