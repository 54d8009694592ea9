"""Access control and secrets: gRPC TLS / mutual TLS / bearer token on a real loopback server
with certificates made here (``cryptography``), secret files refused unless 0600, and the
Kafka SASL/SSL client settings (against the tansu broker, which speaks neither).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.app import App, ServingConfig, UserRows
from serving.auth import Access
from serving.server import create_server, local_source
from tandem.contracts import recommender_v1_pb2 as pb
from tandem.contracts import recommender_v1_pb2_grpc as pb_grpc
from tandem.models import synthetic_bundle as S
from tandem.ops import grpc_channel
from tandem.security import InsecureSecretFile, kafka_client_kwargs, read_secret
from tests.conftest import free_port

TOKEN = "s3cret-token-for-tests"


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(folder: Path, cn: str, ca=None, server: bool = False) -> tuple[Path, Path, tuple]:
    """A key (0600 file) and certificate for ``cn``: self-signed CA when ``ca`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    issuer_cert, issuer_key = ca if ca else (None, key)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer_cert.subject if issuer_cert else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1)))
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_path = _write(folder / f"{cn}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path = folder / f"{cn}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, (cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server (SAN 127.0.0.1, localhost) and a client certificate, and a rogue CA
    with its own client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca, _, ca_pair = _issue(d, "tandem-ca")
    server_cert, server_key, _ = _issue(d, "server", ca_pair, server=True)
    client_cert, client_key, _ = _issue(d, "client", ca_pair)
    rogue_ca, _, rogue_pair = _issue(d, "rogue-ca")
    rogue_cert, rogue_key, _ = _issue(d, "rogue-client", rogue_pair)
    return {"ca": ca, "server_cert": server_cert, "server_key": server_key,
            "client_cert": client_cert, "client_key": client_key, "rogue_ca": rogue_ca,
            "rogue_cert": rogue_cert, "rogue_key": rogue_key, "dir": d}


class ColdStore:
    def fetch(self, user_id: str) -> UserRows:
        return UserRows()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    spec = S.SyntheticSpec(n_items=300, n_users=500, n_als_users=200, n_trees=5, num_leaves=7,
                           n_train_groups=20, group_size=10)
    return S.build(tmp_path_factory.mktemp("bundle"), spec)[0]


@pytest.fixture(scope="module")
def app(bundle):
    fetch, probe = local_source(bundle)
    app = App(fetch, probe, None, ServingConfig(ranker_backend="lightgbm",
                                                online_store_timeout_ms=200.0,
                                                rank_deadline_ms=5000.0), ColdStore())
    yield app
    app.close()


@pytest.fixture
def serve(app):
    """serve(access) -> port of a server started with ``access`` (stopped at teardown)."""
    running = []

    def start(access: Access) -> int:
        server, port = create_server("127.0.0.1:0", app, access=access)
        running.append(server)
        return port

    yield start
    for server in running:
        server.stop(0.5).wait()


def _recommend(port: int, env: dict[str, str], insecure: bool = False) -> pb.RecommendReply:
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if insecure else grpc_channel.channel(target, env=env)
    with channel:
        return pb_grpc.RecommenderStub(channel).Recommend(
            pb.RecommendRequest(user_id="u999999", k=5), timeout=10)


def _code(port: int, env: dict[str, str], insecure: bool = False) -> grpc.StatusCode:
    try:
        _recommend(port, env, insecure)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK



@pytest.mark.serving
def test_tls(pki, serve):
    port = serve(Access.from_settings(str(pki["server_cert"]), str(pki["server_key"]), env={}))
    reply = _recommend(port, {"TANDEM_GRPC_CA": str(pki["ca"])})
    assert len(reply.items) == 5 and reply.cold_start
    assert _code(port, {}, insecure=True) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    assert _code(port, {"TANDEM_GRPC_CA": str(pki["rogue_ca"])}) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.serving
def test_mutual_tls(pki, serve):
    port = serve(Access.from_settings(str(pki["server_cert"]), str(pki["server_key"]),
                                      str(pki["ca"]), env={}))
    tls = {"TANDEM_GRPC_CA": str(pki["ca"])}
    assert _code(port, tls) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    rogue = {**tls, "TANDEM_GRPC_CLIENT_CERT": str(pki["rogue_cert"]),
             "TANDEM_GRPC_CLIENT_KEY": str(pki["rogue_key"])}
    assert _code(port, rogue) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
    mine = {**tls, "TANDEM_GRPC_CLIENT_CERT": str(pki["client_cert"]),
            "TANDEM_GRPC_CLIENT_KEY": str(pki["client_key"])}
    assert len(_recommend(port, mine).items) == 5


@pytest.mark.serving
def test_bearer_token(pki, serve, tmp_path):
    token_file = _write(tmp_path / "token", f"{TOKEN}\n".encode())
    access = Access.from_settings(str(pki["server_cert"]), str(pki["server_key"]),
                                  env={"TANDEM_GRPC_TOKEN_FILE": str(token_file)})
    assert access.token == TOKEN  # the file's newline is not part of it
    port = serve(access)
    tls = {"TANDEM_GRPC_CA": str(pki["ca"])}
    assert _code(port, tls) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(port, {**tls, "TANDEM_GRPC_TOKEN": TOKEN + "x"}) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(port, {**tls, "TANDEM_GRPC_TOKEN": TOKEN[:-1]}) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert len(_recommend(port, {**tls, "TANDEM_GRPC_TOKEN": TOKEN}).items) == 5
    with grpc_channel.channel(f"127.0.0.1:{port}", env=tls) as channel:
        # health stays open (load balancers carry no secret) ...
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        # ... reflection (a streaming RPC) does not
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(replies)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_secret_files_must_be_private(pki, tmp_path):
    token_file = _write(tmp_path / "token", TOKEN.encode(), mode=0o640)
    with pytest.raises(InsecureSecretFile, match="chmod 600"):
        read_secret("TANDEM_GRPC_TOKEN", {"TANDEM_GRPC_TOKEN_FILE": str(token_file)})
    os.chmod(token_file, 0o600)
    assert read_secret("TANDEM_GRPC_TOKEN", {"TANDEM_GRPC_TOKEN_FILE": str(token_file)}) == TOKEN
    assert read_secret("TANDEM_GRPC_TOKEN", {"TANDEM_GRPC_TOKEN": "a"}) == "a"
    assert read_secret("TANDEM_GRPC_TOKEN", {}) is None
    with pytest.raises(ValueError, match="not both"):
        read_secret("TANDEM_GRPC_TOKEN", {"TANDEM_GRPC_TOKEN": "a",
                                          "TANDEM_GRPC_TOKEN_FILE": str(token_file)})
    open_key = _write(tmp_path / "server.key", pki["server_key"].read_bytes(), mode=0o644)
    with pytest.raises(InsecureSecretFile):
        Access.from_settings(str(pki["server_cert"]), str(open_key), env={})
    with pytest.raises(ValueError, match="need TLS"):  # a token is never sent in clear
        grpc_channel.channel_credentials({"TANDEM_GRPC_TOKEN": TOKEN})
    with pytest.raises(ValueError, match="need TLS"):
        Access.from_settings(None, None, env={"TANDEM_GRPC_TOKEN": TOKEN})


@pytest.mark.serving
def test_server_refuses_a_readable_key_at_start(pki, tmp_path):
    """One clear line and exit 2 before anything starts; the key's bytes are not printed."""
    open_key = _write(tmp_path / "server.key", pki["server_key"].read_bytes(), mode=0o644)
    done = subprocess.run(
        [sys.executable, "-m", "serving.server", "--bundle-dir", str(tmp_path), "--port", "0",
         "--tls-cert", str(pki["server_cert"]), "--tls-key", str(open_key)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(
            Path(__file__).resolve().parents[1])})
    assert done.returncode == 2, done.stderr
    assert "chmod 600" in done.stderr and "PRIVATE KEY" not in done.stderr + done.stdout


@pytest.mark.serving
def test_server_process_with_tls_and_token(pki, bundle, tmp_path):
    """The deployed path: flags and a token file start a TLS server that checks the token."""
    token_file = _write(tmp_path / "token", TOKEN.encode())
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "TANDEM_GRPC_TOKEN_FILE": str(token_file)}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--bundle-dir", str(bundle), "--port",
             str(port), "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    tls = {"TANDEM_GRPC_CA": str(pki["ca"])}
    try:
        with grpc_channel.channel(f"127.0.0.1:{port}", env=tls) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
        assert _code(port, tls) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(port, tls, insecure=True) == grpc.StatusCode.UNAVAILABLE
        assert len(_recommend(port, {**tls, "TANDEM_GRPC_TOKEN": TOKEN}).items) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert TOKEN not in (tmp_path / "server.log").read_text()


KAFKA_ENV = {"TANDEM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
             "TANDEM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
             "TANDEM_KAFKA_SASL_USERNAME": "tandem"}


def test_kafka_client_kwargs(pki, tmp_path):
    assert kafka_client_kwargs({}) == {}
    password = _write(tmp_path / "kafka-password", b"pw\n")
    env = {**KAFKA_ENV, "TANDEM_KAFKA_SASL_PASSWORD_FILE": str(password),
           "TANDEM_KAFKA_SSL_CAFILE": str(pki["ca"]),
           "TANDEM_KAFKA_SSL_CERTFILE": str(pki["client_cert"]),
           "TANDEM_KAFKA_SSL_KEYFILE": str(pki["client_key"])}
    assert kafka_client_kwargs(env) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "tandem", "sasl_plain_password": "pw",
        "ssl_cafile": str(pki["ca"]), "ssl_certfile": str(pki["client_cert"]),
        "ssl_keyfile": str(pki["client_key"])}
    assert kafka_client_kwargs({"TANDEM_KAFKA_SECURITY_PROTOCOL": "SSL"}) == {
        "security_protocol": "SSL"}  # the system CAs verify the broker
    assert kafka_client_kwargs({**KAFKA_ENV, "TANDEM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                "TANDEM_KAFKA_SASL_PASSWORD": "pw",
                                "TANDEM_KAFKA_SSL_CAFILE": "ignored"}) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "tandem", "sasl_plain_password": "pw"}
    for bad, match in (({"TANDEM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "one of"),
                       (KAFKA_ENV, "TANDEM_KAFKA_SASL_PASSWORD"),
                       ({**KAFKA_ENV, "TANDEM_KAFKA_SASL_MECHANISM": "GSSAPI",
                         "TANDEM_KAFKA_SASL_PASSWORD": "pw"}, "MECHANISM"),
                       ({"TANDEM_KAFKA_SECURITY_PROTOCOL": "SSL",
                         "TANDEM_KAFKA_SSL_CERTFILE": "c.pem"}, "go together")):
        with pytest.raises(ValueError, match=match):
            kafka_client_kwargs(bad)
    os.chmod(pki["client_key"], 0o644)
    try:
        with pytest.raises(InsecureSecretFile):
            kafka_client_kwargs(env)
    finally:
        os.chmod(pki["client_key"], 0o600)


@pytest.mark.kafka
def test_kafka_sasl_against_a_plaintext_broker_fails(kafka_broker, caplog):
    """tansu speaks no SASL: the client's handshake is refused, named in the log, and the
    constructor raises after ``bootstrap_timeout_ms``; it never falls back to plaintext (the
    same broker takes a plaintext client)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, bootstrap_timeout_ms=5000).close()
    secure = kafka_client_kwargs({**KAFKA_ENV, "TANDEM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                  "TANDEM_KAFKA_SASL_PASSWORD": "pw"})
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, bootstrap_timeout_ms=3000,
                      **secure)
    assert "UnsupportedSaslMechanism" in caplog.text


@pytest.mark.kafka
def test_kafka_sasl_ssl_against_a_plaintext_broker_never_connects(pki, tmp_path):
    """SASL_SSL against a broker without TLS: no producer ever comes back. kafka-python 3.0.12's
    TLS handshake ignores ``bootstrap_timeout_ms`` and waits until the broker drops the socket
    (tansu reads the ClientHello as the length of a huge request and waits for the rest), so
    this test uses its own broker and stops it to end the wait; the constructor then raises."""
    import threading

    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from tandem.streaming.broker import start_broker

    broker = start_broker(log_path=tmp_path / "tansu.log")
    outcome: list[object] = []
    secure = kafka_client_kwargs({**KAFKA_ENV, "TANDEM_KAFKA_SASL_PASSWORD": "pw",
                                  "TANDEM_KAFKA_SSL_CAFILE": str(pki["ca"])})

    def construct():
        try:
            outcome.append(KafkaProducer(bootstrap_servers=broker.bootstrap,
                                         bootstrap_timeout_ms=2000, **secure))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(exc)

    thread = threading.Thread(target=construct, daemon=True)
    try:
        thread.start()
        thread.join(5)
        assert thread.is_alive() and not outcome  # stuck in the handshake, not connected
    finally:
        broker.stop()
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], KafkaError), outcome
