"""The REST client's run watcher on a busy machine: a poll that times out is retried."""

from __future__ import annotations

import urllib.error

import pytest

from tandem.ops.airflow_client import AirflowClient


class _Flaky(AirflowClient):
    """Answers each poll from a script: an exception is raised, a string is the run's state."""

    def __init__(self, script: list):
        super().__init__("http://127.0.0.1:1", home=None)
        self.script = script

    def run_state(self, dag_id: str, run_id: str) -> str:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def test_a_poll_that_times_out_is_retried_until_the_run_ends():
    client = _Flaky([TimeoutError("timed out"), urllib.error.URLError("refused"), "running",
                     urllib.error.HTTPError("u", 503, "busy", {}, None), "success"])
    assert client.wait_run("tandem_daily", "r1", timeout_s=30, poll_s=0.01) == "success"
    assert client.script == []


def test_a_client_error_is_not_retried():
    client = _Flaky([urllib.error.HTTPError("u", 404, "no such run", {}, None), "success"])
    with pytest.raises(urllib.error.HTTPError):
        client.wait_run("tandem_daily", "nope", timeout_s=30, poll_s=0.01)
