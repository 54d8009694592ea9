"""``make demo``: the whole pipeline on MovieLens-100K through the real stack, then a live feed.

1. land MovieLens-100K as raw events (the landing area the Kafka landing consumer writes) plus the
   catalog and user profiles;
2. start the embedded stack, each service by pid file (``make stop`` stops them): the Kafka-protocol
   broker (tansu), the MLflow server, the two stream consumers, Airflow standalone;
3. trigger ``tandem_hourly`` and then ``tandem_daily`` through Airflow's REST API (exactly what the
   UI's Trigger button does) and follow their tasks;
4. start the gRPC server on the promoted ``champion``, print recommendations for a few users;
5. send a burst of events for one user through Kafka and show the feed reacting to it;
6. once serving's sampled ranker rows have landed, run the skew gate over the minutes served
   (:mod:`tandem.cli.demo_skew`): ``<home>/reports/skew.json``.

A second ``make demo`` reuses what is there: running services stay up, and the pipeline is skipped
when a champion already exists (``--rerun`` forces it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tandem.cli import demo_skew
from tandem.config import REPO_ROOT, Paths, kafka_bootstrap
from tandem.ops import processes

console = Console(highlight=False)

AIRFLOW_PORT, MLFLOW_PORT, KAFKA_PORT, GRPC_PORT, METRICS_PORT = 8080, 5000, 9092, 50051, 9108
# the supervisors of the stream consumers export their restart counters here
CONSUMER_METRICS_PORTS = {"landing-consumer": 9109, "feature-consumer": 9110,
                          "feature-log-landing": 9111}
BURST_TARGET = 3  # items of the burst's genre in the 10-item feed the burst should bring


@dataclass(frozen=True)
class Stack:
    paths: Paths
    bootstrap: str
    tracking_uri: str
    mlflow_auth: bool = False  # whether MLflow refuses anonymous requests

    def env(self) -> dict[str, str]:
        return {"TANDEM_HOME": str(self.paths.root), "PYTHONPATH": str(REPO_ROOT),
                "MLFLOW_TRACKING_URI": self.tracking_uri,
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "OPENBLAS_NUM_THREADS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true"}


def _wait_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not open port {port} within {timeout_s:.0f}s")


def _step(text: str) -> float:
    console.print(f"[bold cyan]>[/] {text}")
    return time.monotonic()


def _done(t0: float, extra: str = "") -> None:
    console.print(f"  [green]done[/] in {time.monotonic() - t0:.1f}s {extra}")


def start_stack(paths: Paths) -> Stack:
    """Broker, MLflow, the two consumers; each reused when already running."""
    py = sys.executable
    bootstrap = kafka_bootstrap()
    if not bootstrap:
        t0 = _step(f"Kafka-protocol broker (tansu) on 127.0.0.1:{KAFKA_PORT}")
        processes.start(paths.run, "kafka", [py, "-m", "tandem.streaming.broker", "--port",
                                             str(KAFKA_PORT)])
        _wait_port(KAFKA_PORT, 30, "the broker")
        bootstrap = f"127.0.0.1:{KAFKA_PORT}"
        _done(t0)
    from tandem.streaming.topics import ensure_topics

    ensure_topics(bootstrap)
    auth = start_mlflow(paths, MLFLOW_PORT)
    stack = Stack(paths, bootstrap, f"http://127.0.0.1:{MLFLOW_PORT}", auth)
    start_consumer(stack, "landing_consumer")
    # serving's sampled feature rows (tandem.features.feature_log), read by tandem_daily's skew gate
    start_consumer(stack, "landing_consumer", "feature-log-landing", ["--kind", "feature_log"])
    if (paths.feast / "feature_store.yaml").exists():
        start_consumer(stack, "feature_consumer")
    return stack


def start_mlflow(paths: Paths, port: int) -> bool:
    """Start (or reuse) the MLflow server; return whether it refuses anonymous requests.

    Basic auth is on unless ``TANDEM_MLFLOW_AUTH=0``: the admin password is generated once into
    a 0600 file under the state root (:mod:`tandem.ops.mlflow_server`) and put into this process's
    environment as ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, so every MLflow
    client the demo starts from here on authenticates without the secret on a command line or
    in a log: this process (the champion check) and, through
    :func:`tandem.ops.processes.child_env`, serving, Airflow and every job its workers run. A
    server an earlier demo started is reused as it is, so the answer comes from asking it.
    """
    from tandem.ops.mlflow_server import (
        auth_requested,
        client_env,
        refuses_anonymous,
        server_command,
        server_env,
    )

    auth = auth_requested()
    t0 = _step(f"MLflow server on 127.0.0.1:{port} (SQLite registry, local artifacts"
               f"{', basic auth' if auth else ', no auth: TANDEM_MLFLOW_AUTH=0'})")
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    processes.start(paths.run, "mlflow", server_command(paths.mlflow, port, auth=auth),
                    env=server_env(paths.mlflow, auth))
    protected = refuses_anonymous(f"http://127.0.0.1:{port}")
    if protected:
        os.environ.update(client_env(paths.mlflow))
    elif auth:
        console.print("  [red]MLflow answers without credentials[/]: a server an earlier demo "
                      "started without auth is still running (make stop, then make demo)")
    _done(t0)
    return protected


def start_consumer(stack: Stack, module: str, name: str | None = None,
                   extra: list[str] | None = None) -> None:
    """Start (or reuse) a stream consumer under a supervisor that restarts it when it exits. The
    feature consumer pushes to the Feast repo, so it starts once ``tandem_hourly`` applied it.
    ``name`` (default: the module's) and ``extra`` flags run a second instance of a module."""
    name = name or module.replace("_", "-")
    port = CONSUMER_METRICS_PORTS[name]
    processes.start(stack.paths.run, name, [
        sys.executable, "-m", "tandem.streaming.supervisor", "--name", name,
        "--metrics-port", str(port), "--status", str(_supervisor_status(stack.paths, name)),
        "--", sys.executable, "-m", f"tandem.streaming.{module}",
        "--home", str(stack.paths.root), "--bootstrap", stack.bootstrap,
        "--stats", str(stack.paths.run / f"{name}.stats.json"), *(extra or [])],
        env=stack.env())
    group = {"landing-consumer": "tandem-lake", "feature-consumer": "tandem-features",
             "feature-log-landing": "tandem-feature-log"}[name]
    console.print(f"  {name} running (group {group}), restarts on "
                  f"http://127.0.0.1:{port}/metrics")


def _supervisor_status(paths: Paths, name: str) -> Path:
    return paths.run / f"{name}.supervisor.json"


class RestartReport:
    """Prints a consumer's restarts as the demo notices them, so a crash loop is not silent."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.seen: dict[str, int] = {}

    def check(self) -> None:
        from tandem.streaming.supervisor import read_status

        for name in CONSUMER_METRICS_PORTS:
            status = read_status(_supervisor_status(self.paths, name))
            restarts = status["restarts"] if status else 0
            if restarts > self.seen.get(name, 0):
                console.print(f"  [red]{name} restarted[/] ({restarts} times so far, last exit "
                              f"code {status['last_exit_code']}); see "
                              f"{self.paths.run / (name + '.log')}")
            self.seen[name] = restarts


def _airflow_demo_env(stack: Stack) -> dict[str, str]:
    """The demo runs only the DAG runs it triggers: automatic schedules are off (an unpaused DAG
    would otherwise also start its latest scheduled interval). Production leaves them on."""
    return {**stack.env(), "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}


def _progress(tasks: dict[str, dict], seen: dict[str, str]) -> None:
    """Print each task's state changes; a finished task with the time Airflow measured."""
    for task, ti in tasks.items():
        state = ti["state"]
        if state and seen.get(task) != state:
            seen[task] = state
            colour = {"success": "green", "failed": "red"}.get(state, "yellow")
            took = f" in {ti['duration']:.0f}s" if state in ("success", "failed") and ti.get(
                "duration") is not None else ""
            console.print(f"    {task:<20} [{colour}]{state}[/]{took}")


def run_pipeline(stack: Stack, start: str, end: str, restarts: RestartReport) -> None:
    """Trigger tandem_hourly then tandem_daily in Airflow and wait for both."""
    from tandem.ops.airflow_client import start_standalone

    t0 = _step(f"Airflow standalone on http://127.0.0.1:{AIRFLOW_PORT} (SQLite metadata)")
    client = start_standalone(stack.paths, port=AIRFLOW_PORT, extra_env=_airflow_demo_env(stack))
    _done(t0)
    for dag_id, conf in (("tandem_hourly", {"start": start, "end": end}),
                         ("tandem_daily", {"start": start, "end": end,
                                           "dataset": "movielens-100k"})):
        t0 = _step(f"trigger {dag_id} {json.dumps(conf)}")
        run_id = client.trigger(dag_id, conf)
        seen: dict[str, str] = {}

        def on_poll(tis: dict[str, dict], seen: dict[str, str] = seen) -> None:
            _progress(tis, seen)
            restarts.check()

        state = client.wait_run(dag_id, run_id, timeout_s=3600, on_poll=on_poll)
        if state != "success":
            raise SystemExit(f"{dag_id} run {run_id} ended {state}; see the Airflow UI "
                             f"(logs under {stack.paths.root / 'airflow' / 'logs'})")
        _done(t0, f"({dag_id} {state})")
        if dag_id == "tandem_hourly":  # the Feast repo now exists: session features can flow
            start_consumer(stack, "feature_consumer")


def start_serving(stack: Stack) -> None:
    t0 = _step(f"gRPC server on 127.0.0.1:{GRPC_PORT} serving alias champion")
    processes.start(stack.paths.run, "serving", [
        sys.executable, "-m", "serving.server", "--alias", "champion", "--tracking-uri",
        stack.tracking_uri, "--port", str(GRPC_PORT), "--metrics-port", str(METRICS_PORT),
        "--feast-home", str(stack.paths.root), "--poll-s", "30",
        "--cache-dir", str(stack.paths.root / "serving-cache"),
        "--impression-sink", "tandem.streaming.producer:impression_logger_from_env"],
        env=stack.env())
    from tandem.ops import grpc_channel

    if not grpc_channel.wait_serving(f"127.0.0.1:{GRPC_PORT}", 300):
        raise SystemExit("the gRPC server did not become SERVING; see var/run/serving.log")
    _done(t0)


def _stub():
    """A stub over the channel the environment configures (TLS/token: tandem.ops.grpc_channel)."""
    from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
    from tandem.ops import grpc_channel

    return pb_grpc.RecommenderStub(grpc_channel.channel(f"127.0.0.1:{GRPC_PORT}"))


def recommend(user_id: str, k: int = 10):
    from tandem.contracts import recommender_v1_pb2 as pb

    return _stub().Recommend(pb.RecommendRequest(
        user_id=user_id, k=k, context=pb.Context(device="tv", country="US", surface="home")),
        timeout=5)


def _titles(paths: Paths) -> dict[str, tuple[str, list[str]]]:
    import pyarrow.parquet as pq

    items = pq.read_table(paths.items, columns=["item_id", "title", "genres"]).to_pylist()
    return {r["item_id"]: (r["title"], r["genres"] or []) for r in items}


def print_feed(paths: Paths, user_id: str, reply, titles) -> None:
    table = Table(title=f"user {user_id} - model v{reply.model_version} variant "
                        f"{reply.variant or '-'}{' (cold start)' if reply.cold_start else ''}",
                  title_justify="left")
    for col in ("#", "title", "genres", "score", "sources"):
        table.add_column(col)
    from tandem.contracts import recommender_v1_pb2 as pb

    for item in reply.items:
        title, genres = titles.get(item.item_id, (item.item_id, []))
        sources = ",".join(pb.CandidateSource.Name(s).removeprefix("CANDIDATE_SOURCE_").lower()
                           for s in item.sources)
        table.add_row(str(item.position + 1), title, "|".join(genres[:3]),
                      f"{item.score:.3f}", sources)
    console.print(table)


def burst_events(user_id: str, items: list[str], now_ms: int, session: str) -> list[dict]:
    """A click and a like on each of ``items``, one item a second up to ``now_ms``. Each event
    has its own id: a click and a like sharing one would read as a replay, and the lake and the
    feature consumer would keep only the click (the burst then weighed a quarter as much)."""
    return [{"event_id": f"{session}-{n}-{etype}", "event_type": etype, "user_id": user_id,
             "item_id": item, "ts": now_ms - (len(items) - n) * 1000, "session_id": session,
             "context": {"device": "tv", "country": "US", "surface": "home"}}
            for n, item in enumerate(items) for etype in ("click", "like")]


def burst(stack: Stack, user_ids: list[str], titles) -> None:
    """Send 12 engagements with one genre through Kafka for the first of ``user_ids`` whose feed
    has no session neighbours yet (an earlier demo's burst stays in that user's session row, and
    would show no change); show the feed change."""
    from tandem.contracts import recommender_v1_pb2 as pb
    from tandem.streaming.producer import EventProducer

    for user_id in user_ids:
        before = recommend(user_id)
        if not any(pb.CANDIDATE_SOURCE_SESSION in i.sources for i in before.items):
            break
    genre = "Horror"
    liked = [i for i, (_, g) in titles.items() if genre in g][:12]
    events = burst_events(user_id, liked, int(time.time() * 1000),
                          f"demo-{uuid.uuid4().hex[:8]}")
    t0 = _step(f"burst: {len(events)} click/like events on {genre} films for user {user_id} "
               "through Kafka")
    producer = EventProducer(stack.bootstrap, client_id="tandem-demo")
    producer.send_many(events)
    producer.flush(10)
    producer.close()
    # The burst has reached serving (Kafka -> feature consumer -> online store -> the request's
    # session row) once neighbours of its items are in the feed. A changed feed alone proves
    # nothing: the impressions the "before" request logged change the session counts too. The
    # feed is then followed until BURST_TARGET of its items are of the burst's genre (the
    # session's ALS fold-in and genre content moved retrieval: serving.session_retrieval).
    def in_genre(reply) -> int:
        return sum(genre in titles.get(i.item_id, ("", []))[1] for i in reply.items)

    sent = time.monotonic()
    reacted = reached = None
    while time.monotonic() < sent + 30:
        time.sleep(0.25)
        after = recommend(user_id)
        waited = time.monotonic() - sent
        if reacted is None and any(pb.CANDIDATE_SOURCE_SESSION in i.sources
                                   for i in after.items):
            reacted = waited
        if reacted is not None and in_genre(after) >= BURST_TARGET:
            reached = waited
            break
        if reacted is not None and waited > reacted + 5:  # the session is in; it has settled
            break
    if reacted is None:
        console.print("  [red]no session neighbours in the feed after 30 s[/]: is the feature "
                      f"consumer running? ({stack.paths.run / 'feature-consumer.log'})")
    else:
        _done(t0, f"(the feed showed it {reacted:.1f}s after the send)")
    changed = len({i.item_id for i in after.items} - {i.item_id for i in before.items})
    target = (f"{BURST_TARGET}/{len(after.items)} reached {reached:.1f}s after the send"
              if reached is not None else f"[red]{BURST_TARGET}/{len(after.items)} not reached[/]")
    console.print(f"  the feed reacted: {changed} of {len(after.items)} items are new; {genre} "
                  f"films before {in_genre(before)}/{len(before.items)}, after "
                  f"{in_genre(after)}/{len(after.items)} ({target})")
    print_feed(stack.paths, user_id, after, titles)


def _has_champion(tracking_uri: str) -> bool:
    from tandem.ops.registry import client_for, resolve_alias

    try:
        return resolve_alias("champion", client=client_for(tracking_uri)) is not None
    except Exception:  # noqa: BLE001 - a fresh registry may not know the model yet
        return False


def run_demo(folder: Path, rerun: bool = False) -> None:
    from tandem.cli.land import load_movielens_into_lake

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    t_all = time.monotonic()
    paths = Paths.default()
    console.rule("[bold]Tandem demo: MovieLens-100K through Kafka, Spark, Feast, MLflow, Airflow")
    start, end = load_movielens_into_lake(paths, folder)
    stack = start_stack(paths)
    restarts = RestartReport(paths)
    if rerun or not _has_champion(stack.tracking_uri):
        run_pipeline(stack, start, end, restarts)
    else:
        console.print("[bold cyan]>[/] a champion exists already: pipeline skipped "
                      "(python -m tandem.cli demo --rerun to run it again)")
        from tandem.ops.airflow_client import start_standalone

        start_standalone(paths, port=AIRFLOW_PORT, extra_env=_airflow_demo_env(stack))
    start_serving(stack)
    served_from, rows_before = datetime.now(UTC), demo_skew.rows_logged(METRICS_PORT)
    titles = _titles(paths)
    console.rule("[bold]Recommendations")
    for user in ("1", "42", "500"):
        print_feed(paths, user, recommend(user), titles)
    print_feed(paths, "new-user-7", recommend("new-user-7"), titles)
    burst(stack, [str(u) for u in range(42, 62)], titles)
    restarts.check()
    demo_skew.check(console, paths, stack.env(), METRICS_PORT, served_from, rows_before,
                    recommend)
    _print_access(stack, time.monotonic() - t_all)


def _print_access(stack: Stack, elapsed: float) -> None:
    """Where each UI is and how to log in: the generated passwords, as Airflow prints its own."""
    paths = stack.paths
    pw_file = paths.root / "airflow" / "simple_auth_manager_passwords.json.generated"
    password = json.loads(pw_file.read_text()).get("admin", "?") if pw_file.exists() else "?"
    console.rule(f"[bold]Ready in {elapsed / 60:.1f} min")
    console.print(f"Airflow UI   http://127.0.0.1:{AIRFLOW_PORT}   user admin / password "
                  f"{password}")
    from tandem.ops.mlflow_server import client_env

    if stack.mlflow_auth:
        creds = client_env(paths.mlflow)
        login = (f"user {creds['MLFLOW_TRACKING_USERNAME']} / password "
                 f"{creds['MLFLOW_TRACKING_PASSWORD']}")
    else:
        login = "open, no login (basic auth unless TANDEM_MLFLOW_AUTH=0)"
    console.print(f"MLflow UI    http://127.0.0.1:{MLFLOW_PORT}   {login}  "
                  "(model tandem-recommender)")
    console.print(f"gRPC         127.0.0.1:{GRPC_PORT}  tandem.serving.v1.Recommender "
                  "(health + reflection on)")
    console.print(f"Prometheus   http://127.0.0.1:{METRICS_PORT}/metrics (serving), "
                  + ", ".join(f"http://127.0.0.1:{port}/metrics ({name})"
                              for name, port in CONSUMER_METRICS_PORTS.items()))
    console.print(f"Kafka        127.0.0.1:{KAFKA_PORT}  topic tandem.events.v1")
    console.print("Stop everything with: make stop")
