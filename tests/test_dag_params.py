"""Trigger-form parameters are data, never code.

No DAG task runs a shell (every one is an ArgvOperator: argument lists), the string params refuse
anything but an ISO date-time or a plain name, and the REST API that the UI's Trigger button calls
answers 400 to shell metacharacters in any of them, so nothing runs and no run is created.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import pytest

from tandem.config import Paths

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.airflow
STRING_PARAMS = {"tandem_hourly": ("start", "end"), "tandem_daily": ("start", "end", "dataset"),
                 "tandem_experiments": ("start", "end")}


def evil_values(marker: Path) -> list[str]:
    """Values a shell would run: each touches ``marker`` if anything ever executes it."""
    return [f"$(touch {marker})", f"`touch {marker}`", f"2024-01-01; touch {marker}",
            f"2024-01-01 && touch {marker}", f"x\" ; touch {marker} ; \"", f"x' ; touch {marker}'",
            f"2024-01-01T00:00:00|touch {marker}", f"2024-01-01\ntouch {marker}", "../../etc"]


def test_every_task_runs_an_argument_list_not_a_shell(dagbag):
    from tandem.ops.argv_operator import ArgvOperator

    for dag_id in STRING_PARAMS:
        for task in dagbag.dags[dag_id].tasks:
            assert isinstance(task, ArgvOperator), task.task_id
            assert all(isinstance(a, str) for argv in task.commands for a in argv)
            assert "bash" not in task.commands[0][0] and "-c" not in task.commands[0][:2]


@pytest.mark.parametrize("dag_id", sorted(STRING_PARAMS))
def test_string_params_refuse_metacharacters_and_accept_good_values(dagbag, dag_id, tmp_path):
    from airflow.exceptions import ParamValidationError

    params = dagbag.dags[dag_id].params
    for name in STRING_PARAMS[dag_id]:
        param = params.get_param(name)
        for value in evil_values(tmp_path / "pwned"):
            with pytest.raises(ParamValidationError):
                param.resolve(value)
    for value in ("2024-01-01T00:00:00+00:00", "2024-01-01", "1997-09-20T03:05:10.5Z", None):
        assert params.get_param("start").resolve(value) == value
    if dag_id == "tandem_daily":
        assert params.get_param("dataset").resolve("movielens-100k") == "movielens-100k"


def test_argv_operator_passes_a_rendered_value_as_one_argument(tmp_path):
    """Even a value no param pattern stopped stays one argv element: nothing parses it."""
    import jinja2

    from tandem.ops.argv_operator import ArgvOperator

    marker, out = tmp_path / "pwned", tmp_path / "argv.json"
    record = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    op = ArgvOperator(task_id="t", commands=[[sys.executable, "-c", record, "--start",
                                              "{{ params.start }}", "{{ '' }}", "--dataset",
                                              "{{ params.dataset }}"]], cwd=str(tmp_path))
    values = evil_values(marker)
    op.render_template_fields({"params": {"start": values[0], "dataset": values[4]}},
                              jinja_env=jinja2.Environment())
    op.execute({})
    assert json.loads(out.read_text()) == ["--start", values[0], "--dataset", values[4]]
    assert not marker.exists()
    failing = ArgvOperator(task_id="f", commands=[[sys.executable, "-c", "raise SystemExit(4)"]])
    with pytest.raises(Exception, match="exited with code 4"):
        failing.execute({})


@pytest.mark.slow
def test_rest_trigger_with_shell_metacharacters_is_refused(tmp_path):
    """POST /api/v2/dags/{dag_id}/dagRuns (the Trigger button) with a shell payload in each
    string param: HTTP 400 every time, no run created, the marker file never appears."""
    from tandem.ops.airflow_client import start_standalone
    from tandem.ops.processes import stop

    paths = Paths(tmp_path / "tandem")
    marker = tmp_path / "pwned"
    client = start_standalone(paths, port=free_port(), log_ports=(free_port(), free_port()),
                              extra_env={"AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                                         "TANDEM_TASK_RETRIES": "0"})
    try:
        refused = 0
        for dag_id, names in STRING_PARAMS.items():
            client.wait_dag_parsed(dag_id)
            for name in names:
                for value in evil_values(marker):
                    with pytest.raises(urllib.error.HTTPError) as err:
                        client.trigger(dag_id, {name: value})
                    assert err.value.code == 400, (dag_id, name, value)
                    refused += 1
            runs = client._request("GET", f"/api/v2/dags/{dag_id}/dagRuns")
            assert runs["total_entries"] == 0, runs
        assert refused == 7 * len(evil_values(marker))
        assert not marker.exists()
    finally:
        stop(paths.run, "airflow")


def test_jobs_refuse_junk_intervals_and_names_themselves(tmp_path):
    """The second line of defence: the job command line parses what the DAG passes."""
    from tandem.ops.job_cli import interval_parser, parse

    ap = interval_parser("job")
    good = ["--start", "2024-01-01T00:00:00+00:00", "--end", "2024-01-02", "--run-id", "20240102"]
    assert parse(ap, good)[0].run_id == "20240102"
    for bad in (["--start", f"$(touch {tmp_path / 'x'})"], ["--run-id", "../../etc"],
                ["--run-id", ".."], ["--run-id", "a b"]):
        argv = [*good, *bad]
        with pytest.raises(SystemExit):
            parse(ap, argv)
