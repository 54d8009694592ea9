"""bench/host_probe.py and what bench/serving.py makes of it: stalls and costly seconds land in
the right second, and the p99 outside them leaves out only those seconds."""

import os
import signal
import time

import numpy as np

from bench.host_probe import STALL_MS, HostProbe


def test_a_stopped_probe_reads_as_a_stall_in_its_second():
    with HostProbe() as probe:
        t0 = time.time()
        time.sleep(1.2)
        stopped = probe.procs[0]  # the probe pinned to the first CPU
        os.kill(stopped.pid, signal.SIGSTOP)  # what a descheduled vCPU looks like to it
        time.sleep(0.2)
        os.kill(stopped.pid, signal.SIGCONT)
        time.sleep(0.6)
    summary = probe.summary(t0, 2.0)
    assert summary["cpus"] == sorted(os.sched_getaffinity(0))
    assert all(n > 100 for n in summary["samples"])  # ~100 per second on each CPU
    assert all(0 < ms < 5 for ms in summary["baseline_work_ms"])
    long_ones = [s for s in summary["stalls"] if s[1] > 150]
    assert long_ones and all(s[0] == 1 for s in long_ones), summary["stalls"]
    assert {s[2] for s in long_ones} == {summary["cpus"][0]}  # only the stopped one
    assert summary["max_late_ms"] >= 150
    assert all(ms > STALL_MS for _, ms, _ in summary["stalls"])


def test_samples_outside_the_window_are_left_out():
    with HostProbe() as probe:
        time.sleep(0.5)
        t0 = time.time()
        time.sleep(0.5)
    inside = probe.summary(t0, 1.0)["samples"]
    assert all(20 < n < 70 for n in inside)  # only the last half second of the run


def test_a_second_of_costly_work_reads_as_slow_against_the_runs_median():
    probe = HostProbe()
    probe.cpus = [0, 1]
    t0 = 1_000.0
    quiet = [[t0 + i / 100, 0.1, 1.6] for i in range(300)]  # 3 s, work at 1.6x the quiet cost
    slowed = [[w, late, 8.0 if 1.0 <= w - t0 < 2.0 else r] for w, late, r in quiet]
    probe.data = {0: {"baseline_cpu_ms": 0.06, "samples": quiet},
                  1: {"baseline_cpu_ms": 0.06, "samples": slowed}}
    summary = probe.summary(t0, 3.0)
    assert summary["work_cost_vs_quiet"] == [1.6, 1.6]
    assert summary["slow_seconds"] == [[1, 5.0, 1]]  # 8.0 / 1.6, second 1, on CPU 1 only
    assert summary["stalls"] == [] and summary["max_late_ms"] == 0.1


def test_the_p99_outside_host_events_leaves_out_only_the_marked_seconds():
    from bench.serving import outside_host_events

    latencies = np.concatenate([np.full(100, 10.0), np.full(100, 90.0), np.full(100, 12.0)])
    seconds = np.repeat([0, 1, 2], 100)
    fixed = {"_latencies_ms": latencies, "_seconds": seconds}
    host = {"stalls": [[1, 35.0, 0], [1, 30.0, 1]], "slow_seconds": []}
    assert outside_host_events(fixed, host) == {"seconds_with_host_events": 1,
                                                "p99_ms_outside_host_events": 12.0}
    quiet_host = {"stalls": [], "slow_seconds": []}
    assert outside_host_events(fixed, quiet_host)["p99_ms_outside_host_events"] == 90.0
