"""A circuit breaker for the online-store read of each request.

Without one, a hung store costs every request its whole store deadline and keeps a store-pool
thread blocked per request until the socket timeout; the pool fills and even the deadline stops
being met. With it, after ``failures`` consecutive failed or late reads the breaker opens:
requests skip the read at once (fallback ``online_store_open``, retrieval without the user's
rows) for ``cooldown_s``; then ONE request tries the store (half-open) and its outcome closes
the breaker or opens it for another cool-down.

State changes are rare and take a lock; the per-request checks on a closed breaker read one
attribute (atomic under the GIL) and take no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from serving import metrics as m

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (after ``failures``) -> half-open (after
    ``cooldown_s``, one trial call) -> closed on success, open again on failure.

    ``name`` labels its metrics and log lines; None: unnamed and not exported."""

    def __init__(self, name: str | None, failures: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if failures < 1:
            raise ValueError("failures must be >= 1")
        self.name, self.threshold, self.cooldown_s, self._clock = name, failures, cooldown_s, clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        if name is not None:
            m.BREAKER_STATE.labels(name).set(_GAUGE[CLOSED])

    def allow(self) -> bool:
        """May this request call the dependency? (False: take the fallback now.)"""
        if self.state == CLOSED:
            return True
        with self._lock:
            # a trial whose outcome never came (its request failed elsewhere) is replaced by
            # another after a further cool-down, so the breaker cannot stay half-open for good
            if self._clock() - self._opened_at >= self.cooldown_s:
                self._opened_at = self._clock()
                self._set(HALF_OPEN)  # this caller is the one trial
                return True
        return False

    def record(self, ok: bool) -> None:
        """The outcome of a call that :meth:`allow` let through (late counts as failed)."""
        if ok and self.state == CLOSED and self._failures == 0:
            return
        with self._lock:
            if ok:
                self._failures = 0
                if self.state != CLOSED:
                    self._set(CLOSED)
                return
            self._failures += 1
            if self.state == HALF_OPEN or (self.state == CLOSED
                                           and self._failures >= self.threshold):
                self._opened_at = self._clock()
                self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        if self.name is None:  # unnamed: private to one caller (a warm-up), not exported
            return
        log.warning("%s: circuit %s after %d failed call(s) in a row", self.name, state,
                    self._failures)
        m.BREAKER_STATE.labels(self.name).set(_GAUGE[state])
        m.BREAKER_TRANSITIONS.labels(self.name, state).inc()
