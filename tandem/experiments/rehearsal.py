"""The statistics half of ``make experiment``: seeded A/A and planted-lift runs, OPE against the
simulator's true CTR and a canary with a planted regression, all on ``tandem.data.world`` users.

Why at the statistics level: 40+ seeded runs of serving + Kafka + Spark would take hours on a
laptop and test the plumbing 40 times, not the statistics. Each run here draws fresh users from
the same world, assigns them with the real hash split (``tandem.policy.ab``), shows them slates,
lets the world's click model answer (``World.simulate``'s probabilities; the planted lift multiplies
a variant's true click probabilities by ``1 + lift``), sums per user and runs exactly the tests the
report job runs (:mod:`tandem.experiments.stats`) on the per-user moments. The end-to-end path
runs once in the full mode: :mod:`tandem.experiments.closed_loop` (the gRPC server answers
simulated users, their responses go producer -> tansu -> landing consumer -> ``ingest_events``
-> ``experiment_report``; the ``closed_loop`` block), besides ``lake_readout`` (simulated events
written straight to the lake) and the ``tandem_experiments`` DAG test.

OPE: a logging policy (softmax over item popularity mixed with ``explore`` uniform exploration,
its true per-slot probabilities logged) shows slates; a candidate policy (softmax over a noisy
copy of the user's true taste) is evaluated with IPS / SNIPS / DR from that log, and compared with
its true CTR: the world's click probabilities averaged over slates the candidate itself draws.
Slots are drawn independently (with replacement), so the per-slot propensity is exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tandem import schema as s
from tandem.config import REPO_ROOT
from tandem.data.world import World
from tandem.data.world_config import DAY_MS, WorldConfig
from tandem.experiments import closed_loop, ope
from tandem.experiments.canary import ArmHealth, decide
from tandem.experiments.definitions import (
    ROLLED_BACK,
    Canary,
    Definition,
    Guardrails,
    definitions_path,
    save,
)
from tandem.experiments.stats import Moments, delta_ratio
from tandem.policy.ab import Experiment, Variant


@dataclass(frozen=True)
class RehearsalConfig:
    """Sizes of the rehearsal; :meth:`quick` is the CI subset."""

    runs: int = 40
    users_per_variant: int = 3_000
    requests_per_user: float = 2.0  # mean; each user makes 1 + Poisson(mean - 1) requests
    slate: int = 10
    alpha: float = 0.05
    lift: float = 0.05
    ope_users: int = 20_000
    explore: float = 0.3
    canary_regression: float = -0.2
    canary_daily_users: int = 200_000
    seed: int = 0

    @classmethod
    def quick(cls) -> RehearsalConfig:
        return cls(ope_users=10_000, canary_daily_users=100_000)


def make_world(cfg: RehearsalConfig) -> World:
    """A world with enough users for two disjoint arms."""
    return World.generate(WorldConfig(n_users=max(2 * cfg.users_per_variant, cfg.ope_users),
                                      n_items=500, n_events_target=10_000, seed=cfg.seed))


def _p_click(world: World, users: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """The world's true click probability [n, k] (position bias times relevance)."""
    examine = 1.0 / np.log2(np.arange(shown.shape[1]) + 2.0)
    return examine / (1.0 + np.exp(-world.relevance_logit(users, shown)))


def _user_moments(world: World, users: np.ndarray, multiplier: float, cfg: RehearsalConfig,
                  rng: np.random.Generator) -> Moments:
    """Per-user (impressions, clicks) moments of ``users`` over their simulated requests."""
    reqs = 1 + rng.poisson(cfg.requests_per_user - 1, len(users))
    owner = np.repeat(np.arange(len(users)), reqs)
    t = world.cfg.start_ms + world.cfg.days * DAY_MS
    slates, _ = world._draw_slates(users[owner], t, rng)  # the world's serving-like policy
    p = np.clip(_p_click(world, users[owner], slates) * multiplier, 0, 1)
    clicks = np.bincount(owner, (rng.random(p.shape) < p).sum(axis=1), len(users))
    return Moments.of(reqs * slates.shape[1], clicks)


def ab_run(world: World, cfg: RehearsalConfig, run: int, lift: float) -> float:
    """One seeded experiment: the delta-method CTR p-value of treatment vs control."""
    rng = np.random.default_rng([cfg.seed, 11, run])
    users = rng.choice(world.cfg.n_users, 2 * cfg.users_per_variant, replace=False)
    split = Experiment(f"rehearsal-{run}", f"rehearsal-{cfg.seed}-{run}",
                       (Variant("control"), Variant("treatment")))
    treated = np.array([split.assign(f"u{u}").name == "treatment" for u in users])
    control = _user_moments(world, users[~treated], 1.0, cfg, rng)
    treatment = _user_moments(world, users[treated], 1.0 + lift, cfg, rng)
    return delta_ratio(control, treatment, cfg.alpha).p_value


def aa_and_power(world: World, cfg: RehearsalConfig) -> dict[str, dict[str, Any]]:
    """False-positive rate of A/A runs and power against the planted lift, same run seeds."""
    aa = [ab_run(world, cfg, r, 0.0) for r in range(cfg.runs)]
    lift = [ab_run(world, cfg, r, cfg.lift) for r in range(cfg.runs)]
    return {
        "aa": {"runs": cfg.runs, "alpha": cfg.alpha,
               "false_positive_rate": float(np.mean(np.array(aa) < cfg.alpha))},
        "lift": {"planted_relative": cfg.lift, "users_per_variant": cfg.users_per_variant,
                 "runs": cfg.runs, "power": float(np.mean(np.array(lift) < cfg.alpha))},
    }


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _draw(probs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` independent draws per row of ``probs`` [n, I] -> item indices [n, k]."""
    n, n_items = probs.shape
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1) + np.arange(n)[:, None]
    u = rng.random((n, k)) + np.arange(n)[:, None]  # row r searches only its own [r, r + 1)
    flat = np.searchsorted(cum.ravel(), u.ravel(), side="right").reshape(n, k)
    return np.minimum(flat - np.arange(n)[:, None] * n_items, n_items - 1)


def off_policy(world: World, cfg: RehearsalConfig) -> dict[str, Any]:
    """IPS / SNIPS / DR estimates of the candidate's CTR against its true simulated CTR."""
    rng = np.random.default_rng([cfg.seed, 13])
    n_items = world.cfg.n_items
    users = rng.choice(world.cfg.n_users, cfg.ope_users, replace=False)
    pop = np.broadcast_to(world.item_pop, (len(users), n_items))
    logging = (1 - cfg.explore) * _softmax(1.5 * pop) + cfg.explore / n_items
    taste = world.user_vec[users] @ world.item_vec.T
    noisy = taste + 0.3 * rng.standard_normal(taste.shape)
    target = _softmax(4.0 * noisy)
    k = cfg.slate
    logged = _draw(logging, k, rng)
    rows = np.arange(len(users))[:, None]
    click = rng.random(logged.shape) < _p_click(world, users, logged)
    p0, p1 = logging[rows, logged], target[rows, logged]
    # reward model for DR: per-item click rate on examined slots, smoothed toward the mean
    examine = 1.0 / np.log2(np.arange(k) + 2.0)
    exposure = np.bincount(logged.ravel(), np.broadcast_to(examine, logged.shape).ravel(),
                           n_items)
    clicks = np.bincount(logged.ravel(), click.ravel(), n_items)
    prior = clicks.sum() / exposure.sum()
    item_rate = (clicks + 20 * prior) / (exposure + 20)
    q0 = examine * item_rate[logged]
    q1 = np.broadcast_to(examine, logged.shape) * (target @ item_rate)[:, None]
    estimates = [ope.ips(click.ravel(), p1.ravel(), p0.ravel()),
                 ope.snips(click.ravel(), p1.ravel(), p0.ravel()),
                 ope.doubly_robust(click.ravel(), p1.ravel(), p0.ravel(), q0.ravel(),
                                   q1.ravel())]
    true_ctr = float(np.mean([_p_click(world, users, _draw(target, k, rng)).mean()
                              for _ in range(4)]))
    dr = estimates[2]  # the headline estimator, fixed in advance (not picked by its error)
    return {"estimator": dr.estimator, "estimate": dr.estimate, "true_ctr": true_ctr,
            "relative_error": abs(dr.estimate - true_ctr) / true_ctr,
            "ci": [dr.ci_low, dr.ci_high],
            "all": {e.estimator: e.to_dict() for e in estimates}}


def canary(world: World, cfg: RehearsalConfig, regression: float | None = None
           ) -> dict[str, Any]:
    """Ramp a canary whose users truly click ``1 + regression`` times as often; one look a day
    at the day's traffic share. Returns whether and after how many steps it was rolled back."""
    regression = cfg.canary_regression if regression is None else regression
    rng = np.random.default_rng([cfg.seed, 17])
    state = Canary("treatment")
    guard = Guardrails()
    healthy = dict(requests=100_000, errors=10, p99_ms=40.0)
    for _ in range(len(state.ramp)):
        n_canary = max(int(cfg.canary_daily_users * state.share), 2)
        n_canary = min(n_canary, world.cfg.n_users // 2)
        users = rng.choice(world.cfg.n_users, 2 * n_canary, replace=False)
        control = _user_moments(world, users[:n_canary], 1.0, cfg, rng)
        challenger = _user_moments(world, users[n_canary:], 1.0 + regression, cfg, rng)
        state = decide(state, guard, ArmHealth(ctr=control, **healthy),
                       ArmHealth(ctr=challenger, **healthy))
        if state.status != "ramping":
            break
    rolled = state.status == ROLLED_BACK
    return {"planted_regression": regression, "rolled_back": rolled,
            "steps_to_rollback": len(state.history) if rolled else None,
            "reason": state.reason, "history": [dict(h) for h in state.history]}


def experiment_events(world: World, definition: Definition, day: int, n_sessions: int,
                      keep: Mapping[str, float] | None = None, seed: int = 0) -> pa.Table:
    """One day of the world's events as the experiment would log them: every event stamped with
    its user's variant (``definition``'s split). ``keep`` plants effects: a variant's
    engagements survive with that probability per slot (``{"control": 1 / 1.05}`` makes every
    other variant truly click 5% more; ``{"treatment": 0.8}`` plants a -20% regression)."""
    table = world.chunk_events(day, 0, n_sessions)
    split = definition.to_ab()
    users = table.column(s.USER_ID).to_numpy(zero_copy_only=False)
    uniq, inverse = np.unique(users, return_inverse=True)
    variant = np.array([split.assign(u).name for u in uniq])[inverse]
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index(s.EXPERIMENT), s.EXPERIMENT,
                             pa.array([definition.name] * n, pa.string()))
    table = table.set_column(table.schema.get_field_index(s.VARIANT), s.VARIANT,
                             pa.array(variant, pa.string()))
    if not keep:
        return table
    rng = np.random.default_rng([seed, 19, day])
    slot = pc.binary_join_element_wise(table.column(s.REQUEST_ID),
                                       pc.cast(table.column(s.POSITION), pa.string()), ".")
    slots, slot_inv = np.unique(slot.to_numpy(zero_copy_only=False), return_inverse=True)
    survive = np.vectorize(lambda v: keep.get(v, 1.0), otypes=[float])(variant)
    dropped = rng.random(len(slots))[slot_inv] >= survive
    engagement = table.column(s.EVENT_TYPE).to_numpy(zero_copy_only=False) != s.IMPRESSION
    return table.filter(pa.array(~(dropped & engagement)))


def statistics(cfg: RehearsalConfig) -> dict[str, Any]:
    """Everything of ``reports/experiment.json`` except the shadow latency numbers."""
    world = make_world(cfg)
    out = aa_and_power(world, cfg)
    out["ope"] = off_policy(world, cfg)
    out["canary"] = canary(world, cfg)
    out["canary_without_regression"] = {
        k: v for k, v in canary(world, replace(cfg, seed=cfg.seed + 1), 0.0).items()
        if k in ("rolled_back", "reason")}
    return out


def needed_users(ctr: float, lift: float, alpha: float = 0.05, power: float = 0.8,
                 impressions_per_user: float = 20.0, design_effect: float = 1.5) -> int:
    """Rough users per variant for ``power`` (normal approximation, clustering inflation)."""
    from scipy.stats import norm

    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    var = 2 * ctr * (1 - ctr) * design_effect / impressions_per_user
    return math.ceil(z * z * var / (ctr * lift) ** 2)


def lake_readout(cfg: RehearsalConfig, work: Path) -> dict[str, Any]:
    """The end-to-end path on the same world: two days of a planted-lift experiment written to
    a lake under ``work``, then ``jobs/experiment_report`` run as its own process per day (the
    way the DAG runs it). Returns the report's CTR comparison and SRM check."""
    from tandem.config import Paths
    from tandem.data.landing import write_events_parquet, write_items
    from tandem.data.world_config import ARRIVAL_TS

    paths = Paths(work / "state")
    world = World.generate(WorldConfig(n_users=20_000, n_items=500, n_events_target=10_000,
                                       late_share=0.0, seed=cfg.seed))
    start = datetime.fromtimestamp(world.cfg.start_ms / 1000, UTC)
    d = Definition.from_dict({"name": "rehearsal", "start": start.isoformat(),
                              "variants": [{"name": "control"},
                                           {"name": "treatment", "alias": "challenger"}]})
    save(definitions_path(paths), [d])
    write_items(world.items_table(), paths)
    for day in range(2):
        table = experiment_events(world, d, day, 8000, {"control": 1 / (1 + cfg.lift * 4)})
        write_events_parquet(table, paths.events, f"rehearsal-d{day}", by=ARRIVAL_TS)
    env = {**os.environ, "TANDEM_REPORTS": str(work / "reports")}
    for day in range(2):
        lo = start + timedelta(days=day)
        subprocess.run([sys.executable, "-m", "jobs.experiment_report", "--home",
                        str(paths.root), "--start", lo.isoformat(), "--end",
                        (lo + timedelta(days=1)).isoformat()], check=True, env=env,
                       cwd=REPO_ROOT)
    report = json.loads((work / "reports" / "experiment_rehearsal.json").read_text())
    return {"planted_relative": cfg.lift * 4, "ctr": report["comparisons"]["treatment"]["ctr"],
            "srm_p_value": report["srm"]["p_value"],
            "always_valid_p": report["sequential"]["treatment"]["always_valid_p"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``make experiment``: write ``reports/experiment.json`` (``--quick``: the CI subset)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="smaller OPE, no lake/Spark readout and no closed loop")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "experiment.json")
    ap.add_argument("--bench", type=Path, default=REPO_ROOT / "reports" / "bench_serving.json",
                    help="make bench BENCH_ARGS=--shadow output, for the shadow p99s")
    args = ap.parse_args(argv)
    cfg = RehearsalConfig.quick() if args.quick else RehearsalConfig()
    t0 = time.perf_counter()
    report = statistics(cfg)
    bench = json.loads(args.bench.read_text()) if args.bench.exists() else {}
    report["shadow"] = bench.get("shadow", {
        "p99_ms_without": None, "p99_ms_with": None,
        "note": "run `make bench BENCH_ARGS=--shadow` first"})
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            report["lake_readout"] = lake_readout(cfg, Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            report["closed_loop"] = closed_loop.run(
                Path(tmp), closed_loop.LoopConfig(seed=cfg.seed), reports=args.out.parent)
    report["mode"] = "quick" if args.quick else "full"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["canary"].pop("history")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("aa", "lift", "ope", "canary", "shadow",
                                             "closed_loop") if k in report},
                     indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
