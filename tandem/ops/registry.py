"""The MLflow model registry for Tandem: one bundle = one model version; aliases decide serving.

Every trained set (ALS factors, two-tower, both indexes, ranker, feature spec, id maps — the
``tandem.models.bundle`` layout) is logged as ONE version of :data:`MODEL_NAME`, so serving can
never mix parts of different runs. A fresh version gets alias ``challenger``;
:func:`promote_challenger` evaluates challenger and champion on the same data (a callback) and moves
``champion`` only when the gates of :func:`promote` pass; :func:`rollback` points ``champion`` back
at an earlier version. Serving resolves ``champion`` and calls :func:`download_bundle`.

Model-version tags (``tandem.*``) record the dataset, parts, the bundle's content digest (required
and checked on download) and each promotion decision with its numbers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tandem.models.bundle import BundleManifest
from tandem.models.tracking import MAX_PARAM_LEN, metric_key, start_run, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL_NAME = "tandem-recommender"
CHALLENGER = "challenger"
CHAMPION = "champion"
ARTIFACT_NAME = "bundle"  # key in the pyfunc ``artifacts`` (tandem/ops/bundle_model.py reads it)
PYFUNC_CODE = Path(__file__).with_name("bundle_model.py")
EXPERIMENT = "tandem"
DIGEST_TAG = "tandem.bundle_sha256"
# What the bundle's parts need; pinned from the running environment (cheap, no inference).
BUNDLE_PACKAGES = ("mlflow", "numpy", "pandas", "pyarrow", "faiss-cpu", "lightgbm")


def pip_requirements() -> list[str]:
    """Exact pins of :data:`BUNDLE_PACKAGES` that are installed (MLflow's inference costs ~10 s)."""
    pins = []
    for name in BUNDLE_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def bundle_digest(bundle_dir: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted path order.

    Two bundle folders have the same digest iff they hold the same files with the same content.
    """
    root = Path(bundle_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class RegistryUnavailable(ConnectionError):
    """The MLflow server did not answer its health check in time."""


class BundleDigestError(RuntimeError):
    """A downloaded bundle has no digest tag or does not match it: never serve it."""


def check_reachable(uri: str, timeout_s: float = 2.0) -> None:
    """Raise :class:`RegistryUnavailable` unless the server at ``uri`` answers ``/health``
    within ``timeout_s`` (one bounded HTTP call; MLflow's own client retries for minutes).
    Non-HTTP URIs (a local store) are always reachable."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
            reply.read()
    except (OSError, urllib.error.URLError) as exc:
        raise RegistryUnavailable(f"MLflow registry at {uri} unreachable: {exc}") from exc


def client_for(uri: str | None = None) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` for ``uri`` (default ``MLFLOW_TRACKING_URI``)."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    if uri is None:
        raise RuntimeError("no MLflow server: set MLFLOW_TRACKING_URI (or pass a tracking URI)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_bundle(bundle_dir: Path, manifest: BundleManifest | None = None,
               metrics: Mapping[str, float] | None = None,
               params: Mapping[str, Any] | None = None, tracking_uri: str | None = None,
               alias: str = CHALLENGER) -> int:
    """Log a bundle folder as ONE new version of :data:`MODEL_NAME` and point ``alias`` at it.

    Parameters
    ----------
    bundle_dir : Path
        A ``tandem.models.bundle`` folder (``manifest.json`` + parts); uploaded as is.
    manifest : BundleManifest, optional
        Defaults to the folder's own ``manifest.json``.
    metrics, params : Mapping, optional
        Logged to the registering run; default to the manifest's ``metrics`` / ``params``.
    tracking_uri : str, optional
        Server URL; defaults to ``MLFLOW_TRACKING_URI``.

    Returns
    -------
    int
        The new model version.
    """
    import mlflow

    bundle_dir = Path(bundle_dir).resolve()
    manifest = manifest or BundleManifest.load(bundle_dir)
    metrics = dict(manifest.metrics if metrics is None else metrics)
    params = dict(manifest.params if params is None else params)
    client = client_for(tracking_uri)
    digest = bundle_digest(bundle_dir)
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client.tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"register-{manifest.dataset}",
                          tags={"tandem.job": "register_bundle"}):
        mlflow.log_params({metric_key(k): str(v)[:MAX_PARAM_LEN] for k, v in params.items()})
        mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()
                            if isinstance(v, int | float)})  # nested parts: manifest only
        mlflow.log_dict(asdict(manifest), "manifest.json")
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=str(PYFUNC_CODE),
            artifacts={ARTIFACT_NAME: str(bundle_dir)}, pip_requirements=pip_requirements(),
            registered_model_name=MODEL_NAME, await_registration_for=60)
    version = int(info.registered_model_version)
    tags = {DIGEST_TAG: digest, "tandem.dataset": manifest.dataset,
            "tandem.parts": ",".join(manifest.parts), "tandem.created_at": manifest.created_at,
            **{f"tandem.run_id.{k}": v for k, v in manifest.run_ids.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, str(version), key, str(value))
    client.set_registered_model_alias(MODEL_NAME, alias, str(version))
    log.info("registered %s version %d as %s", MODEL_NAME, version, alias)
    return version


def resolve_alias(alias: str, client: MlflowClient | None = None) -> int | None:
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    client = client or client_for()
    try:
        return int(client.get_model_version_by_alias(MODEL_NAME, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _version(alias_or_version: str | int, client: MlflowClient) -> int:
    if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
        return int(alias_or_version)
    version = resolve_alias(str(alias_or_version), client)
    if version is None:
        raise LookupError(f"{MODEL_NAME} has no alias {alias_or_version!r}")
    return version


def download_bundle(alias_or_version: str | int, dest: Path,
                    client: MlflowClient | None = None) -> Path:
    """Download one version's bundle folder (by alias or number) and check its digest.

    Returns
    -------
    Path
        ``dest/v<version>/<name of the logged folder>`` — a complete ``tandem.models.bundle``
        folder, byte-identical to the one that was registered (else :class:`BundleDigestError`, also
        when the version has no ``DIGEST_TAG``: an unverifiable bundle is never used).
    """
    import mlflow.artifacts

    client = client or client_for()
    version = _version(alias_or_version, client)
    expected = client.get_model_version(MODEL_NAME, str(version)).tags.get(DIGEST_TAG)
    if not expected:  # checked first: an unverifiable bundle is not even downloaded
        raise BundleDigestError(f"{MODEL_NAME} v{version}: no {DIGEST_TAG} tag, cannot verify "
                                "the download")
    source = client.get_model_version_download_uri(MODEL_NAME, str(version))
    target = Path(dest) / f"v{version}"
    shutil.rmtree(target, ignore_errors=True)  # a partial earlier download would fail the digest
    target.mkdir(parents=True)
    source = source.rstrip("/")
    mlmodel = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{source}/MLmodel", dst_path=str(target), tracking_uri=client.tracking_uri)
    subpath = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"][
        "artifacts"][ARTIFACT_NAME]["path"]  # artifacts/<basename of the logged folder>
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{source}/{subpath}", dst_path=str(target),
        tracking_uri=client.tracking_uri))
    if bundle_digest(local) != expected:
        raise BundleDigestError(f"{MODEL_NAME} v{version}: downloaded bundle does not match "
                                "its digest")
    BundleManifest.load(local)  # format check
    return local


def version_metrics(version: int, client: MlflowClient | None = None) -> dict[str, float]:
    """The metrics logged by the run that registered ``version`` (its training-time evaluation)."""
    client = client or client_for()
    mv = client.get_model_version(MODEL_NAME, str(version))
    return dict(client.get_run(mv.run_id).data.metrics)


@dataclass(frozen=True)
class PromotionGates:
    """When a challenger may replace the champion.

    Attributes
    ----------
    ndcg_tolerance : float
        Largest allowed *relative* NDCG@10 drop vs the champion (0.02 = 2 %).
    min_ndcg, min_coverage, min_diversity : float
        Absolute floors the challenger must reach (catalog coverage and intra-list diversity are
        fractions in [0, 1]); the only gates when there is no champion yet.
    ndcg_key, coverage_key, diversity_key : str
        Metric names as ``tandem.evaluation.offline.score_models`` writes them (``@`` may appear as
        ``_at_``, the form MLflow stores).
    """

    ndcg_tolerance: float = 0.02
    min_ndcg: float = 0.0
    min_coverage: float = 0.05
    min_diversity: float = 0.1
    ndcg_key: str = "ndcg@10"
    coverage_key: str = "coverage@10"
    diversity_key: str = "diversity@10"


@dataclass
class Decision:
    """A promotion verdict: ``promoted``, one line per gate in ``reasons``, and its ``numbers``."""

    promoted: bool
    reasons: list[str]
    numbers: dict[str, float]
    challenger_version: int | None = None
    champion_version: int | None = None
    forced: bool = False
    run_id: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _get(metrics: Mapping[str, float] | None, key: str) -> float:
    if not metrics:
        return math.nan
    normalised = {metric_key(k): float(v) for k, v in metrics.items()}
    return normalised.get(metric_key(key), math.nan)


def promote(challenger_metrics: Mapping[str, float],
            champion_metrics: Mapping[str, float] | None,
            gates: PromotionGates = PromotionGates(), force: bool = False) -> Decision:
    """Decide whether the challenger replaces the champion (pure: metrics in, verdict out).

    Gates, all required: challenger NDCG@10 >= ``min_ndcg``; with a champion, challenger NDCG@10
    >= champion NDCG@10 * (1 - ``ndcg_tolerance``); coverage >= ``min_coverage``; diversity >=
    ``min_diversity``. A missing (NaN) metric fails its gate. ``force`` promotes anyway and says so.
    Metric names match after :func:`tandem.models.tracking.metric_key` (``ndcg@10`` ==
    ``ndcg_at_10``).
    """
    ndcg = _get(challenger_metrics, gates.ndcg_key)
    cov = _get(challenger_metrics, gates.coverage_key)
    div = _get(challenger_metrics, gates.diversity_key)
    champ_ndcg = _get(champion_metrics, gates.ndcg_key)
    numbers = {"challenger_ndcg_at_10": ndcg, "challenger_coverage": cov,
               "challenger_diversity": div, "champion_ndcg_at_10": champ_ndcg,
               "champion_coverage": _get(champion_metrics, gates.coverage_key),
               "champion_diversity": _get(champion_metrics, gates.diversity_key)}
    checks = [(ndcg >= gates.min_ndcg, f"ndcg@10 {ndcg:.4f} vs floor {gates.min_ndcg:.4f}"),
              (cov >= gates.min_coverage, f"coverage {cov:.4f} vs floor {gates.min_coverage:.4f}"),
              (div >= gates.min_diversity,
               f"diversity {div:.4f} vs floor {gates.min_diversity:.4f}")]
    if champion_metrics is None:
        checks.append((True, "no champion yet: absolute gates only"))
    else:
        floor = champ_ndcg * (1.0 - gates.ndcg_tolerance)
        change = (ndcg - champ_ndcg) / champ_ndcg if champ_ndcg > 0 else math.nan
        numbers["ndcg_relative_change"] = change
        checks.append((ndcg >= floor, f"ndcg@10 {ndcg:.4f} vs champion {champ_ndcg:.4f} "
                       f"(change {change:+.2%}, tolerance -{gates.ndcg_tolerance:.2%})"))
    passed = all(ok for ok, _ in checks)
    reasons = [("PASS " if ok else "FAIL ") + text for ok, text in checks]
    if force and not passed:
        reasons.append("FORCED: promoted although gates failed")
    return Decision(promoted=passed or force, reasons=reasons, numbers=numbers,
                    forced=force and not passed)


def promote_challenger(client: MlflowClient, evaluate_fn: Callable[[int], Mapping[str, float]],
                       gates: PromotionGates = PromotionGates(), force: bool = False,
                       params: Mapping[str, Any] | None = None) -> Decision:
    """Evaluate challenger and champion with ``evaluate_fn``, decide, log, and move ``champion``.

    Parameters
    ----------
    client : MlflowClient
        Registry and tracking client.
    evaluate_fn : callable
        ``version -> metrics``; called for both versions so they are scored on the same data.
    params : Mapping, optional
        Extra params for the decision run (e.g. the evaluation interval).

    Returns
    -------
    Decision
        With ``run_id`` of the MLflow run (experiment ``tandem``, run name ``promote``) that holds
        the params (versions, gates), metrics (both sides' numbers) and ``decision.json``.
    """
    challenger = resolve_alias(CHALLENGER, client)
    if challenger is None:
        raise LookupError(f"{MODEL_NAME} has no {CHALLENGER!r} version to promote")
    champion = resolve_alias(CHAMPION, client)
    t0 = time.perf_counter()
    if champion == challenger:
        decision = Decision(False, [f"challenger v{challenger} is already champion"], {},
                            challenger, champion)
        log.info(decision.reasons[0])
        return decision
    challenger_metrics = dict(evaluate_fn(challenger))
    champion_metrics = None if champion is None else dict(evaluate_fn(champion))
    decision = promote(challenger_metrics, champion_metrics, gates, force)
    decision.challenger_version, decision.champion_version = challenger, champion
    decision.metrics = {"challenger": challenger_metrics, "champion": champion_metrics or {}}
    decision.numbers["evaluate_seconds"] = time.perf_counter() - t0
    run_params = {"challenger_version": challenger, "champion_version": champion,
                  "force": force, **{f"gate_{k}": v for k, v in asdict(gates).items()},
                  **(params or {})}
    with start_run("promote", run_params, uri=client.tracking_uri, experiment=EXPERIMENT) as run:
        run.log_metrics({k: v for k, v in decision.numbers.items() if math.isfinite(v)})
        run.log_metrics({"promoted": float(decision.promoted)})
        run.set_tags({"tandem.decision": _verdict(decision), "tandem.job": "promote"})
        run.log_dict(_jsonable(asdict(decision) | {"run_id": run.run_id}), "decision.json")
        decision.run_id = run.run_id
    mv_tags = {"tandem.promotion": _verdict(decision), "tandem.promotion_run_id": decision.run_id,
               "tandem.promotion_reasons": "; ".join(decision.reasons)[:4000],
               "tandem.previous_champion": "" if champion is None else champion,
               **{f"tandem.eval.{k}": f"{v:.6g}" for k, v in decision.numbers.items()}}
    for key, value in mv_tags.items():
        client.set_model_version_tag(MODEL_NAME, str(challenger), key, str(value))
    if decision.promoted:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(challenger))
    log.info("challenger v%d %s (champion was %s): %s", challenger, _verdict(decision), champion,
             "; ".join(decision.reasons))
    return decision


def _jsonable(value: Any) -> Any:
    """NaN -> None, recursively, so ``decision.json`` is strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _verdict(decision: Decision) -> str:
    if decision.forced:
        return "forced"
    return "promoted" if decision.promoted else "refused"


def rollback(to_version: int, client: MlflowClient | None = None) -> int | None:
    """Point ``champion`` back at ``to_version`` (which must exist); returns the previous champion.

    The rolled-back-from version gets tag ``tandem.rolled_back_to`` so the history stays readable.
    """
    client = client or client_for()
    client.get_model_version(MODEL_NAME, str(to_version))  # raises if it does not exist
    previous = resolve_alias(CHAMPION, client)
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(to_version))
    if previous is not None and previous != to_version:
        client.set_model_version_tag(MODEL_NAME, str(previous), "tandem.rolled_back_to",
                                     str(to_version))
    log.info("champion rolled back from v%s to v%d", previous, to_version)
    return previous
