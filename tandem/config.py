"""Where things live and the knobs jobs share.

Everything is rooted at ``TANDEM_HOME`` (default ``<repo>/var``, git-ignored) so tests point a
whole pipeline at a temp dir by passing ``Paths(tmp_path)``. Production settings (a Spark cluster,
Kafka, Redis, Postgres) are environment variables, documented in the README.

Lake layout (all parquet unless said otherwise)::

    landing/events/date=YYYY-MM-DD/hour=HH/*.jsonl   raw JSON lines, by arrival hour (Kafka landing)
    lake/events/date=/hour=/                          validated, deduplicated events (flat columns)
    lake/event_ids/date=/hour=/                       hashes of the kept event ids (ingest dedup)
    lake/quarantine/events/date=/hour=/               rejected rows + reason + raw text
    lake/items/  lake/users/                          catalog and profiles (contracts item/user v1)
    lake/labels/ranking/date=/                        labelled impressions for the ranker
    lake/negatives/{retrieval,ranking}/date=/         sampled negatives
    lake/aggregates/{item_day,pos_day}/date=/         per day: engagements per item, positive
                                                      (user, item) pairs (negative sampling)
    lake/aggregates/features_{user,item}/date=/hour=/ per landing hour: per-entity feature partials
    lake/aggregates/features_{user,item}_state/date=/hour=/  every entity's rolled windows at the
                                                      last snapshot (jobs/build_features.py)
    lake/features/{user,item}/date=/hour=/            feature rows of the entities that changed at
                                                      a snapshot (event_timestamp)
    lake/training/run_id=/{users,items,interactions,cooc}/  int-coded training table of a nightly
                                                      run (jobs/build_training_table.py)
    models/  mlflow/  feast/  kafka/  airflow/        component state
    serving/bundles/                                  serving's bundle cache + ledger.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def tandem_home() -> Path:
    """The root of all generated state (``TANDEM_HOME`` or ``<repo>/var``)."""
    return Path(os.environ.get("TANDEM_HOME", REPO_ROOT / "var")).resolve()


@dataclass(frozen=True)
class Paths:
    """Every dataset's location under one root; pass ``Paths(tmp_path)`` in tests."""

    root: Path

    @classmethod
    def default(cls) -> Paths:
        return cls(tandem_home())

    @property
    def landing_events(self) -> Path:
        return self.root / "landing" / "events"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def events(self) -> Path:
        return self.lake / "events"

    @property
    def event_ids(self) -> Path:
        """lake/event_ids/date=/hour=/: the 64-bit hash of every event id ingest kept, by landing
        hour: what ingest deduplicates replays against (8 bytes an event, not the events)."""
        return self.lake / "event_ids"

    @property
    def quarantine_events(self) -> Path:
        return self.lake / "quarantine" / "events"

    @property
    def items(self) -> Path:
        return self.lake / "items"

    @property
    def users(self) -> Path:
        return self.lake / "users"

    @property
    def ranking_labels(self) -> Path:
        return self.lake / "labels" / "ranking"

    @property
    def retrieval_negatives(self) -> Path:
        return self.lake / "negatives" / "retrieval"

    @property
    def ranking_negatives(self) -> Path:
        return self.lake / "negatives" / "ranking"

    @property
    def user_features(self) -> Path:
        return self.lake / "features" / "user"

    @property
    def item_features(self) -> Path:
        return self.lake / "features" / "item"

    def training(self, run_id: str) -> Path:
        """The int-coded training table of nightly run ``run_id`` (``tandem.data.lake``)."""
        return self.lake / "training" / f"run_id={run_id}"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def feast(self) -> Path:
        return self.root / "feast"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def bundle_cache(self) -> Path:
        """Serving's downloaded bundles and its ledger of the last good / refused versions
        (``serving.bundle_sync``): what a restart serves while the registry is down."""
        return self.root / "serving" / "bundles"

    @property
    def skew_report(self) -> Path:
        """``reports/skew.json``: the nightly skew gate's report (``jobs/feature_skew.py``),
        which ``make demo`` also prints."""
        return self.root / "reports" / "skew.json"

    @property
    def run(self) -> Path:
        """pid files and logs of the processes ``make demo`` starts (``make stop`` reads them)."""
        return self.root / "run"


def spark_master() -> str:
    """``SPARK_MASTER`` (e.g. ``spark://host:7077`` or ``yarn``); ``local[*]`` by default."""
    return os.environ.get("SPARK_MASTER", "local[*]")


DRIVER_BUDGET_SETTING = "TANDEM_DRIVER_BUDGET_MB"


def driver_budget_bytes() -> int:
    """What one single-machine step (a learner, the Spark driver's side of a job) may hold in
    memory: ``TANDEM_DRIVER_BUDGET_MB`` (default 8192, under the 12 GB per-process target)."""
    return int(float(os.environ.get(DRIVER_BUDGET_SETTING, "8192")) * (1 << 20))


def within_driver_budget(n_bytes: float, what: str) -> None:
    """Raise before an allocation of ``n_bytes`` that would exceed :func:`driver_budget_bytes`,
    naming the setting to raise, instead of letting the OS kill the process mid-run."""
    budget = driver_budget_bytes()
    if n_bytes > budget:
        raise MemoryError(f"{what} needs ~{n_bytes / (1 << 20):,.0f} MB, over the driver budget "
                          f"of {budget / (1 << 20):,.0f} MB: raise {DRIVER_BUDGET_SETTING} "
                          "(and the machine's memory) or shrink the window")


def spark_shuffle_partitions() -> int | None:
    """``TANDEM_SHUFFLE_PARTITIONS``: shuffle partitions of the Spark jobs.

    Unset (the default) means three per core of the cluster (``defaultParallelism``), which
    adaptive execution coalesces when the data is small; raise it when tasks spill.
    """
    value = os.environ.get("TANDEM_SHUFFLE_PARTITIONS")
    return int(value) if value else None


def spark_write_partition_bytes() -> int:
    """``TANDEM_WRITE_PARTITION_MB`` (default 128): the data one writer task gets; a bigger
    partition (a busy day or hour) is split over several writers."""
    return int(os.environ.get("TANDEM_WRITE_PARTITION_MB", "128")) << 20


def driver_max_rows() -> int:
    """``TANDEM_DRIVER_MAX_ROWS`` (default 5,000,000): the most rows a job may collect to the
    driver (an item table at platform scale is ~1M rows); past it the job stops with an error
    that names this setting."""
    return int(os.environ.get("TANDEM_DRIVER_MAX_ROWS", "5000000"))


def kafka_bootstrap() -> str | None:
    """``KAFKA_BOOTSTRAP_SERVERS`` for a real cluster; None means start the embedded broker."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


def movielens_100k_dir() -> Path:
    """Where MovieLens-100K is read from (``TANDEM_ML100K`` or ``../shared/data/ml-100k``)."""
    return Path(os.environ.get("TANDEM_ML100K", SHARED_DATA / "ml-100k"))


@dataclass(frozen=True)
class TuningSettings:
    """Bounds of the nightly Optuna study (``jobs/tune.py``), from the environment.

    The defaults keep the study cheap (the demo adds well under a minute): each model gets at
    most ``n_trials`` trials AND ``timeout_s`` seconds (a trial that has started finishes),
    trials fit on at most ``max_fit_users`` sampled users and score ``max_val_users``.
    Tuning every night is costly at platform scale, so ``every_days`` says how often the study
    really runs; in between, the nightly task reuses the last chosen parameters.
    """

    every_days: int = 1  # TANDEM_TUNE_EVERY_DAYS: 0 = never tune (trainers use the defaults)
    n_trials: int = 6  # TANDEM_TUNE_TRIALS, per model (the first trial is the defaults)
    timeout_s: float = 15.0  # TANDEM_TUNE_TIMEOUT_S, per model
    max_fit_users: int = 50_000  # TANDEM_TUNE_FIT_USERS: users whose pairs a trial fits on
    max_val_users: int = 1_000  # TANDEM_TUNE_VAL_USERS: users whose validation NDCG is scored
    val_fraction: float = 0.2  # the tail of the pre-cut window that is validation
    seed: int = 17  # TPE sampler and user samples

    @classmethod
    def from_env(cls) -> TuningSettings:
        env = os.environ.get
        return cls(every_days=int(env("TANDEM_TUNE_EVERY_DAYS", cls.every_days)),
                   n_trials=int(env("TANDEM_TUNE_TRIALS", cls.n_trials)),
                   timeout_s=float(env("TANDEM_TUNE_TIMEOUT_S", cls.timeout_s)),
                   max_fit_users=int(env("TANDEM_TUNE_FIT_USERS", cls.max_fit_users)),
                   max_val_users=int(env("TANDEM_TUNE_VAL_USERS", cls.max_val_users)))
