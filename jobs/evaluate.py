"""The offline evaluation job: the issue-4 protocol end to end on a MovieLens folder.

``python -m jobs.evaluate --data ../shared/data/ml-100k`` (``make eval DATA=...``) loads either
MovieLens format with :func:`tandem.movielens.load_movielens`, runs
:func:`tandem.evaluation.evaluate` (popularity, ALS-only, two-tower-only and the two-stage system,
side by side in one run), and writes

- ``reports/eval.json``: ``{"dataset", "protocol", "models": {name: {metric: value}}, ...}``
- ``reports/eval.md``: the same numbers as a table, plus the quality bar verdict
- ``reports/eval.png``: a bar chart of the headline metrics

Unlike the lake jobs this one reads a dataset folder, not an interval of the lake, so it has no
``--start/--end``; it is still a pure function of its inputs and config (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tandem.config import REPO_ROOT, movielens_100k_dir

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


def run(data_dir: Path, out_dir: Path, cfg: dict[str, Any] | None = None,
        show_progress: bool = True) -> dict[str, Any]:
    """Load ``data_dir``, run the protocol, write the reports; returns the report dict."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tandem import evaluation as E
    from tandem.movielens import load_movielens

    cfg = cfg or E.EVAL_CONFIG
    console = Console(stderr=True, quiet=not show_progress)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(f"loading {data_dir}", total=None)

        def step(text: str) -> None:
            bar.update(task, description=text)
            console.log(text)

        data = load_movielens(data_dir)
        report = E.evaluate(data, cfg, progress=step)
        report["quality_bar"] = quality_bar(report) if "two_stage" in report["models"] else None
        step("writing reports")
        paths = write_reports(report, out_dir)
    console.print(markdown(report), soft_wrap=True, markup=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=movielens_100k_dir(),
                        help="a MovieLens folder (100K files or a CSV release)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run(args.data, args.out, show_progress=not args.quiet)


if __name__ == "__main__":
    main()
