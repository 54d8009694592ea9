"""tandem.ops.processes: what a long-lived child inherits."""

from __future__ import annotations

import sys
import types

from tandem.ops import processes

MP_KEYS = ("PROMETHEUS_MULTIPROCESS_DIR", "PROMETHEUS_MULTIPROC_DIR")


def _feast_metrics(monkeypatch, owns: bool, folder: str) -> None:
    module = types.SimpleNamespace(_owns_mp_dir=owns, _prometheus_mp_dir=folder)
    monkeypatch.setitem(sys.modules, "feast.metrics", module)
    for key in MP_KEYS:
        monkeypatch.setenv(key, folder)


def test_child_env_drops_the_metrics_folder_feast_made_in_this_process(monkeypatch):
    # Feast deletes its folder when this process exits; Airflow/serving children outlive it
    _feast_metrics(monkeypatch, owns=True, folder="/tmp/feast_metrics_abc")
    env = processes.child_env({"TANDEM_HOME": "/x"})
    assert not set(MP_KEYS) & set(env)
    assert env["TANDEM_HOME"] == "/x"


def test_child_env_keeps_a_metrics_folder_the_user_set(monkeypatch):
    _feast_metrics(monkeypatch, owns=False, folder="/srv/metrics")
    env = processes.child_env()
    assert [env[k] for k in MP_KEYS] == ["/srv/metrics"] * 2
