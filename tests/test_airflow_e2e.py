"""The DAGs end to end through Airflow itself: ``dag.test()`` of tandem_hourly then tandem_daily on
a small generated world, leaving a champion in a real MLflow registry; then the UI path a data
engineer takes (browser test): log in, trigger tandem_daily with a changed param, see it succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tandem.config import Paths

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.mlflow, pytest.mark.slow]
START, END = "2024-01-01T00:00:00+00:00", "2024-01-08T00:00:00+00:00"
SCREENSHOT = REPO / "reports" / "airflow_ui_tandem_daily.png"


@pytest.fixture(scope="module")
def airflow_state(tmp_path_factory, mlflow_server):
    """A state root with a landed synthetic world, Airflow's DB migrated, env for every process."""
    from tandem.airflow_client import airflow_env
    from tandem.world import World, WorldConfig

    paths = Paths(tmp_path_factory.mktemp("airflow-e2e"))
    World.generate(WorldConfig(n_users=300, n_items=200, n_events_target=30_000, days=7,
                               seed=0)).write(paths)
    env = {**os.environ, **airflow_env(paths, port=free_port(), log_ports=(free_port(),
                                                                              free_port())),
           "MLFLOW_TRACKING_URI": mlflow_server.url, "TANDEM_TASK_RETRIES": "0"}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    return paths, env


def _dag_test(env: dict, dag_id: str, conf: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tandem.airflow_client", dag_id,
                           json.dumps(conf)], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=REPO)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _champion(tracking_uri: str) -> int:
    from tandem.registry import client_for, resolve_alias

    return resolve_alias("champion", client=client_for(tracking_uri)) or 0


@pytest.mark.timeout(1800)  # both DAGs' 20 tasks, each its own process: minutes on 2 busy cores
def test_hourly_then_daily_leave_a_champion(airflow_state, mlflow_server):
    paths, env = airflow_state
    hourly = _dag_test(env, "tandem_hourly", {"start": START, "end": END})
    assert hourly["state"] == "success"
    assert any(paths.events.glob("date=*/hour=*/*.parquet"))
    assert any(paths.user_features.rglob("*.parquet"))
    daily = _dag_test(env, "tandem_daily", {"start": START, "end": END,
                                            "dataset": "synthetic-test"})
    assert daily["state"] == "success"
    bundle = paths.models / "20240108"
    assert (bundle / "manifest.json").exists() and (bundle / "ranker" / "model.txt").exists()
    assert _champion(mlflow_server.url) >= 1


@pytest.mark.browser
@pytest.mark.timeout(1800)
def test_trigger_daily_from_the_ui(airflow_state, mlflow_server):
    """Log into the Airflow UI, trigger tandem_daily with skip_two_tower on, see it succeed."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian chromium is not installed (make system-deps installs it)")
    from tandem.airflow_client import start_standalone
    from tandem.processes import stop

    paths, env = airflow_state
    if not any(paths.user_features.rglob("*.parquet")):
        pytest.skip("needs the hourly run of test_hourly_then_daily_leave_a_champion")
    port = int(env["AIRFLOW__API__PORT"])
    extra = {k: v for k, v in env.items() if k.startswith(("AIRFLOW", "MLFLOW", "TANDEM"))}
    # only the run the UI triggers: unpausing must not also start the latest scheduled interval
    extra["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    log_ports = (int(env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"]),
                 int(env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"]))
    client = start_standalone(paths, port=port, log_ports=log_ports, extra_env=extra)
    try:
        client.wait_dag_parsed("tandem_daily")
        before = _champion(mlflow_server.url)
        with playwright.sync_playwright() as pw:
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
            switch.locator("xpath=..").click()  # the visible switch wraps its hidden input
            assert switch.is_checked()
            page.get_by_test_id("trigger-dag-submit").click()
            deadline = time.monotonic() + 900
            state = None
            while time.monotonic() < deadline:
                runs = [r for r in client._request(
                    "GET", "/api/v2/dags/tandem_daily/dagRuns")["dag_runs"]
                    if r["run_type"] == "manual"]
                if runs and runs[-1]["state"] in ("success", "failed"):
                    state, run = runs[-1]["state"], runs[-1]
                    break
                time.sleep(5)
            page.goto(client.base_url + "/dags/tandem_daily")
            page.wait_for_timeout(3000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()
        assert state == "success", f"UI-triggered run ended {state}"
        assert run["conf"]["skip_two_tower"] is True and run["conf"]["dataset"] == "synthetic-ui"
        assert _champion(mlflow_server.url) >= before
    finally:
        stop(paths.run, "airflow")
