"""The production profile: the same repo with a Redis online store (a real redis-server).

redis-server is the Debian package (``make system-deps`` installs it when missing); it is started
on a free loopback port with persistence off and stopped after the module.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from tandem import schema as s
from tandem.config import REPO_ROOT, Paths
from tandem.features import entity as F
from tandem.features import feature_store as fs
from tandem.features import online as FO
from tandem.ops.redis_server import RedisServer
from tests.conftest import free_port
from tests.test_feature_store import ITEMS, T0, T1, item_row, write_features

pytestmark = [pytest.mark.feast, pytest.mark.redis]


def _start_redis(folder, *extra: str) -> RedisServer:
    """A redis-server on a free loopback port, persistence off (skips when not installed)."""
    try:
        return RedisServer(folder, free_port(), extra=extra)
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; it could not be installed")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with _start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    """(url, password) of a redis-server that requires a password (set in a 0600 config file)."""
    folder = tmp_path_factory.mktemp("redis-auth")
    password = secrets.token_hex(16)
    conf = folder / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"requirepass {password}\n")
    with _start_redis(folder, str(conf)) as server:
        yield server.url, password


def test_redis_online_write_read_and_push(redis_url, tmp_path_factory):
    paths = Paths(tmp_path_factory.mktemp("feast-redis"))
    write_features(paths)
    store = fs.apply(paths, profile="redis", redis=redis_url)
    assert store.config.online_store.type == "redis"
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T1.to_pydatetime(), store)

    values, ok = FO.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values["user_avg_rating"] == 2.0
    table = FO.ItemFeatureTable(store, ITEMS + ["nope"])
    cols = pd.DataFrame([item_row(k, T1) for k in range(len(ITEMS))] + [{s.ITEM_ID: "nope"}])
    np.testing.assert_array_equal(table.take(np.arange(5), T1), F.item_matrix(cols, T1))

    fs.push_session(store, [{s.USER_ID: "u1", s.EVENT_TIMESTAMP: T1 + pd.Timedelta(minutes=1),
                             s.SESSION_LENGTH: 7, s.SESSION_RECENT_ITEMS: ["i3"]}])
    values, ok = FO.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values[s.SESSION_LENGTH] == 7 and values[s.SESSION_RECENT_ITEMS] == ["i3"]
    missing, ok = FO.fetch_user_features(store, "nobody", deadline_s=5.0)
    assert ok and missing == F.default_row(F.USER_FIELDS + F.SESSION_FIELDS)


def test_redis_password_stays_in_the_environment(redis_with_password, tmp_path_factory,
                                                 monkeypatch):
    """The password reaches Feast from TANDEM_FEAST_REDIS only: no file holds it, render()
    refuses to write it, and without it the store's reads fail (it is really required)."""
    url, password = redis_with_password
    paths = Paths(tmp_path_factory.mktemp("feast-redis-auth"))
    write_features(paths)
    with pytest.raises(ValueError, match="TANDEM_FEAST_REDIS"):
        fs.render(paths, profile="redis", redis=f"{url},password={password}")
    monkeypatch.setenv("TANDEM_FEAST_REDIS", f"{url},password={password}")
    store = fs.apply(paths, profile="redis")
    fs.materialize(paths, (T0 - timedelta(days=1)).to_pydatetime(), T1.to_pydatetime(), store)
    values, ok = FO.fetch_user_features(store, "u1", deadline_s=5.0)
    assert ok and values["user_avg_rating"] == 2.0

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    files = [REPO_ROOT / name for name in listed.splitlines()]
    files += [p for p in paths.root.rglob("*") if p.is_file()]
    assert len(files) > 50 and (paths.feast / "feature_store.yaml") in files
    leaked = [p for p in files if p.is_file() and password.encode() in p.read_bytes()]
    assert not leaked, leaked

    monkeypatch.setenv("TANDEM_FEAST_REDIS", url)
    _, ok = FO.fetch_user_features(fs.open_store(paths), "u1", deadline_s=5.0)
    assert not ok  # redis refuses the unauthenticated read: served defaults instead
