"""A throwaway redis-server on a loopback port (the serving benchmark's online store, tests).

redis-server is the Debian package (``make system-deps`` installs it). Persistence is off: the
benchmark loads its rows each run and reports how long that took. Hashes whose values are up to
``listpack_value`` bytes stay in Redis's compact listpack encoding: a Feast user row holds the
genre affinity (19 floats, ~80 bytes as a Feast value), which with Redis's default (64) turns the
whole hash into a hashtable and roughly doubles the memory per user.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


class RedisServer:
    """``with RedisServer(folder, port) as r:`` -> ``r.url`` ("127.0.0.1:port") while it runs."""

    def __init__(self, folder: Path, port: int, listpack_value: int = 128,
                 extra: tuple[str, ...] = ()):
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (make system-deps installs "
                                    "the Debian package redis-server)")
        self.port, self.url = port, f"127.0.0.1:{port}"
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, *extra, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(folder),
             "--hash-max-listpack-value", str(listpack_value)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)

    def used_memory_mb(self) -> float:
        """Redis's ``used_memory`` (what its data takes, allocator overhead included)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return round(client.info("memory")["used_memory"] / 2**20, 1)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
