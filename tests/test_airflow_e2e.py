"""The DAGs end to end through Airflow itself on a small generated world: ``dag.test()`` of
tandem_hourly, then the path a data engineer takes (browser test): log in to the UI, trigger
tandem_daily with a changed param and watch it build a bundle and leave a champion in a real
MLflow registry. The daily DAG runs once (through the scheduler, like production); without a
browser on the machine it is triggered through the REST API instead, so it always runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest

from tandem.config import Paths

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.mlflow, pytest.mark.slow]
# three days: every job's cost grows with the interval's days and landing hours, what the
# DAG runs prove does not (test_daily_chain checks the chain's bundle in depth in-process)
DAYS = 3
START, END = "2024-01-01T00:00:00+00:00", "2024-01-04T00:00:00+00:00"
RUN_ID = "20240104"  # the daily run id: the interval's end date
SCREENSHOT = REPO / "reports" / "airflow_ui_tandem_daily.png"


@pytest.fixture(scope="module")
def airflow_state(tmp_path_factory, mlflow_server):
    """A state root with a landed synthetic world, Airflow's DB migrated, env for every process."""
    from tandem.data.world import World
    from tandem.data.world_config import WorldConfig
    from tandem.ops.airflow_client import airflow_env

    paths = Paths(tmp_path_factory.mktemp("airflow-e2e"))
    World.generate(WorldConfig(n_users=300, n_items=200, n_events_target=30_000, days=DAYS,
                               seed=0)).write(paths)
    env = {**os.environ, **airflow_env(paths, port=free_port(), log_ports=(free_port(),
                                                                              free_port())),
           "MLFLOW_TRACKING_URI": mlflow_server.url, "TANDEM_TASK_RETRIES": "0"}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    return paths, env


def _dag_test(env: dict, dag_id: str, conf: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tandem.ops.airflow_client", dag_id,
                           json.dumps(conf)], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=REPO)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _champion(tracking_uri: str) -> int:
    from tandem.ops.registry import client_for, resolve_alias

    return resolve_alias("champion", client=client_for(tracking_uri)) or 0


@pytest.mark.timeout(1800)  # hourly's tasks, each its own process: minutes on 2 busy cores
def test_hourly_dag_lands_events_and_features(airflow_state):
    paths, env = airflow_state
    hourly = _dag_test(env, "tandem_hourly", {"start": START, "end": END})
    assert hourly["state"] == "success"
    assert any(paths.events.glob("date=*/hour=*/*.parquet"))
    assert any(paths.user_features.rglob("*.parquet"))


def _trigger_in_the_ui(client, chromium: Path) -> None:
    """Log in, open tandem_daily, trigger it with a changed ``dataset``; leaves a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(client.base_url + "/")
        page.get_by_label("Username").fill(client.username)
        page.get_by_label("Password").fill(client.password())
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "login" not in url, timeout=60_000)
        page.goto(client.base_url + "/dags/tandem_daily")
        page.get_by_test_id("trigger-dag-button").click()
        page.locator("#element_start").fill(START)
        page.locator("#element_end").fill(END)
        page.locator("#element_dataset").fill("synthetic-ui")
        switch = page.locator("input[name=element_skip_two_tower]")
        assert not switch.is_checked()  # the boolean param renders as a switch, off by default
        page.get_by_test_id("trigger-dag-submit").click()
        page.wait_for_timeout(3000)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()


@pytest.mark.browser
@pytest.mark.timeout(1800)
def test_trigger_daily_from_the_ui(airflow_state, mlflow_server):
    """Trigger tandem_daily from the UI (REST without a browser), see it build and promote."""
    from tandem.ops.airflow_client import start_standalone
    from tandem.ops.processes import stop

    paths, env = airflow_state
    if not any(paths.user_features.rglob("*.parquet")):
        pytest.skip("needs the hourly run of test_hourly_dag_lands_events_and_features")
    chromium = Path("/usr/bin/chromium")
    try:
        import playwright.sync_api  # noqa: F401
        use_browser = chromium.exists()
    except ImportError:
        use_browser = False
    port = int(env["AIRFLOW__API__PORT"])
    extra = {k: v for k, v in env.items() if k.startswith(("AIRFLOW", "MLFLOW", "TANDEM"))}
    # only the run the UI triggers: unpausing must not also start the latest scheduled interval
    extra["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    log_ports = (int(env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"]),
                 int(env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"]))
    client = start_standalone(paths, port=port, log_ports=log_ports, extra_env=extra)
    try:
        client.wait_dag_parsed("tandem_daily")
        if use_browser:
            _trigger_in_the_ui(client, chromium)
        else:
            client.trigger("tandem_daily", {"start": START, "end": END,
                                            "dataset": "synthetic-ui"})
        deadline, state, run = time.monotonic() + 1500, None, None  # within the test timeout
        while time.monotonic() < deadline:
            try:
                runs = [r for r in client._request(
                    "GET", "/api/v2/dags/tandem_daily/dagRuns")["dag_runs"]
                    if r["run_type"] == "manual"]
            except (TimeoutError, ConnectionError, urllib.error.URLError) as exc:
                # a poll the busy API server does not answer in time (its workers share the
                # CPUs with the run's jobs) is retried, as AirflowClient.wait_run does
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                    raise
                runs = []
            if runs and runs[-1]["state"] in ("success", "failed"):
                state, run = runs[-1]["state"], runs[-1]
                break
            time.sleep(5)
        assert state == "success", f"the triggered run ended {state}"
        assert run["conf"]["dataset"] == "synthetic-ui"
        assert run["conf"].get("skip_two_tower", False) is False
        bundle = paths.models / RUN_ID
        assert (bundle / "manifest.json").exists() and (bundle / "ranker" / "model.txt").exists()
        assert (bundle / "two_tower").exists()
        # the DAG's ranker learns from Feast's point-in-time rows, and evaluate scores it with
        # the same source (in-process features would measure a skew, not the ranker)
        trained = json.loads((bundle / "ranker" / "meta.json").read_text())["feature_source"]
        report = json.loads((bundle / "eval.json").read_text())
        assert trained == report["protocol"]["feature_source"] == "feast"
        assert _champion(mlflow_server.url) >= 1
    finally:
        stop(paths.run, "airflow")
