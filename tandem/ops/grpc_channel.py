"""A client channel to the recommender server with the security the environment asks for.

Settings (all optional; none set gives a plaintext channel, the demo's default on loopback):

- ``TANDEM_GRPC_CA``: PEM of the CA that signed the server's certificate; turns TLS on.
- ``TANDEM_GRPC_CLIENT_CERT`` + ``TANDEM_GRPC_CLIENT_KEY``: this client's certificate and key
  (mutual TLS; the key file must be mode 0600).
- ``TANDEM_GRPC_TOKEN`` (or ``TANDEM_GRPC_TOKEN_FILE``, mode 0600): sent as
  ``authorization: Bearer <token>`` on every call. gRPC attaches call credentials to TLS
  channels only, so a token without ``TANDEM_GRPC_CA`` is refused instead of sent in clear.

The server side is ``serving.auth`` (same variables with ``TANDEM_GRPC_TLS_*``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tandem.security import read_secret, read_secret_file


def channel_credentials(env: Mapping[str, str] | None = None) -> grpc.ChannelCredentials | None:
    """TLS (+ client certificate, + bearer token) credentials from ``env``; None = plaintext."""
    env = os.environ if env is None else env
    ca, cert, key = (env.get(f"TANDEM_GRPC_{n}") for n in ("CA", "CLIENT_CERT", "CLIENT_KEY"))
    token = read_secret("TANDEM_GRPC_TOKEN", env)
    if not ca:
        if cert or key or token:
            raise ValueError("TANDEM_GRPC_CLIENT_CERT/KEY and TANDEM_GRPC_TOKEN need TLS: "
                             "set TANDEM_GRPC_CA to the CA of the server's certificate")
        return None
    if bool(cert) != bool(key):
        raise ValueError("TANDEM_GRPC_CLIENT_CERT and TANDEM_GRPC_CLIENT_KEY go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=read_secret_file(key) if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return credentials


def channel(target: str, options: Sequence[tuple[str, object]] = (),
            env: Mapping[str, str] | None = None) -> grpc.Channel:
    """A channel to ``target`` (``host:port``), secure when ``env`` configures TLS."""
    credentials = channel_credentials(env)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def wait_serving(target: str, timeout_s: float) -> bool:
    """Poll the server's health service until it says SERVING (True) or ``timeout_s`` ends."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(1)
    return False
