"""Secrets and client security settings, read from the environment only.

A secret (a token, a password, a private key) comes from an environment variable ``NAME`` or
from the file named by ``NAME_FILE``; such a file must be readable by its owner only (mode 0600
or stricter), and a group- or world-readable one is refused with :class:`InsecureSecretFile`
rather than used. Secrets are never written into repo files, command lines or logs: error
messages name the variable or the file, never the value.

:func:`kafka_client_kwargs` is the one place kafka-python clients (producer, consumer, admin)
get their SASL/SSL settings from, so every client of a deployment speaks the same protocol.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path


class InsecureSecretFile(PermissionError):
    """A secret file that someone besides its owner can read (or a missing one)."""


def read_secret_file(path: str | Path) -> bytes:
    """The bytes of a secret file, refused unless only its owner can read it.

    Checked on the open file (``fstat``), so a file swapped between check and read is the one
    checked.
    """
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureSecretFile(
                f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {path}")
        return f.read()


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Secret ``name`` from ``$name`` or the 0600 file ``$name_FILE`` (None when neither is set).

    Setting both is ambiguous and refused. Trailing newlines of a file are dropped
    (``echo token > file`` is how most people write one).
    """
    env = os.environ if env is None else env
    value, file = env.get(name), env.get(f"{name}_FILE")
    if value and file:
        raise ValueError(f"set {name} or {name}_FILE, not both")
    if file:
        return read_secret_file(file).decode().rstrip("\r\n")
    return value or None


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# environment variable -> kafka-python keyword (files: kafka-python opens them itself)
_KAFKA_SSL_FILES = {"TANDEM_KAFKA_SSL_CAFILE": "ssl_cafile",
                    "TANDEM_KAFKA_SSL_CERTFILE": "ssl_certfile",
                    "TANDEM_KAFKA_SSL_KEYFILE": "ssl_keyfile"}


def kafka_client_kwargs(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Keyword arguments for every kafka-python client (KafkaProducer/Consumer/AdminClient).

    ``TANDEM_KAFKA_SECURITY_PROTOCOL`` (default PLAINTEXT: ``{}``, the embedded tansu broker);
    SASL_* needs ``TANDEM_KAFKA_SASL_MECHANISM`` (PLAIN or SCRAM-SHA-256/512),
    ``TANDEM_KAFKA_SASL_USERNAME`` and the secret ``TANDEM_KAFKA_SASL_PASSWORD`` (or
    ``..._FILE``, mode 0600); SSL/SASL_SSL take ``TANDEM_KAFKA_SSL_CAFILE`` (the broker's CA;
    the system CAs otherwise) and, for client certificates, ``TANDEM_KAFKA_SSL_CERTFILE`` +
    ``TANDEM_KAFKA_SSL_KEYFILE`` (the key file must be 0600). Incomplete settings raise
    ``ValueError`` here, at start-up, not as a broker error later; a broker that cannot speak
    the protocol fails the client's connection (kafka-python never falls back to plaintext).
    """
    env = os.environ if env is None else env
    protocol = env.get("TANDEM_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol not in KAFKA_PROTOCOLS:
        raise ValueError(f"TANDEM_KAFKA_SECURITY_PROTOCOL={protocol!r}: one of {KAFKA_PROTOCOLS}")
    if protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, object] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        mechanism = env.get("TANDEM_KAFKA_SASL_MECHANISM", "").upper()
        if mechanism not in KAFKA_SASL_MECHANISMS:
            raise ValueError(f"{protocol} needs TANDEM_KAFKA_SASL_MECHANISM in "
                             f"{KAFKA_SASL_MECHANISMS}, not {mechanism!r}")
        username = env.get("TANDEM_KAFKA_SASL_USERNAME")
        password = read_secret("TANDEM_KAFKA_SASL_PASSWORD", env)
        if not username or not password:
            raise ValueError(f"{protocol} needs TANDEM_KAFKA_SASL_USERNAME and "
                             "TANDEM_KAFKA_SASL_PASSWORD (or TANDEM_KAFKA_SASL_PASSWORD_FILE)")
        kwargs.update(sasl_mechanism=mechanism, sasl_plain_username=username,
                      sasl_plain_password=password)
    if protocol.endswith("SSL"):
        files = {kw: env[var] for var, kw in _KAFKA_SSL_FILES.items() if env.get(var)}
        if ("ssl_certfile" in files) != ("ssl_keyfile" in files):
            raise ValueError("TANDEM_KAFKA_SSL_CERTFILE and TANDEM_KAFKA_SSL_KEYFILE go together")
        if "ssl_keyfile" in files:
            read_secret_file(files["ssl_keyfile"])  # refuse a readable key before connecting
        kwargs.update(files)
    return kwargs
