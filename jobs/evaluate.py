"""The offline evaluation job: the issue-4 protocol end to end, on a MovieLens folder or the lake.

Dataset mode -- ``python -m jobs.evaluate --data ../shared/data/ml-100k`` (``make eval DATA=...``)
loads either MovieLens format, or a synthetic world from its spec file
(:func:`tandem.data.datasets.load_dataset`), runs
:func:`tandem.evaluation.offline.evaluate` (popularity, ALS-only, two-tower-only and the two-stage
system, side by side in one run), and writes

- ``reports/eval.json``: ``{"dataset", "protocol", "models": {name: {metric: value}}, ...}``
- ``reports/eval.md``: the same numbers as a table, plus the quality bar verdict
- ``reports/eval.png``: a bar chart of the headline metrics

Lake mode, the nightly chain's step -- ``python -m jobs.evaluate --start ISO --end ISO --run-id
YYYYMMDD --dataset NAME`` evaluates THE NIGHT'S BUNDLE, refitting nothing
(``tandem.evaluation.night``): at the ranker's label cut, the evaluation half of the users with
label pairs (never the ranker's half), a seeded sample of at most ``night.max_users``, get their
candidates from the night's ALS (user vectors folded in from pre-cut pairs), two-tower and
popularity through the night's ANN indexes, ranked by the night's LightGBM ranker; relevant = their
pairs first engaged positively in [cut, end), pre-cut items excluded. Each request is asked as
serving is asked and as the ranker learned: at the user's first labelled row after the cut, with
that row's time (hour) and device (``tandem.evaluation.night.ask_at_labels``; at the cut, device
unknown, for a user without one). Features come from where the ranker's came from in training
(its ``meta.json``'s ``feature_source``): Feast's point-in-time join when it trained on the feature
store (the DAG's default; ``tandem.evaluation.requests.store_feature_matrix``, the function
``train_ranker`` calls), else in-process (``tandem.evaluation.requests.feature_matrix``) from the
request users' pre-cut events and, for the item features, every pre-cut event's item columns read
into numpy (``tandem.data.lake.read_item_events``). It writes the run's bundle ``manifest.json``
(``tandem.models.bundle.BundleManifest``): the parts present, the dataset label, the metrics
(two-stage under plain names such as ``ndcg@10``, ``coverage@10``, ``diversity@10`` -- the names the
promotion gates read -- and every model's as ``<model>.<metric>``) and params, plus the full report
as ``eval.json`` beside it.

Lake-mode memory model at 5M users x 1M items x 50M events: the table's pair columns
(30M x 36 B = 1.1 GB); the sampled users' (cap 20k) events in pandas (20k x ~100 x 400 B =
0.8 GB) and label rows (20k x ~200 x 120 B = 0.5 GB); with in-process features, the item
features' columns of every pre-cut event in numpy (50M x 56 B = 2.8 GB, where the window in
pandas would be 20 GB; with Feast's join instead, its entity frame and result: one row per
candidate, below); the
sampled users' candidates (20k x ~700 rows x ~50 features x 4 B = 2.8 GB): ~8 GB peak, every read
checked against ``TANDEM_DRIVER_BUDGET_MB`` first (an error naming it, not an OOM kill);
``night.max_users`` is the knob.

Both are pure functions of their inputs and config (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.config import REPO_ROOT, Paths, movielens_100k_dir
from tandem.data.catalog import run_bundle_dir
from tandem.models import bundle as B
from tandem.ops.job_cli import name_arg

HEADLINE = ("ndcg@10", "recall@10", "precision@10", "map@10", "mrr@10", "hit_rate@10")
BAR_LIFT = 1.10  # two-stage NDCG@10 >= 1.10 x the best single-stage model
ALS_TARGET, ALS_TOLERANCE = 0.17, 0.15  # ALS-only NDCG@10 within +-15% of 0.17 (ml-100k)


def quality_bar(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's bar: two-stage lift over the best single stage, ALS near the reference."""
    models = report["models"]
    singles = {m: v["ndcg@10"] for m, v in models.items()
               if m != "two_stage" and "ndcg@10" in v}
    best = max(singles, key=singles.get)
    lift = models["two_stage"]["ndcg@10"] / singles[best] if singles[best] else float("inf")
    als = models["als"]["ndcg@10"]
    return {"best_single_stage": best, "lift": lift, "lift_ok": lift >= BAR_LIFT,
            "als_ndcg@10": als,
            "als_ok": abs(als - ALS_TARGET) <= ALS_TOLERANCE * ALS_TARGET}


def markdown(report: dict[str, Any]) -> str:
    """A readable table of every model x metric, retrieval recall and the bar verdict."""
    models = {m: v for m, v in report["models"].items() if "missing" not in v}
    metrics = list(next(iter(models.values())))
    lines = [f"# Offline evaluation: {report['dataset']}", "",
             f"Protocol: {report['protocol']['split']}; relevant = "
             f"{report['protocol']['relevant']}; {report['protocol']['filter']}; "
             f"{report['protocol']['users']} (n = {report['protocol']['n_users']}).", "",
             "| model | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    for name, values in report["models"].items():
        if "missing" in values:
            lines.append(f"| {name} | missing: {values['missing']} |")
    ret = report["retrieval"]
    depth = next(k for k in ret if k.startswith("recall@"))
    lines += ["", f"Retrieval {depth}: " + ", ".join(
        f"{s} {v:.4f}" for s, v in ret[depth].items())
        + f"; combined candidates ({ret['candidates_per_user']:.0f}/user) "
          f"{ret['recall_combined']:.4f}"]
    for model, study in report.get("tuning", {}).items():
        lines += ["", f"Tuned {model} on the inner split ({study['trials']} trials): "
                      f"{study['params']}; validation NDCG@10 {study['val_ndcg@10']:.4f} "
                      f"(defaults {study['default_val_ndcg@10'] or float('nan'):.4f})."]
    chosen = report.get("diversify_chosen")
    if chosen:
        verdict = "met" if chosen["met_rule"] else "none met it: the default kept"
        lines += ["", f"Re-ranking chosen on the validation split ({chosen['validation_users']} "
                      f"held-out users of the first inner split): mmr_lambda "
                      f"{chosen['mmr_lambda']}, genre_cap {chosen['genre_cap']}, calibration "
                      f"{chosen['calibration']}, mmr_similarity {chosen['mmr_similarity']} "
                      f"({chosen['rule']};"
                      f" {verdict}); {len(report['diversify_sweep']) // 2} settings swept."]
    bar = report.get("quality_bar")
    if bar:
        lift = "met" if bar["lift_ok"] else "NOT met"
        als = "met" if bar["als_ok"] else "NOT met"
        lines += ["", f"Quality bar: two-stage NDCG@10 / best single stage "
                      f"({bar['best_single_stage']}) = {bar['lift']:.3f} (need >= {BAR_LIFT}) "
                      f"-> {lift}; ALS NDCG@10 {bar['als_ndcg@10']:.4f} (need {ALS_TARGET} "
                      f"+-{ALS_TOLERANCE:.0%}) -> {als}."]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}"
                                              for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: headline metrics (x) by model (colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = {m: v for m, v in report["models"].items() if "missing" not in v}
    metrics = [m for m in HEADLINE if m in next(iter(models.values()))]
    x = np.arange(len(metrics))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (name, values) in enumerate(models.items()):
        ax.bar(x + i * width, [values[m] for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(models) - 1) / 2, metrics)
    ax.set_ylabel("score")
    ax.set_title(f"Offline evaluation on {report['dataset']} (per-user temporal 80/20)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write eval.json, eval.md and eval.png under ``out_dir`` (overwrites)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "png": out_dir / "eval.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    chart(report, paths["png"])
    return paths


def run_dataset(data_dir: Path, out_dir: Path, cfg: dict[str, Any] | None = None,
                show_progress: bool = True) -> dict[str, Any]:
    """Load ``data_dir``, run the protocol, write the reports; returns the report dict."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tandem.data.datasets import load_dataset
    from tandem.evaluation import offline as EO
    from tandem.evaluation import protocol as E

    cfg = cfg or E.EVAL_CONFIG
    console = Console(stderr=True, quiet=not show_progress)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(f"loading {data_dir}", total=None)

        def step(text: str) -> None:
            bar.update(task, description=text)
            console.log(text)

        data = load_dataset(data_dir)
        report = EO.evaluate(data, cfg, progress=step)
        report["quality_bar"] = quality_bar(report) if "two_stage" in report["models"] else None
        step("writing reports")
        paths = write_reports(report, out_dir)
    console.print(markdown(report), soft_wrap=True, markup=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return report


# the bundle files a manifest lists as parts (manifest.json itself is not a part)
PARTS = (B.ITEMS, B.USERS, B.ALS_USER_FACTORS, B.ALS_ITEM_FACTORS, B.TT_ITEM_VECTORS,
         B.TT_USER_TOWER, B.INDEX_MAIN, B.INDEX_ALS, B.RANKER_MODEL, B.RANKER_COOC, B.FEATURE_SPEC,
         B.SEQ_ITEM_VECTORS, B.SEQ_MODEL, B.INDEX_SEQUENCE)
REPORT = "eval.json"  # the full lake-mode report, beside the manifest


def manifest_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat metrics of a report: two-stage under plain names, every model as ``<model>.<name>``,
    retrieval recall as ``retrieval.<source>.recall@N`` and ``retrieval.combined_recall``."""
    out: dict[str, float] = {}
    for model, values in report["models"].items():
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        out.update({f"{model}.{k}": v for k, v in numbers.items()})
        if model == "two_stage":
            out.update(numbers)
    ret = report["retrieval"]
    depth = next(k for k in ret if k.startswith("recall@"))
    out.update({f"retrieval.{src}.{depth}": float(v) for src, v in ret[depth].items()})
    out["retrieval.combined_recall"] = float(ret["recall_combined"])
    return out


def night_report(batch, ranker, cfg: dict[str, Any], dataset: str, at_labels: int,
                 store=None) -> dict[str, Any]:
    """The report of ``tandem.evaluation.offline.evaluate``'s shape for one
    ``tandem.evaluation.night.Batch`` whose ``at_labels`` requests were moved to their first
    labelled row. ``store``: the Feast store the ranker's features came from in training
    (None: in-process features from the history, the ranker's ``feature_source="history"``)."""
    import numpy as np
    import pandas as pd

    from tandem.evaluation import metrics as M
    from tandem.evaluation import offline as EO
    from tandem.evaluation import protocol as E
    from tandem.evaluation import requests as EQ
    from tandem.models import ranker as R

    catalog, req, k = batch.catalog, batch.req, cfg["k"]
    rel = pd.DataFrame({M.USER: catalog.user_ids[req.labels["user_row"].to_numpy()],
                        M.ITEM: catalog.item_ids[req.labels["item"].to_numpy()]})
    seen = req.history.tocoo()
    train = pd.DataFrame({M.USER: catalog.user_ids[req.user_rows[seen.row]],
                          M.ITEM: catalog.item_ids[seen.col]})
    preds, retrieval = {}, {}
    for src, top in batch.lists.items():
        rows = req.user_rows[top["local"].to_numpy()]
        retrieval[src] = M.recall_at_k(rel, EO._pred_frame(catalog, rows, top["item"].to_numpy(),
                                                           -top["rank"].to_numpy()),
                                       k=cfg["retrieval_k"])
        head = (top["rank"] <= k).to_numpy()
        preds[src] = EO._pred_frame(catalog, rows[head], top["item"].to_numpy()[head],
                                    -top["rank"].to_numpy()[head])
    cands = batch.cands
    X = (EQ.feature_matrix(batch.fitted, catalog, batch.requests, cands, cfg) if store is None
         else EQ.store_feature_matrix(store, batch.fitted, catalog, batch.requests, cands))
    rows, items = cands["user_row"].to_numpy(), cands["item"].to_numpy()
    preds["two_stage"] = EO._pred_frame(catalog, rows, items, R.predict(ranker, X))
    retrieval["combined"] = M.recall_at_k(rel, EO._pred_frame(catalog, rows, items,
                                                              np.zeros(len(cands))),
                                          k=len(catalog.item_ids))
    models = {name: EO.score_models(preds[name], rel, train, catalog, k)
              for name in E.MODELS if name in preds}
    if "two_tower" not in preds:
        models["two_tower"] = {"missing": "two-tower source disabled or unavailable"}
    n_users = int(rel[M.USER].nunique())
    return {
        "dataset": dataset,
        "protocol": {
            "split": "the night's bundle at the ranker's label cut: the evaluation half of the "
                     "users with label pairs (a seeded sample), pre-cut pairs as history, each "
                     "asked at their first labelled row after the cut (its time and device)",
            "relevant": "pairs first engaged positively after the cut",
            "filter": "items seen before the cut are excluded",
            "users": "averaged over the sampled evaluation users",
            "k": k, "n_users": n_users, "n_test_relevant": int(len(rel)),
            "n_train_pairs": req.n_history_pairs, "n_test_pairs": req.n_label_pairs,
            "requests_at_label_time": at_labels,
            "request_hours": int(len(np.unique(batch.requests.now_ms // 3_600_000))),
            "ranker": "the bundle's LightGBM ranker; sources are the bundle's models",
        },
        "models": models,
        "retrieval": {f"recall@{cfg['retrieval_k']}": {s: v for s, v in retrieval.items()
                                                        if s != "combined"},
                      "recall_combined": retrieval["combined"],
                      "candidates_per_user": float(len(cands) / max(n_users, 1))},
    }


def night_batch(paths: Paths, bundle_dir: Path, start: datetime, end: datetime, cut_ms: int,
                cfg: dict[str, Any], item_events: bool = True):
    """(``tandem.evaluation.night.Batch``, ``tandem.evaluation.night.LakeLabels``) of the evaluation
    half: candidates from the bundle's sources, the inputs of the features (with ``item_events``
    every pre-cut event's item columns in numpy, for in-process item features; nothing else
    beyond the request users), each request asked at its user's first labelled row -- the rule
    the ranker trained with."""
    from tandem.data.lake import epoch_ms
    from tandem.evaluation import night as N

    batch = N.prepare(paths, bundle_dir, start, end, cut_ms, N.EVALUATION, cfg,
                      item_events=item_events)
    return batch, N.ask_at_labels(paths, batch, cut_ms, epoch_ms(end))


def ranker_feature_source(bundle_dir: Path) -> str:
    """Where the bundle's ranker took its training features (``train_ranker``'s meta.json)."""
    meta = (bundle_dir / B.RANKER_MODEL).with_name("meta.json")
    return json.loads(meta.read_text()).get("feature_source", "history") if meta.exists() \
        else "history"


def ranker_feature_store(paths: Paths, bundle_dir: Path):
    """The Feast store to score with when the ranker trained on it, else None (in-process
    features): evaluation must see the features the ranker learned from, or it measures skew."""
    if ranker_feature_source(bundle_dir) != "feast":
        return None
    from tandem.features.feature_store import open_store

    return open_store(paths)


def run(spark, paths: Paths, start: datetime, end: datetime, cfg: dict[str, Any] | None = None,
        run_id: str | None = None, dataset: str = "lake") -> dict[str, Any]:
    """Lake mode: evaluate the night's bundle; write its ``manifest.json`` + ``eval.json``.

    ``spark`` is unused (common job signature; the table, the request users' rows and the item
    columns of the window are read with pyarrow).
    ``cfg`` overrides ``jobs.train_ranker.CONFIG`` (candidate depths, label cut, ``night``).
    Returns the manifest's metrics.
    """
    from tandem.data.lake import epoch_ms
    from tandem.evaluation import night as N
    from tandem.evaluation import protocol as E
    from tandem.evaluation import tuning
    from tandem.models import als as A
    from tandem.models import ranker as R

    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (start, end))
    bundle_dir = run_bundle_dir(paths, end, run_id)
    explicit = cfg or {}
    cfg = {**E.EVAL_CONFIG, **N.CUT_CONFIG, **explicit}
    for model, defaults in ((tuning.ALS, A.ALS_CONFIG), (tuning.RANKER, R.RANKER_CONFIG)):
        # what train_als / train_ranker used: the fold-in must solve with the fitted settings
        cfg[model] = tuning.overlay(defaults, bundle_dir, model, explicit.get(model))
    if not (bundle_dir / B.TT_ITEM_VECTORS).exists():
        cfg["two_tower"] = None  # the bundle serves without two-tower: evaluate it that way
    cut_ms = epoch_ms(N.label_cut(start, end, cfg))
    store = ranker_feature_store(paths, bundle_dir)
    batch, lake = night_batch(paths, bundle_dir, start, end, cut_ms, cfg,
                              item_events=store is None)
    report = night_report(batch, R.load(bundle_dir / B.RANKER_MODEL), cfg, dataset,
                          len(lake.first), store)
    report["protocol"]["feature_source"] = "history" if store is None else "feast"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    protocol = report["protocol"]
    params = {"eval_start": start.isoformat(), "eval_end": end.isoformat(), "eval_k": cfg["k"],
              "eval_cut": datetime.fromtimestamp(cut_ms / 1000, UTC).isoformat(),
              "eval_users": protocol["n_users"],
              "eval_requests_at_label_time": protocol["requests_at_label_time"],
              "eval_train_pairs": protocol["n_train_pairs"],
              "eval_test_pairs": protocol["n_test_pairs"],
              "two_tower": cfg["two_tower"] is not None,
              "als_factors": cfg["als"]["factors"], "ranker_trees": cfg["ranker"]["n_estimators"]}
    manifest = B.BundleManifest(dataset=dataset, parts=[p for p in PARTS
                                                        if (bundle_dir / p).exists()],
                                metrics=manifest_metrics(report), params=params)
    manifest.save(bundle_dir)
    return manifest.metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=movielens_100k_dir(),
                        help="dataset mode: a MovieLens folder (100K files or a CSV release) "
                             "or a folder with a world_config.json (tandem.cli world --spec)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--tune", action="store_true",
                        help="dataset mode: tune every model on the inner split first "
                             "(TANDEM_TUNE_TRIALS / TANDEM_TUNE_TIMEOUT_S per model)")
    parser.add_argument("--start", type=datetime.fromisoformat, default=None,
                        help="lake mode: window start (ISO, UTC); needs --end")
    parser.add_argument("--end", type=datetime.fromisoformat, default=None)
    parser.add_argument("--run-id", type=name_arg, default=None,
                        help="lake mode: bundle directory name")
    parser.add_argument("--dataset", type=name_arg, default="lake", help="lake mode: dataset label")
    parser.add_argument("--home", type=Path, default=None, help="state root (TANDEM_HOME)")
    parser.add_argument("--master", default=None, help="accepted for uniformity; no Spark is used")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if (args.start is None) != (args.end is None):
        parser.error("lake mode needs both --start and --end")
    if args.start is None:
        from tandem.config import TuningSettings
        from tandem.evaluation.protocol import EVAL_CONFIG

        cfg = {**EVAL_CONFIG, "tune": TuningSettings.from_env()} if args.tune else None
        run_dataset(args.data, args.out, cfg, show_progress=not args.quiet)
        return
    paths = Paths(args.home.resolve()) if args.home else Paths.default()
    print(json.dumps(run(None, paths, args.start, args.end, run_id=args.run_id,
                         dataset=args.dataset)))


if __name__ == "__main__":
    main()
