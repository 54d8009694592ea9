"""bench/pipeline.py: its maths, its report, its RSS sampling, and the DAG commands it mirrors."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import pipeline as P

REPO = Path(__file__).resolve().parents[1]
START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 4, tzinfo=UTC)


def _rung(events: int, wall: dict[str, float], rss: dict[str, float]) -> dict:
    jobs = {j: {"wall_s": wall[j], "peak_rss_mb": rss[j], "rows_in": 1, "rows_out": 1}
            for j in wall}
    return {"users": events // 10, "items": events // 50, "events": events, "jobs": jobs,
            "total_s": sum(wall.values()), "complete": True}


def test_exponent_is_the_log_log_slope():
    assert P.exponent(10.0, 100.0, 1_000_000, 10_000_000) == 1.0  # linear
    assert P.exponent(10.0, 10.0, 1_000_000, 10_000_000) == 0.0  # flat
    assert P.exponent(2.0, 50.0, 1_000_000, 5_000_000) == 2.0  # quadratic
    assert P.exponent(1.0, 5.0 ** 0.5, 10, 50) == 0.5
    assert P.exponent(0.0, 5.0, 10, 50) is None and P.exponent(1.0, 5.0, 10, 10) is None


def test_exponents_between_consecutive_rungs_per_job_and_total():
    rungs = {
        "10m": _rung(10_000_000, {"a": 100.0, "b": 20.0, "c": 5.0},
                     {"a": 1000.0, "b": 400.0, "c": 1.0}),
        "1m": _rung(1_000_000, {"a": 10.0, "b": 20.0}, {"a": 1000.0, "b": 100.0}),
        "none": {**_rung(5_000_000, {}, {}), "complete": False},  # nothing measured yet
    }
    out = P.exponents(rungs)
    assert list(out) == ["1m->10m"]  # sorted by events; a rung without jobs is left out
    pair = out["1m->10m"]
    assert pair["events_ratio"] == 10.0 and pair["jobs"] == ["a", "b"]  # c: only in 10m
    assert pair["wall_s"] == {"a": 1.0, "b": 0.0, "total": pytest.approx(0.602, abs=1e-3)}
    # total RSS is the largest job's: 1000 -> 1000 MB
    assert pair["peak_rss_mb"] == {"a": 0.0, "b": pytest.approx(0.602, abs=1e-3), "total": 0.0}


def test_report_is_written_whole_with_exponents_and_markdown(tmp_path):
    report = {"rungs": {"1m": _rung(1_000_000, {"ingest_events": 10.0}, {"ingest_events": 900.0}),
                        "10m": _rung(10_000_000, {"ingest_events": 50.0},
                                     {"ingest_events": 1800.0})}}
    out = tmp_path / "r.json"
    P.write_report(out, report)
    back = json.loads(out.read_text())
    assert set(back["rungs"]["1m"]) >= {"users", "items", "events", "jobs", "total_s"}
    assert set(back["rungs"]["1m"]["jobs"]["ingest_events"]) == {"wall_s", "peak_rss_mb",
                                                                 "rows_in", "rows_out"}
    assert back["exponents"]["1m->10m"]["wall_s"]["ingest_events"] == pytest.approx(0.699, 1e-3)
    assert not list(tmp_path.glob(".*tmp"))
    table = P.markdown(back).splitlines()
    assert table[0].startswith("| job | 1m (1,000,000 events) | 10m (10,000,000 events)")
    assert table[2] == "| ingest_events | 10 s / 900 MB | 50 s / 1,800 MB |"
    assert table[3] == "| total | **10 s** | **50 s** |"
    P.plot(tmp_path / "r.png", back)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_count_rows_reads_parquet_footers_and_json_lines(tmp_path):
    pq.write_table(pa.table({"x": list(range(7))}), tmp_path / "a.parquet")
    (tmp_path / "date=2024-01-01" / "hour=00").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "date=2024-01-01" / "hour=00" / "b.parquet")
    (tmp_path / "x.jsonl").write_text('{"a":1}\n{"a":2}\n{"a":3}\n')
    assert P.count_rows(tmp_path) == 12
    assert P.count_rows(tmp_path / "missing") == 0


def test_peak_rss_includes_a_child_jvm(tmp_path):
    """A small Python parent whose child JVM touches a 300 MiB heap: the tree's peak has it."""
    (tmp_path / "Hold.java").write_text(
        "class Hold { public static void main(String[] a) throws Exception "
        "{ Thread.sleep(2000); } }")
    parent = textwrap.dedent(f"""
        import json, subprocess
        subprocess.run(["java", "-Xms300m", "-Xmx300m", "-XX:+AlwaysPreTouch",
                        {str(tmp_path / "Hold.java")!r}], check=True)
        print("log line")
        print(json.dumps({{"rows": 3}}))
    """)
    r = P.run_measured([sys.executable, "-c", parent], dict(os.environ), tmp_path / "log")
    assert r["returncode"] == 0 and r["counts"] == {"rows": 3}
    assert r["peak_rss_mb"] > 300  # the parent alone is ~10 MB
    assert r["wall_s"] >= 2.0
    assert "log line" in (tmp_path / "log").read_text()


def test_last_json_takes_the_jobs_counts_line():
    assert P.last_json('noise\n{"a": 1}\n[1]\nmore noise\n') == {"a": 1}
    assert P.last_json("nothing here") is None


def _render(commands: list[list[str]], master: str) -> list[list[str]]:
    """An ArgvOperator's argument lists with the trigger form's params (empty arguments are
    dropped, as the operator drops them)."""
    import jinja2

    params = {"start": START.isoformat(), "end": END.isoformat(), "window_days": 28,
              "dataset": P.DATASET, "force_promotion": False, "skip_two_tower": False}
    conn = SimpleNamespace(spark_default=SimpleNamespace(host=master))
    rendered = [[jinja2.Template(arg).render(params=params, conn=conn) for arg in argv]
                for argv in commands]
    return [[arg for arg in argv if arg != ""] for argv in rendered]


@pytest.mark.airflow
def test_task_table_runs_the_dag_commands(tmp_path, monkeypatch):
    """Same tasks, same order, same argv as the DAG tasks with start/end set in the form."""
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW_CONFIG", str(REPO / "airflow.cfg"))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag_tasks = [t for dag_id in ("tandem_hourly", "tandem_daily")
                 for t in bag.dags[dag_id].topological_sort()]
    assert [t.task_id for t in dag_tasks] == [t.name for t in P.TASKS]
    for dag_task, task in zip(dag_tasks, P.TASKS, strict=True):
        assert _render(dag_task.commands, "local[*]") == P.task_argv(
            task, "local[*]", START, END), task.name


@pytest.mark.spark
@pytest.mark.slow
def test_a_tiny_rung_runs_two_jobs_through_spark_submit(tmp_path, monkeypatch):
    """Land a 5k-event world, run ingest_events and build_labels as the DAG does, measured."""
    monkeypatch.setitem(P.RUNGS, "test", P.Rung(users=300, items=100, events=5_000))
    out = tmp_path / "bench_pipeline.json"
    report = P.main(["--rungs", "test", "--tasks", "ingest_events,build_labels", "--master",
                     "local[1]", "--work", str(tmp_path / "work"), "--out", str(out)])
    rung = json.loads(out.read_text())["rungs"]["test"]
    assert rung == report["rungs"]["test"]
    assert list(rung["jobs"]) == ["ingest_events", "build_labels"] and not rung["complete"]
    ingest, labels = rung["jobs"]["ingest_events"], rung["jobs"]["build_labels"]
    # every landed line was read; valid events are the lake's rows and the labels' input
    assert ingest["rows_in"] == rung["events"] == ingest["counts"]["read"] > 4_000
    assert ingest["rows_out"] == ingest["counts"]["valid"] == labels["rows_in"]
    assert 0 < labels["rows_out"] < labels["rows_in"]
    for job in (ingest, labels):
        assert job["peak_rss_mb"] > 200  # the spark-submit JVM is in the tree
        assert job["wall_s"] > 1
    assert rung["total_s"] == pytest.approx(ingest["wall_s"] + labels["wall_s"], abs=0.02)
    assert (tmp_path / "bench_pipeline.png").exists()


def test_serving_bench_reads_the_bundle_a_rung_built(tmp_path):
    """``bench/serving.py --pipeline-rung``: bundle, state root, known users, scale and time."""
    from bench import serving as BS
    from tandem.models import bundle as B

    home = tmp_path / "1m"
    bundle = home / "models" / "20240104"
    bundle.mkdir(parents=True)
    B.BundleManifest(dataset=P.DATASET, parts=[B.ITEMS, B.USERS]).save(bundle)
    pq.write_table(pa.table({"item_id": ["i0", "i1", "i2"]}), bundle / B.ITEMS)
    pq.write_table(pa.table({"user_id": ["u7", "u3"]}), bundle / B.USERS)
    (home / "world.json").write_text(json.dumps({"users": 10, "world_end_ms": 123}))
    report = tmp_path / "bench_pipeline.json"
    report.write_text(json.dumps({"rungs": {"1m": {
        "events": 999, "interval": ["a", "b"], "bundle": str(bundle),
        "jobs": {"register_bundle": {"counts": {"version": 4}}}}}}))
    w = BS.pipeline_rung_bundle(report, "1m")
    assert w["bundle"] == bundle and w["feast_home"] == home and w["features"] is None
    assert w["stored_users"].tolist() == [3, 7]
    assert (w["items"], w["users"], w["ts_ms"]) == (3, 10, 123)
    assert w["source"]["source"] == "bench/pipeline.py rung 1m"
    assert w["source"]["registered"] == {"version": 4} and w["source"]["dataset"] == P.DATASET
