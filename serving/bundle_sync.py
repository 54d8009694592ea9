"""What serving remembers about bundles between polls and restarts: the last good one per alias
and the version that failed, with why.

``ledger.json`` in the bundle cache folder (``Paths.bundle_cache``, under TANDEM_HOME) holds::

    {"good": {alias: {"version", "path", "digest"}},   # passed warm-up, served; kept on disk
     "bad":  {alias: {"version", "reason"}}}            # refused; not fetched again

A serving process that starts while the registry is down serves the alias's last good bundle
(its digest checked again) and syncs to the registry's version once it answers. A refused
version is skipped by every poll (and after a restart) until the alias points elsewhere, so a
broken bundle is downloaded once, not every poll. Downloaded versions that are neither good nor
being loaded are deleted after each good load (the cache holds a few bundles, not all).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER = "ledger.json"


class BundleRejected(Exception):
    """A registry version that must not be served (and is not fetched again): no or wrong
    digest, a part that fails to load, or a warm-up with part fallbacks."""

    def __init__(self, version: str, reason: str):
        super().__init__(f"version {version}: {reason}")
        self.version, self.reason = str(version), reason


class BundleLedger:
    """Last good and refused versions per alias, persisted in ``cache_dir/ledger.json``
    (``cache_dir`` None: in memory only, e.g. a fixed local bundle)."""

    def __init__(self, cache_dir: Path | None):
        self.path = None if cache_dir is None else Path(cache_dir) / LEDGER
        self._lock = threading.Lock()
        self.good: dict[str, dict] = {}
        self.bad: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.good, self.bad = dict(data.get("good", {})), dict(data.get("bad", {}))
            except (OSError, ValueError):
                log.exception("unreadable %s: starting with an empty ledger", self.path)

    def is_bad(self, alias: str, version: str) -> str | None:
        """Why ``version`` was refused for ``alias``, or None."""
        entry = self.bad.get(alias)
        return entry["reason"] if entry is not None and entry["version"] == str(version) else None

    def mark_bad(self, alias: str, version: str, reason: str) -> None:
        with self._lock:
            self.bad[alias] = {"version": str(version), "reason": reason}
            self._save()

    def mark_good(self, alias: str, version: str, bundle_dir: Path) -> None:
        """``version`` of ``alias`` passed warm-up and serves now; older downloads go."""
        from tandem.registry import bundle_digest

        digest = bundle_digest(bundle_dir)
        with self._lock:
            self.good[alias] = {"version": str(version), "path": str(Path(bundle_dir).resolve()),
                                "digest": digest}
            if self.bad.get(alias, {}).get("version") != str(version):
                self.bad.pop(alias, None)  # the alias moved on: its refused version is history
            self._save()
            self._prune()

    def last_good(self, alias: str) -> tuple[Path, str] | None:
        """(bundle dir, version) last served for ``alias`` if still intact (digest checked)."""
        from tandem.registry import bundle_digest

        entry = self.good.get(alias)
        if entry is None or not Path(entry["path"]).is_dir():
            return None
        if bundle_digest(Path(entry["path"])) != entry["digest"]:
            log.error("last good bundle of %s (v%s) at %s changed on disk: not served", alias,
                      entry["version"], entry["path"])
            return None
        return Path(entry["path"]), entry["version"]

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"good": self.good, "bad": self.bad}, indent=2,
                                  sort_keys=True))
        os.replace(tmp, self.path)  # a crash never leaves half a ledger

    def _prune(self) -> None:
        """Delete ``v<N>`` download folders that no alias serves (``download_bundle`` layout)."""
        if self.path is None:
            return
        keep = {Path(e["path"]).resolve() for e in self.good.values()}
        for folder in self.path.parent.resolve().glob("v*"):
            if folder.is_dir() and not any(folder in p.parents or folder == p for p in keep):
                shutil.rmtree(folder, ignore_errors=True)
