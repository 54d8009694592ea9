"""Pipeline benchmark (``make bench-pipeline``): the hourly and nightly jobs at platform scale.

    python bench/pipeline.py [--rungs 1m,10m,50m] [--master local[*]] [--tasks a,b] [--work DIR]

Per rung (``RUNGS``: events over users x items):

1. generates a synthetic world (``tandem.data.world``) and lands it the way the Kafka landing
   consumer would (landing JSON lines by arrival hour), chunk by chunk: ``World.write`` holds one
   chunk of ``WorldConfig.chunk_requests`` requests at a time, never the whole world;
2. starts an MLflow server for the rung's registry;
3. runs every task of ``tandem_hourly`` then ``tandem_daily`` (``TASKS``) over the world's whole
   interval, each in its own process with the command line the DAG task runs
   (``spark-submit --master M --conf spark.ui.enabled=false jobs/<name>.py --master M --start S
   --end E [--run-id R]``; ``python -m jobs.<name> ...``; ``python -m tandem.features.feature_store
   apply`` then ``materialize``), as the trigger form's ``start``/``end`` backfill runs them;
4. samples each task's process tree every ``SAMPLE_S`` seconds (the spark-submit JVM, its Python
   driver and Python workers) and keeps the peak of the summed RSS;
5. rewrites ``reports/bench_pipeline.json`` after every task (a long run keeps what it measured)
   with, per rung, ``users, items, events, jobs: {name: {wall_s, peak_rss_mb, rows_in, rows_out,
   counts}}, total_s``, and the cost exponents between consecutive rungs
   (``log(cost ratio) / log(events ratio)``, per job and in total, for wall time and peak RSS);
   rungs measured by earlier runs stay in the file, so ``--rungs 50m`` later adds to them;
6. draws ``reports/bench_pipeline.png`` (wall seconds per job per rung) and prints a markdown table.

``rows_in``/``rows_out`` are counted from the lake the task reads and writes (parquet footers;
landing JSON lines by newline), outside the task's wall time; ``counts`` is the JSON line the job
printed. Jobs without a lake output (models, registry steps) have ``rows_out`` null.

Memory model: this process holds one generated chunk (~2.5M events at the default
``chunk_requests``) and the world's per-user and per-item arrays (~100 bytes per user and item:
~0.6 GB at 5M users x 1M items); the jobs' memory is theirs and is what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tandem.config import Paths  # noqa: E402

SAMPLE_S = 0.2
DATASET = "synthetic-bench"
LATE_DAYS = 2  # the world's late arrivals land up to 48 h after the last event


@dataclass(frozen=True)
class Rung:
    """One world size."""

    users: int
    items: int
    events: int


RUNGS = {
    "tiny": Rung(users=10_000, items=2_000, events=100_000),
    "1m": Rung(users=100_000, items=20_000, events=1_000_000),
    "10m": Rung(users=1_000_000, items=200_000, events=10_000_000),
    "50m": Rung(users=5_000_000, items=1_000_000, events=50_000_000),
}


@dataclass(frozen=True)
class Task:
    """One DAG task as the bench runs it.

    ``kind``: ``spark`` (spark-submit jobs/<name>.py), ``python`` (python -m jobs.<name>, or
    ``module`` when set) or ``feast`` (feature_store apply + materialize). ``run_id``: the DAG
    passes ``--run-id``.
    ``reads``/``writes``: ``Paths`` attributes whose rows are ``rows_in``/``rows_out``.
    ``registry``: the task talks to MLflow (the rung starts a server only if one does).
    """

    name: str
    kind: str
    run_id: bool = False
    extra: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    registry: bool = False
    module: str = ""


# dags/hourly.py then dags/daily.py, in order (the daily chain uses the DAG's default params).
# tests/test_bench_pipeline.py pins every argv to the DAG operator's rendered argument lists.
HOURLY = (
    Task("ingest_events", "spark", reads=("landing_events",),
         writes=("events", "quarantine_events")),
    Task("build_labels", "spark", reads=("events",), writes=("ranking_labels",)),
    Task("build_features", "spark", reads=("events",), writes=("user_features", "item_features")),
    Task("materialize", "feast", reads=("user_features", "item_features")),
    Task("embed_new_items", "python", reads=("items",)),
    Task("precompute_feeds", "python", module="serving.precompute_feeds", registry=True),
)
NIGHTLY = (
    Task("negative_sampling", "spark", run_id=True, reads=("events",),
         writes=("retrieval_negatives", "ranking_negatives")),
    Task("build_training_table", "spark", run_id=True, reads=("events",)),
    Task("tune", "python", run_id=True, registry=True),
    Task("train_als", "python", run_id=True),
    Task("train_two_tower", "python", run_id=True, reads=("events",)),
    Task("train_sequence", "python", run_id=True),
    Task("build_index", "python", run_id=True),
    Task("train_ranker", "python", run_id=True, reads=("ranking_labels",)),
    Task("evaluate", "python", run_id=True, extra=("--dataset", DATASET), reads=("events",)),
    Task("feature_skew", "python", run_id=True),
    Task("register_bundle", "python", run_id=True, extra=("--dataset", DATASET), registry=True),
    Task("promote", "python", run_id=True, registry=True),
)
TASKS = HOURLY + NIGHTLY


def run_id_of(end: datetime) -> str:
    """The DAG's run id: the interval end's date, ``YYYYMMDD``."""
    return f"{end:%Y%m%d}"


def task_argv(task: Task, master: str, start: datetime, end: datetime,
              python: str = sys.executable) -> list[list[str]]:
    """The command(s) the DAG task runs, as argument lists (``materialize`` is two)."""
    interval = ["--start", start.isoformat(), "--end", end.isoformat()]
    if task.run_id:
        interval += ["--run-id", run_id_of(end)]
    if task.kind == "spark":
        submit = str(REPO / ".venv" / "bin" / "spark-submit")
        return [[submit, "--master", master, "--conf", "spark.ui.enabled=false",
                 str(REPO / "jobs" / f"{task.name}.py"), "--master", master, *interval,
                 *task.extra]]
    if task.kind == "python":
        return [[python, "-m", task.module or f"jobs.{task.name}", *interval, *task.extra]]
    if task.kind == "feast":
        return [[python, "-m", "tandem.features.feature_store", "apply"],
                [python, "-m", "tandem.features.feature_store", "materialize", *interval]]
    raise ValueError(f"unknown task kind {task.kind!r}")


# ------------------------------------------------------------------------------ measuring

def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, in MiB (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return total / 2**20


class PeakRss:
    """Samples :func:`tree_rss_mb` of a process every ``interval_s`` on a thread; ``peak_mb``."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_S) -> None:
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(argv: Sequence[str], env: dict[str, str], log_path: Path) -> dict:
    """Run one command to its end; wall seconds, peak tree RSS, exit code, last JSON line."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=log)
        try:
            with PeakRss(proc.pid) as rss:
                out, _ = proc.communicate()
        finally:  # interrupted: stop the job's whole tree (a JVM would outlive its parent)
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
        log.write(out)
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": rss.peak_mb,
            "returncode": proc.returncode, "counts": last_json(out.decode(errors="replace"))}


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (children first)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (what a job prints), else None."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def count_rows(path: Path) -> int:
    """Rows under ``path``: parquet from footers, ``*.jsonl`` by newline (0 when absent)."""
    import pyarrow.dataset as pads

    if not path.exists():
        return 0
    parquet = [p for p in path.rglob("*.parquet") if not p.name.startswith(".")]
    rows = pads.dataset(parquet, format="parquet").count_rows() if parquet else 0
    for f in path.rglob("*.jsonl"):
        with open(f, "rb") as fh:
            rows += sum(block.count(b"\n") for block in iter(lambda fh=fh: fh.read(1 << 20), b""))
    return rows


def count_all(paths: Paths, names: Sequence[str]) -> int | None:
    return sum(count_rows(getattr(paths, n)) for n in names) if names else None


# ------------------------------------------------------------------------------ the report

def exponent(cost_a: float, cost_b: float, events_a: int, events_b: int) -> float | None:
    """``log(cost_b / cost_a) / log(events_b / events_a)``: 1 = linear, None if undefined."""
    if min(cost_a, cost_b) <= 0 or events_a <= 0 or events_a == events_b or events_b <= 0:
        return None
    return round(math.log(cost_b / cost_a) / math.log(events_b / events_a), 3)


def exponents(rungs: dict[str, dict]) -> dict[str, dict]:
    """Cost exponents between consecutive rungs (by events), per job and in total, for
    ``wall_s`` and ``peak_rss_mb``, over the jobs both rungs measured (``total``: the sum of their
    wall seconds, the max of their peaks), so a partial run still compares what it has."""
    done = sorted((r for r in rungs.items() if r[1].get("jobs")), key=lambda r: r[1]["events"])
    out = {}
    for (name_a, a), (name_b, b) in zip(done, done[1:], strict=False):
        common = [job for job in a["jobs"] if job in b["jobs"]]
        pair: dict = {"events_ratio": round(b["events"] / a["events"], 3), "jobs": common}
        for metric in ("wall_s", "peak_rss_mb"):
            per = {job: exponent(a["jobs"][job][metric], b["jobs"][job][metric], a["events"],
                                 b["events"]) for job in common}
            agg = sum if metric == "wall_s" else max
            per["total"] = exponent(agg(a["jobs"][j][metric] for j in common),
                                    agg(b["jobs"][j][metric] for j in common),
                                    a["events"], b["events"]) if common else None
            pair[metric] = per
        out[f"{name_a}->{name_b}"] = pair
    return out


def write_report(path: Path, report: dict) -> None:
    """Recompute the exponents and write atomically (a reader never sees half a file)."""
    report["exponents"] = exponents(report["rungs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    """Wall seconds / peak RSS per job and rung as a markdown table (for the README)."""
    rungs = sorted(report["rungs"].items(), key=lambda r: r[1]["events"])
    head = "| job | " + " | ".join(f"{n} ({r['events']:,} events)" for n, r in rungs) + " |"
    lines = [head, "|---" * (len(rungs) + 1) + "|"]
    jobs = [t.name for t in TASKS if any(t.name in r["jobs"] for _, r in rungs)]
    for job in [*jobs, "total"]:
        cells = []
        for _, r in rungs:
            if job == "total":
                cells.append(f"**{r['total_s']:.0f} s**")
            elif job in r["jobs"]:
                j = r["jobs"][job]
                cells.append(f"{j['wall_s']:.0f} s / {j['peak_rss_mb']:,.0f} MB")
            else:
                cells.append("-")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, report: dict) -> None:
    """Grouped bars: wall seconds per job (x) per rung (bars), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rungs = sorted(report["rungs"].items(), key=lambda r: r[1]["events"])
    jobs = [t.name for t in TASKS if any(t.name in r["jobs"] for _, r in rungs)]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(len(rungs), 1)
    for i, (name, r) in enumerate(rungs):
        wall = [r["jobs"].get(j, {}).get("wall_s", np.nan) for j in jobs]
        ax.bar(np.arange(len(jobs)) + i * width, wall, width,
               label=f"{name}: {r['events']:,} events, {r['users']:,} users x "
                     f"{r['items']:,} items ({r['total_s']:.0f} s)")
    ax.set_xticks(np.arange(len(jobs)) + width * (len(rungs) - 1) / 2, jobs, rotation=30,
                  ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("wall seconds")
    ax.set_title(f"Tandem pipeline jobs per rung (master {report.get('master')}, "
                 f"{report.get('cpus')} cpus)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ running

def land_world(rung: Rung, paths: Paths, days: int, seed: int) -> dict:
    """Generate and land the rung's world once (cached by a marker file); its interval."""
    from tandem.data.world import World
    from tandem.data.world_config import DAY_MS, WorldConfig

    marker = paths.root / "world.json"
    if marker.exists():
        return json.loads(marker.read_text())
    cfg = WorldConfig(n_users=rung.users, n_items=rung.items, n_events_target=rung.events,
                      days=days, seed=seed)
    t0 = time.perf_counter()
    counts = World.generate(cfg).write(paths)
    start = datetime.fromtimestamp(cfg.start_ms / 1000, tz=UTC)
    world = {**counts, "generate_s": round(time.perf_counter() - t0, 1),
             "start": start.isoformat(),
             "end": (start + timedelta(days=days + LATE_DAYS)).isoformat(),
             "days": days, "seed": seed, "world_end_ms": cfg.start_ms + days * DAY_MS}
    marker.write_text(json.dumps(world))
    return world


def job_env(paths: Paths, tracking_uri: str | None, driver_memory: str | None
            ) -> dict[str, str]:
    """What a DAG task's process sees (tandem.ops.orchestration.job_env), for this rung's root.

    ``driver_memory`` sets ``SPARK_DRIVER_MEMORY``, which spark-submit reads to size the driver
    JVM (in local mode the whole engine): a deployment setting of the Airflow workers' env.
    """
    from tandem.ops.processes import child_env

    env = {"PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "TANDEM_HOME": str(paths.root)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if driver_memory:
        env["SPARK_DRIVER_MEMORY"] = driver_memory
    return child_env(env)


def run_task(task: Task, paths: Paths, master: str, start: datetime, end: datetime,
             env: dict[str, str], log_path: Path) -> dict:
    """Run one task's command(s), measured; rows counted before and after."""
    rows_in = count_all(paths, task.reads)
    wall = peak = 0.0
    counts = None
    for argv in task_argv(task, master, start, end):
        r = run_measured(argv, env, log_path)
        if r["returncode"] != 0:
            raise RuntimeError(f"{task.name} exited {r['returncode']}; see {log_path}")
        wall, peak, counts = wall + r["wall_s"], max(peak, r["peak_rss_mb"]), r["counts"]
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "rows_in": rows_in,
            "rows_out": count_all(paths, task.writes), "counts": counts}


def run_rung(name: str, rung: Rung, args: argparse.Namespace, report: dict,
             tasks: Sequence[Task]) -> None:
    """Land the world, start MLflow, run ``tasks`` in order; the report is written after each."""
    from tandem.ops.mlflow_server import start_server
    from tests.conftest import free_port

    paths = Paths((args.work / name).resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] landing {rung.events:,} events ({rung.users:,} users x {rung.items:,} "
          f"items) under {paths.root}", flush=True)
    world = land_world(rung, paths, args.days, args.seed)
    start, end = datetime.fromisoformat(world["start"]), datetime.fromisoformat(world["end"])
    # the hourly tasks cover every landing hour (late arrivals land up to LATE_DAYS after the
    # last event); the nightly ones the days the events happened, as a daily run after the last
    # event day would: the ranker's labels come from the window's last part (label_fraction),
    # which the landing-only days would leave empty ("no request users")
    nightly_end = datetime.fromtimestamp(world["world_end_ms"] / 1000, tz=UTC)
    # a rerun of some tasks of a rung (same world) keeps the other tasks' earlier numbers
    before = report["rungs"].get(name, {})
    same = (before.get("events"), before.get("users")) == (world["events"], rung.users)
    entry = {"users": rung.users, "items": rung.items, "events": world["events"],
             "interval": [world["start"], world["end"]],
             "nightly_interval": [world["start"], nightly_end.isoformat()],
             "generate_s": world["generate_s"],
             "jobs": before.get("jobs", {}) if same else {}, "total_s": 0.0,
             "complete": False, "home": str(paths.root), "master": args.master,
             "driver_memory": report["spark_driver_memory"], "cpus": report["cpus"],
             "measured_at": report["measured_at"]}
    report["rungs"][name] = entry
    # a loaded machine can take minutes to start the server (60 s was not enough on 2 cores)
    server = (start_server(paths.mlflow, free_port(), timeout=600)
              if any(t.registry for t in tasks) else None)
    try:
        env = job_env(paths, server.url if server else None, args.driver_memory)
        for task in tasks:
            print(f"[{name}] {task.name} ...", flush=True)
            try:
                result = run_task(task, paths, args.master, start,
                                  nightly_end if task in NIGHTLY else end, env,
                                  paths.root / f"{task.name}.log")
            except RuntimeError as err:
                entry["failed"] = str(err)
                write_report(args.out, report)
                raise
            entry["jobs"][task.name] = result
            entry["total_s"] = round(sum(j["wall_s"] for j in entry["jobs"].values()), 2)
            write_report(args.out, report)
            print(f"[{name}] {task.name}: {result['wall_s']} s, peak {result['peak_rss_mb']} MB, "
                  f"rows {result['rows_in']} -> {result['rows_out']}", flush=True)
    finally:
        if server is not None:
            server.stop()
    entry["complete"] = all(t.name in entry["jobs"] for t in TASKS)
    entry["bundle"] = str(paths.models / run_id_of(nightly_end))
    write_report(args.out, report)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rungs", default="1m",
                    help=f"comma-separated, from {', '.join(RUNGS)} (default 1m)")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated task names to run (default: every task, in order)")
    ap.add_argument("--master", default="local[*]",
                    help="the spark_default connection's host (default local[*])")
    ap.add_argument("--driver-memory", default=os.environ.get("SPARK_DRIVER_MEMORY"),
                    help="SPARK_DRIVER_MEMORY for the Spark jobs (default: inherited; "
                         "spark-submit's own default is 1g)")
    ap.add_argument("--days", type=int, default=1, help="days of events per world (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / "var" / "bench-pipeline")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_pipeline.json")
    args = ap.parse_args(argv)
    # SIGTERM (a timeout, Ctrl-C of make) unwinds like an exception: servers and jobs stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [n.strip() for n in args.rungs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNGS]
    if unknown:
        ap.error(f"unknown rungs {unknown}; choose from {list(RUNGS)}")
    wanted = args.tasks.split(",") if args.tasks else [t.name for t in TASKS]
    tasks = [t for t in TASKS if t.name in wanted]
    if len(tasks) != len(wanted):
        ap.error(f"unknown tasks in {wanted}; choose from {[t.name for t in TASKS]}")

    report = json.loads(args.out.read_text()) if args.out.exists() else {"rungs": {}}
    report.update({"master": args.master, "cpus": len(os.sched_getaffinity(0)),
                   "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                   "python": platform.python_version(),
                   "spark_driver_memory": args.driver_memory or "spark-submit default (1g)",
                   "measured_at": datetime.now(UTC).isoformat(timespec="seconds")})
    for name in names:
        run_rung(name, RUNGS[name], args, report, tasks)
    png = args.out.with_suffix(".png")
    plot(png, report)
    print(markdown(report))
    print(json.dumps(report["exponents"], indent=2))
    print(f"wrote {args.out} and {png}")
    return report


if __name__ == "__main__":
    main()
