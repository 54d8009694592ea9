"""Experiment definitions: one JSON file, read hot by serving and written only by the canary task.

Where: ``$TANDEM_HOME/experiments.json`` (:func:`definitions_path`), state, not code — the canary
task rewrites its ramp, so it lives with the rest of the generated state and is replaced
atomically (write a temporary file, then rename), so a reader never sees half a file. Shape::

    {"experiments": [{
        "name": "ranker-v8", "salt": "ranker-v8",
        "start": "2026-11-20T00:00:00+00:00", "end": "2026-12-04T00:00:00+00:00",
        "primary_metric": "ctr", "conversion_event": "complete", "mde_relative": 0.05,
        "variants": [{"name": "control", "alias": "champion", "weight": 1},
                     {"name": "treatment", "alias": "challenger", "weight": 1,
                      "overrides": {"mmr_lambda": 0.5}},
                     {"name": "shadow", "alias": "challenger", "shadow": true}],
        "guardrails": {"max_error_rate": 0.01, "max_p99_ms": 150, "alpha": 0.05,
                       "ctr_drop": 0.1, "min_impressions": 2000},
        "canary": {"variant": "treatment", "ramp": [0.01, 0.05, 0.25, 0.5], "step": 0,
                   "status": "ramping", "reason": null, "history": [],
                   "step_started": null, "baseline": {}}}]}

* ``variants``: what serving splits users over (``tandem.policy.ab``). A ``shadow`` variant gets no
  traffic: its alias scores the same requests off the hot path for comparison
  (``serving.experiments``).
* ``canary`` (optional): the named variant's share of traffic is ``ramp[step]`` while
  ``status == "ramping"`` (the other variants share the rest by weight); ``rolled_back`` gives it
  0 traffic (the registry alias is never touched); ``done`` keeps the last step's share.
  ``tandem.experiments.canary`` moves it. ``step_started`` (when the current step began; none:
  the experiment's ``start``) and ``baseline`` (serving's per-variant request, error and
  latency-bucket counters at that moment) are written by the canary task when it advances a
  step, so each step is judged on its own traffic: the CTR read from the stream since
  ``step_started``, error rate and p99 from the counters' increase since ``baseline``.
* Serving runs the first experiment active at the current time (``start <= now < end``); with
  none, everyone gets the champion.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tandem.config import REPO_ROOT, Paths
from tandem.policy.ab import Experiment, Variant

RAMPING, ROLLED_BACK, DONE = "ramping", "rolled_back", "done"
# An impression is clicked when a click on the same (request_id, item_id) happens within this
# long after it: the one definition the lake report and the canary's stream read both apply.
ATTRIBUTION_WINDOW = timedelta(minutes=30)


@dataclass(frozen=True)
class Guardrails:
    """Limits that roll a canary back (see :mod:`tandem.experiments.canary`)."""

    max_error_rate: float = 0.01
    max_p99_ms: float = 150.0
    alpha: float = 0.05  # always-valid level of "the challenger's CTR is lower"
    ctr_drop: float = 0.1  # relative CTR harm the sequential test is tuned to (mSPRT tau)
    min_impressions: int = 2000  # per variant, before a step may advance


@dataclass(frozen=True)
class Canary:
    """Ramp state of the canary variant."""

    variant: str
    ramp: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5)
    step: int = 0
    status: str = RAMPING
    reason: str | None = None
    history: tuple[Mapping[str, Any], ...] = ()
    step_started: datetime | None = None
    baseline: Mapping[str, Any] = field(default_factory=dict)  # variant -> serving counters

    @property
    def share(self) -> float:
        """Traffic share of the canary variant now."""
        return 0.0 if self.status == ROLLED_BACK else self.ramp[min(self.step, len(self.ramp) - 1)]


@dataclass(frozen=True)
class Definition:
    """One experiment as configured."""

    name: str
    salt: str
    variants: tuple[Mapping[str, Any], ...]
    start: datetime | None = None
    end: datetime | None = None
    primary_metric: str = "ctr"
    conversion_event: str = "complete"
    mde_relative: float = 0.05
    guardrails: Guardrails = field(default_factory=Guardrails)
    canary: Canary | None = None

    def active(self, now: datetime) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now < self.end)

    @property
    def shadow_aliases(self) -> tuple[str, ...]:
        return tuple(str(v["alias"]) for v in self.variants if v.get("shadow"))

    @property
    def control(self) -> str:
        """The first non-shadow variant is the control every comparison is against."""
        return next(str(v["name"]) for v in self.variants if not v.get("shadow"))

    @property
    def configured_weights(self) -> dict[str, float]:
        """Configured weight of every served variant (shadow ones excluded), ramp ignored: a
        rolled-back canary still has one, so the report can read the traffic it once had."""
        return {str(v["name"]): float(v.get("weight", 1.0)) for v in self.variants
                if not v.get("shadow")}

    def weights(self) -> dict[str, float]:
        """Traffic weight of every served variant (shadow ones excluded, canary applied)."""
        live = self.configured_weights
        if self.canary is None or self.canary.variant not in live:
            return live
        share = self.canary.share
        others = {k: w for k, w in live.items() if k != self.canary.variant}
        total = sum(others.values())
        out = {self.canary.variant: share} if share > 0 else {}
        return out | {k: (1 - share) * w / total for k, w in others.items()}

    def to_ab(self) -> Experiment:
        """The user split serving applies (canary first, so a growing ramp keeps its users)."""
        weights = self.weights()
        by_name = {str(v["name"]): v for v in self.variants}
        order = sorted(weights, key=lambda n: self.canary is None or n != self.canary.variant)
        return Experiment(self.name, self.salt, tuple(
            Variant(n, weights[n], str(by_name[n].get("alias", "champion")),
                    dict(by_name[n].get("overrides", {}))) for n in order))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Definition:
        canary = d.get("canary")
        return cls(
            name=str(d["name"]), salt=str(d.get("salt", d["name"])),
            variants=tuple(dict(v) for v in d["variants"]),
            start=_time(d.get("start")), end=_time(d.get("end")),
            primary_metric=str(d.get("primary_metric", "ctr")),
            conversion_event=str(d.get("conversion_event", "complete")),
            mde_relative=float(d.get("mde_relative", 0.05)),
            guardrails=Guardrails(**d.get("guardrails", {})),
            canary=None if canary is None else Canary(
                str(canary["variant"]), tuple(float(x) for x in canary.get(
                    "ramp", Canary.ramp)), int(canary.get("step", 0)),
                str(canary.get("status", RAMPING)), canary.get("reason"),
                tuple(canary.get("history", ())), _time(canary.get("step_started")),
                dict(canary.get("baseline") or {})))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "salt": self.salt, "variants": [dict(v) for v in self.variants],
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "primary_metric": self.primary_metric, "conversion_event": self.conversion_event,
            "mde_relative": self.mde_relative, "guardrails": vars(self.guardrails).copy()}
        if self.canary is not None:
            c = self.canary
            out["canary"] = {"variant": c.variant, "ramp": list(c.ramp), "step": c.step,
                             "status": c.status, "reason": c.reason,
                             "history": [dict(h) for h in c.history],
                             "step_started": c.step_started.isoformat() if c.step_started
                             else None, "baseline": dict(c.baseline)}
        return out

    def with_canary(self, canary: Canary) -> Definition:
        return replace(self, canary=canary)


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"experiment times need a UTC offset: {text!r}")
    return t


def definitions_path(paths: Paths | None = None) -> Path:
    """``$TANDEM_HOME/experiments.json``."""
    return (paths or Paths.default()).root / "experiments.json"


def reports_dir() -> Path:
    """``TANDEM_REPORTS`` or ``<repo>/reports``: the experiment reports people and the canary
    task read."""
    return Path(os.environ.get("TANDEM_REPORTS", REPO_ROOT / "reports"))


def load(path: Path) -> list[Definition]:
    """Every definition in ``path`` ([] when the file does not exist)."""
    if not path.exists():
        return []
    return [Definition.from_dict(d) for d in json.loads(path.read_text())["experiments"]]


def save(path: Path, definitions: Sequence[Definition]) -> None:
    """Replace ``path`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"experiments": [d.to_dict() for d in definitions]}, indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".experiments.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)


def active(definitions: Sequence[Definition], now: datetime) -> Definition | None:
    """The experiment serving runs at ``now``: the first active one."""
    return next((d for d in definitions if d.active(now)), None)
