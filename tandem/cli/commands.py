"""``python -m tandem.cli``: what the Makefile's demo, eval and stop targets run.

Jobs are run out of process (``python -m jobs.<name>``), the way Airflow's tasks run them, so this
package never imports job code (layout rule) and every step is exactly what a DAG task does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tandem.cli.land import console, load_movielens_into_lake
from tandem.config import REPO_ROOT, Paths, movielens_100k_dir
from tandem.ops import processes


def job_env(paths: Paths) -> dict[str, str]:
    return processes.child_env({
        "TANDEM_HOME": str(paths.root), "PYTHONPATH": str(REPO_ROOT),
        "OPENBLAS_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})


def run_job(paths: Paths, module: str, *args: str) -> dict:
    """Run ``python -m <module> ... --home <root> args`` (``jobs.`` prefixed when the name has
    no package); return the JSON object its last stdout line prints."""
    t0 = time.monotonic()
    console.print(f"[bold cyan]>[/] {module} {' '.join(args)}")
    argv = [sys.executable, "-m", module if "." in module else f"jobs.{module}"]
    if argv[-1] == "tandem.features.feature_store":
        argv, args = argv + [args[0]], args[1:]
    proc = subprocess.run([*argv, "--home", str(paths.root), *args], env=job_env(paths),
                          cwd=REPO_ROOT, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        console.print(proc.stdout[-4000:], proc.stderr[-4000:], markup=False)
        raise SystemExit(f"job {module} failed (exit {proc.returncode})")
    result = _last_json(proc.stdout)
    console.print(f"  [green]done[/] in {time.monotonic() - t0:.1f}s  {json.dumps(result)}",
                  markup=True)
    return result


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def demo(args: argparse.Namespace) -> None:
    from tandem.cli.demo import run_demo

    run_demo(Path(args.data), rerun=args.rerun)


def data_jobs(args: argparse.Namespace) -> None:
    """The hourly data jobs run directly (no Airflow): MovieLens -> lake -> features -> Feast."""
    paths = Paths.default()
    start, end = load_movielens_into_lake(paths, Path(args.data))
    counts = {}
    for module in ("ingest_events", "build_labels", "negative_sampling", "build_features"):
        counts[module] = run_job(paths, module, "--start", start, "--end", end)
    counts["feast_apply"] = run_job(paths, "tandem.features.feature_store", "apply")
    counts["feast_materialize"] = run_job(paths, "tandem.features.feature_store", "materialize",
                                          "--start", start, "--end", end)
    console.rule("[bold]Summary")
    for module, result in counts.items():
        console.print(f"{module:>18}: {json.dumps(result)}")


def evaluate(args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "jobs.evaluate", "--data", str(args.data)]
    raise SystemExit(subprocess.call(cmd, env=job_env(Paths.default()), cwd=REPO_ROOT))


def world(args: argparse.Namespace) -> None:
    """Generate a synthetic world and land it (JSONL by arrival hour, or parquet for big ones),
    or with ``--spec`` only write its spec, which ``make eval DATA=<folder>`` generates from."""
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig

    cfg = WorldConfig(n_users=args.users, n_items=args.items, n_events_target=args.events,
                      days=args.days, seed=args.seed)
    if args.spec is not None:  # a spec `make eval DATA=<folder>` generates the world from
        from tandem.data.datasets import write_world_spec

        console.print(f"wrote {write_world_spec(args.spec, cfg)}")
        return
    t0 = time.monotonic()
    counts = World.generate(cfg).write(Paths.default(), events_parquet=args.parquet)
    console.print(f"world written in {time.monotonic() - t0:.1f}s: {counts}")


def stop(_: argparse.Namespace) -> None:
    stopped = processes.stop_all(Paths.default().run)
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the pipeline on MovieLens-100K and serve recommendations")
    p.add_argument("--data", default=str(movielens_100k_dir()), help="MovieLens folder")
    p.add_argument("--rerun", action="store_true", help="run the pipeline even if a champion "
                   "exists")
    p.set_defaults(func=demo)
    p = sub.add_parser("data-jobs", help="run the hourly data jobs directly, without Airflow")
    p.add_argument("--data", default=str(movielens_100k_dir()), help="MovieLens folder")
    p.set_defaults(func=data_jobs)
    p = sub.add_parser("eval", help="offline evaluation -> reports/eval.json")
    p.add_argument("--data", default=str(movielens_100k_dir()))
    p.set_defaults(func=evaluate)
    p = sub.add_parser("world", help="generate a synthetic world into TANDEM_HOME")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parquet", type=Path, default=None, help="write events as parquet here")
    p.add_argument("--spec", type=Path, default=None,
                   help="only write the world's spec into this folder (for make eval DATA=...)")
    p.set_defaults(func=world)
    sub.add_parser("stop", help="stop what demo started").set_defaults(func=stop)
    args = parser.parse_args(argv)
    args.func(args)

