"""Who may call the server: TLS, optional mutual TLS, optional bearer token.

- TLS: the server's certificate chain and key (``--tls-cert``/``--tls-key`` or
  ``TANDEM_GRPC_TLS_CERT``/``TANDEM_GRPC_TLS_KEY``; the key file must be mode 0600).
- Mutual TLS: ``--tls-client-ca`` (``TANDEM_GRPC_TLS_CLIENT_CA``) makes the handshake require a
  client certificate signed by that CA; a client without one never reaches a handler.
- Bearer token: ``TANDEM_GRPC_TOKEN`` or the 0600 file ``TANDEM_GRPC_TOKEN_FILE`` (never a flag:
  command lines are visible to every local user). Every call except the health check must carry
  ``authorization: Bearer <token>``, compared in constant time; others get UNAUTHENTICATED.
  Health stays open so load balancers and ``grpc_health_probe`` need no secret; it reveals only
  SERVING/NOT_SERVING. A token needs TLS (it would otherwise cross the network in clear).

No setting at all is the plaintext server of the demo and the tests (loopback only).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from tandem.security import read_secret, read_secret_file

OPEN_PREFIX = "/grpc.health.v1.Health/"  # methods that need no token


@dataclass(frozen=True)
class Access:
    """The server's transport credentials (None: plaintext) and bearer token (None: no check)."""

    credentials: grpc.ServerCredentials | None = None
    token: str | None = None

    @classmethod
    def from_settings(cls, cert: str | None, key: str | None, client_ca: str | None = None,
                      env: Mapping[str, str] | None = None) -> Access:
        """Access from certificate/key/CA file paths and the token in ``env``."""
        token = read_secret("TANDEM_GRPC_TOKEN", os.environ if env is None else env)
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not cert:
            if client_ca or token:
                raise ValueError("mutual TLS and a bearer token need TLS: set --tls-cert/--tls-key")
            return cls()
        credentials = grpc.ssl_server_credentials(
            [(read_secret_file(key), Path(cert).read_bytes())],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None,
            require_client_auth=bool(client_ca))
        return cls(credentials, token)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The token check, when a token is configured."""
        return [TokenCheck(self.token)] if self.token else []


class TokenCheck(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every call without ``authorization: Bearer <token>`` (health exempt).

    The refusal is a handler of the same streaming kind as the method's own, so unary and
    streaming RPCs (reflection) are refused alike, before any request is read.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIX):
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return handler
                break
        return _refusal(handler)


def _deny(_request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


_FACTORIES = {(False, False): grpc.unary_unary_rpc_method_handler,
              (False, True): grpc.unary_stream_rpc_method_handler,
              (True, False): grpc.stream_unary_rpc_method_handler,
              (True, True): grpc.stream_stream_rpc_method_handler}


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(_deny, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
