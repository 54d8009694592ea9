"""The consumer supervisor restarts what exits, backs off in a crash loop, and counts restarts in
Prometheus; under it a landing consumer killed with SIGKILL comes back and keeps landing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tandem import schema as s
from tandem.config import Paths
from tandem.streaming.supervisor import Backoff, read_status
from tests.conftest import free_port
from tests.test_streaming import REPO, landed, make_events, new_topic, produce, wait_for


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run():
    b = Backoff(initial_s=1, max_s=5, stable_s=60)
    assert [b.after(0.5) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert b.after(61) == 1
    assert b.after(3) == 2


def supervise(tmp_path: Path, name: str, command: list[str], port: int) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "tandem.streaming.supervisor", "--name", name,
         "--metrics-port", str(port), "--status", str(tmp_path / f"{name}.json"),
         "--backoff-s", "0.1", "--max-backoff-s", "0.4", "--", *command],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def restarts_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf'^tandem_consumer_restarts_total{{consumer="{name}"}} (\S+)$', text,
                      re.MULTILINE)
    assert found, text
    return float(found.group(1))


def test_a_crash_loop_is_restarted_with_backoff_and_counted(tmp_path):
    port = free_port()
    proc = supervise(tmp_path, "crashy", [sys.executable, "-c", "raise SystemExit(3)"], port)
    status = tmp_path / "crashy.json"
    t0 = time.monotonic()
    wait_for(lambda: (read_status(status) or {}).get("restarts", 0) >= 5, 30, "5 restarts", proc)
    took = time.monotonic() - t0
    assert took > 0.1 + 0.2 + 0.4 + 0.4  # the backoff between the first 5 restarts, at least
    assert restarts_metric(port, "crashy") >= 5
    assert read_status(status)["last_exit_code"] == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) in (0, 3)
    assert "exited with code 3" in (tmp_path / "crashy.log").read_text()


@pytest.mark.kafka
def test_a_killed_landing_consumer_is_restarted_and_keeps_landing(kafka_broker, tmp_path):
    paths = Paths(tmp_path / "tandem")
    paths.root.mkdir(parents=True)
    topic = new_topic(kafka_broker.bootstrap)
    port = free_port()
    proc = supervise(tmp_path, "landing-consumer", [
        sys.executable, "-m", "tandem.streaming.landing_consumer", "--home", str(paths.root),
        "--bootstrap", kafka_broker.bootstrap, "--topic", topic, "--group", f"g-{topic}"], port)
    status = tmp_path / "landing-consumer.json"
    events = make_events(400, "sup", int(time.time() * 1000) - 60_000)
    produce(kafka_broker.bootstrap, topic, events[:200])
    wait_for(lambda: len(landed(paths)) >= 200, 60, "the first 200 landed", proc)
    first = read_status(status)["child_pid"]
    assert restarts_metric(port, "landing-consumer") == 0
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: (read_status(status) or {}).get("child_pid") != first, 30, "a restart",
             proc)
    produce(kafka_broker.bootstrap, topic, events[200:])
    want = {e[s.EVENT_ID] for e in events}
    wait_for(lambda: {r[s.EVENT_ID] for r in landed(paths)} >= want, 60, "the rest landed", proc)
    assert restarts_metric(port, "landing-consumer") == 1
    assert read_status(status)["last_exit_code"] == -signal.SIGKILL
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0  # the consumer committed and exited cleanly
