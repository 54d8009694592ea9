"""One canary decision: advance the ramp, hold, or roll back — a pure function of the guardrails.

A DAG task (``tandem_experiments.canary``, :mod:`tandem.experiments.canary_task`) calls
:func:`decide` once per run with what the event stream (CTR,
:mod:`tandem.experiments.stream_ctr`) and serving's counters (errors, latency) say about the
canary and the control since the current step began, then saves the new
:class:`~tandem.experiments.definitions.Canary` into the definitions file; serving picks the new
traffic share up on its next poll. Rules, in order:

1. roll back when the canary's error rate exceeds ``max_error_rate`` or its p99 latency exceeds
   ``max_p99_ms`` (service health: no sample size needed);
2. roll back when its CTR is lower than the control's and the always-valid p-value over every
   look of this canary so far is below ``alpha`` (delta-method difference of per-user clicks /
   impressions, :func:`~tandem.experiments.stats.delta_ratio`, fed to the mSPRT of
   :func:`~tandem.experiments.stats.always_valid_p` with ``tau = ctr_drop x control CTR``):
   a canary is looked at once per step, and a plain z-test at each look would roll back a
   healthy canary far more often than ``alpha``;
3. hold while either arm has fewer than ``min_impressions`` impressions (too little evidence to
   take more traffic);
4. otherwise advance one step (``done`` after the last). The new step starts now: its
   ``step_started`` and its ``baseline`` (the serving counters of this look) are recorded, so
   the next look judges only the new step's traffic.

A rollback sets the share to 0 and records why; the registry alias is untouched, so rolling
forward again is a deliberate edit of the definition, not an accident of the next run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from tandem.experiments.definitions import DONE, RAMPING, ROLLED_BACK, Canary, Guardrails
from tandem.experiments.stats import Moments, always_valid_p, delta_ratio


@dataclass(frozen=True)
class ArmHealth:
    """One arm since the step began: requests, errors, p99 latency and per-user CTR moments
    (``x`` impressions, ``y`` clicks per user)."""

    requests: int
    errors: int
    p99_ms: float
    ctr: Moments

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def decide(canary: Canary, guard: Guardrails, control: ArmHealth, challenger: ArmHealth,
           now: datetime | None = None, counters: Mapping[str, Any] | None = None,
           evidence: Mapping[str, Any] | None = None) -> Canary:
    """The canary after this run's look (unchanged unless it is ramping). ``counters``: serving's
    counters at this look, the next step's baseline if this look advances; ``evidence``: extra
    numbers kept in the history entry (e.g. what the stream read)."""
    if canary.status != RAMPING:
        return canary
    at = now or datetime.now(UTC)
    reason, status, step = None, RAMPING, canary.step
    cmp, p_seq = None, 1.0
    if challenger.ctr.n >= 2 and control.ctr.n >= 2 and challenger.ctr.sx and control.ctr.sx:
        cmp = delta_ratio(control.ctr, challenger.ctr, alpha=guard.alpha)
        looks = [(h["ctr_diff"], h["ctr_var"]) for h in canary.history
                 if h.get("ctr_var") is not None]
        p_seq = always_valid_p([*looks, (cmp.diff, cmp.std_error ** 2)],
                               tau=guard.ctr_drop * cmp.control)
    if challenger.error_rate > guard.max_error_rate:
        reason = f"error rate {challenger.error_rate:.4f} > {guard.max_error_rate}"
    elif challenger.p99_ms > guard.max_p99_ms:
        reason = f"p99 {challenger.p99_ms:.1f} ms > {guard.max_p99_ms} ms"
    elif cmp is not None and cmp.diff < 0 and p_seq < guard.alpha:
        reason = (f"CTR {cmp.treatment:.4f} < control {cmp.control:.4f} "
                  f"(always-valid p {p_seq:.4g})")
    if reason is not None:
        status = ROLLED_BACK
    elif min(control.ctr.sx, challenger.ctr.sx) < guard.min_impressions:
        reason = "hold: too few impressions"
    elif step + 1 >= len(canary.ramp):
        status, reason = DONE, "all steps passed"
    else:
        step, reason = step + 1, f"advanced to {canary.ramp[step + 1]:.0%}"
    entry = {"at": at.isoformat(), "from_step": canary.step,
             "status": status, "reason": reason, "ctr_diff": None if cmp is None else cmp.diff,
             "ctr_var": None if cmp is None else cmp.std_error ** 2, "always_valid_p": p_seq,
             "error_rate": challenger.error_rate, "p99_ms": challenger.p99_ms,
             "impressions": {"control": control.ctr.sx, "canary": challenger.ctr.sx},
             **(evidence or {})}
    new_step = ({"step_started": at, "baseline": dict(counters or {})}
                if status == RAMPING and step != canary.step else {})
    return replace(canary, step=step, status=status,
                   reason=reason if status != RAMPING else canary.reason,
                   history=(*canary.history, entry), **new_step)
