"""Watches the machine, not the server, while a benchmark runs: how late a sleeping process
wakes up (a stalled vCPU) and how much CPU time a fixed piece of work costs (a slowed one).

Why: on a VM the host can deschedule or slow a vCPU without the guest seeing any steal time;
the guest then counts the lost time as the running thread's own CPU time. On our 2-core dev VM
the serving benchmark's slow seconds were such episodes: a request's handler used 8x its usual
CPU time for the same work, and a separate sleeping process woke 20-80 ms late in the same
seconds. A latency tail that comes with stalls here is the machine's; one without them is ours.
Each probe (one per CPU) costs about 1% of a core.

``python -m bench.host_probe OUT.json CPU`` prints "ready" once calibrated, probes on that CPU
until SIGTERM, then writes its samples; :class:`HostProbe` runs one per CPU around a block and
summarises them per second of the benchmark.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PERIOD_S = 0.01  # one sample: sleep this long, then do the fixed work once
STALL_MS = 20.0  # a wake-up this late counts as a stall (guest timer slack is well under 1 ms)
SLOW_RATIO = 2.0  # a second whose median work costs this many times the run's median is "slow"


def _work() -> int:
    """A fixed, cache-resident piece of pure-Python work (~0.1 ms on our machines)."""
    return sum(range(5_000))


def probe(out: Path, cpu: int) -> None:
    """Sample on CPU ``cpu`` until SIGTERM; write ``{"baseline_cpu_ms", "samples": [[wall,
    late_ms, ratio]]}``. Pinned: a host that stalls one vCPU stalls only what runs on it."""
    os.sched_setaffinity(0, {cpu})
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    costs = []
    for _ in range(50):
        c = time.thread_time()
        _work()
        costs.append(time.thread_time() - c)
    baseline = statistics.median(costs)
    print("ready", flush=True)
    samples = []
    while not stop:
        t = time.perf_counter()
        time.sleep(PERIOD_S)
        late_ms = (time.perf_counter() - t - PERIOD_S) * 1000.0
        c = time.thread_time()
        _work()
        ratio = (time.thread_time() - c) / baseline
        samples.append((time.time(), round(late_ms, 2), round(ratio, 2)))
    Path(out).write_text(json.dumps({"baseline_cpu_ms": baseline * 1000.0, "samples": samples}))


class HostProbe:
    """One probe process per CPU around a block; :meth:`summary` after the block."""

    def __enter__(self) -> HostProbe:
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-host-probe-")
        self.cpus = sorted(os.sched_getaffinity(0))
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.host_probe", str(self._out(cpu)), str(cpu)],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
            for cpu in self.cpus]
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":  # sampling from here on
                raise RuntimeError(f"host probe failed to start (exit {proc.wait()})")
        return self

    def _out(self, cpu: int) -> Path:
        return Path(self._dir.name) / f"cpu{cpu}.json"

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=30)
            proc.stdout.close()
        self.data = {cpu: json.loads(self._out(cpu).read_text()) for cpu in self.cpus}
        self._dir.cleanup()

    def summary(self, t0_wall: float, duration_s: float) -> dict:
        """Stalls and slow seconds, in seconds since ``t0_wall`` (the benchmark's start).

        ``stalls``: ``[second, ms late, cpu]`` for each wake-up more than ``STALL_MS`` late;
        ``slow_seconds``: ``[second, ratio, cpu]`` where the work's median cost in that second
        was ``ratio`` >= ``SLOW_RATIO`` times its median over the run. Per CPU: ``samples``,
        ``baseline_work_ms`` (the work's cost on a quiet CPU, before the run) and
        ``work_cost_vs_quiet`` (its median cost during the run over that baseline: what the
        load itself costs every thread, e.g. through shared caches).
        """
        out: dict = {"cpus": self.cpus, "samples": [], "baseline_work_ms": [],
                     "work_cost_vs_quiet": [], "stalls": [], "max_late_ms": 0.0,
                     "slow_seconds": []}
        for cpu, data in self.data.items():
            s = np.array(data["samples"], dtype=float).reshape(-1, 3)
            second = np.floor(s[:, 0] - t0_wall).astype(int)
            inside = (second >= 0) & (second < int(np.ceil(duration_s)))
            s, second = s[inside], second[inside]
            out["samples"].append(int(len(s)))
            out["baseline_work_ms"].append(round(data["baseline_cpu_ms"], 3))
            stalled = s[:, 1] > STALL_MS
            out["stalls"] += [[int(t), round(float(ms), 1), cpu]
                              for t, ms in zip(second[stalled], s[stalled, 1], strict=True)]
            if not len(s):
                continue
            out["max_late_ms"] = max(out["max_late_ms"], round(float(s[:, 1].max()), 1))
            typical = float(np.median(s[:, 2]))
            out["work_cost_vs_quiet"].append(round(typical, 2))
            for t in np.unique(second):
                ratio = float(np.median(s[second == t, 2])) / typical
                if ratio >= SLOW_RATIO:
                    out["slow_seconds"].append([int(t), round(ratio, 2), cpu])
        out["stalls"].sort()
        out["slow_seconds"].sort()
        return out


def event_seconds(summary: dict) -> list[int]:
    """Seconds of the run in which :meth:`HostProbe.summary` saw a stall or a slow second."""
    return sorted({e[0] for e in summary["stalls"] + summary["slow_seconds"]})


if __name__ == "__main__":
    probe(Path(sys.argv[1]), int(sys.argv[2]))
