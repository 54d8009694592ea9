"""The production profile: the same repo with a Redis online store (a real redis-server).

redis-server is the Debian package (``make system-deps`` installs it when missing); it is started
on a free loopback port with persistence off and stopped after the module.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from tandem import feature_store as fs
from tandem import features as F
from tandem import schema as s
from tandem.config import Paths
from tests.conftest import free_port
from tests.test_feature_store import ITEMS, T0, T1, item_row, write_features

pytestmark = [pytest.mark.feast, pytest.mark.redis]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed and could not be (make system-deps installs "
                    "the Debian package redis-server as root)")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_online_write_read_and_push(redis_url, tmp_path_factory):
    paths = Paths(tmp_path_factory.mktemp("feast-redis"))
    write_features(paths)
    store = fs.apply(paths, profile="redis", redis=redis_url)
    assert store.config.online_store.type == "redis"
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T1.to_pydatetime(), store)

    values, ok = fs.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values["user_avg_rating"] == 2.0
    table = fs.ItemFeatureTable(store, ITEMS + ["nope"])
    cols = pd.DataFrame([item_row(k, T1) for k in range(len(ITEMS))] + [{s.ITEM_ID: "nope"}])
    np.testing.assert_array_equal(table.take(np.arange(5), T1), F.item_matrix(cols, T1))

    fs.push_session(store, [{s.USER_ID: "u1", s.EVENT_TIMESTAMP: T1 + pd.Timedelta(minutes=1),
                             s.SESSION_LENGTH: 7, s.SESSION_RECENT_ITEMS: ["i3"]}])
    values, ok = fs.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values[s.SESSION_LENGTH] == 7 and values[s.SESSION_RECENT_ITEMS] == ["i3"]
    missing, ok = fs.fetch_user_features(store, "nobody", deadline_s=5.0)
    assert ok and missing == F.default_row(F.USER_FIELDS + F.SESSION_FIELDS)
