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

With ``--processes N`` each process keeps its own folder and ledger (``process-<i>``), but a
version is downloaded once, into the ``shared`` folder next to them, by the first process that
asks (the others wait on a file lock), and hard-linked into each process's folder
(:func:`fetch_once`): every process maps the same files, so the page cache holds one copy. The
next download deletes shared ones no process folder links to any more (link count 1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from serving.shared_memory import file_lock

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
SHARED_DOWNLOADS = "shared"  # the folder of fetch_once's downloads, next to process-<i>


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
        from tandem.ops.registry import bundle_digest

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
        from tandem.ops.registry import bundle_digest

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
        tmp = self.path.with_suffix(f".{uuid.uuid4().hex}.tmp")
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


def fetch_once(version: str, shared: Path, own: Path, download: Callable[[Path], Path]) -> Path:
    """The bundle of ``version`` in ``own``, hard-linked from its one download in ``shared``.

    ``download(dest)`` (``tandem.ops.registry.download_bundle``: digest checked) runs only when
    ``shared`` has no complete download of the version; under the lock, so processes asking
    together download once and the rest wait for it. The links give every process its own
    folder (its ledger prunes it as before) over the same inodes, so mapped arrays and the
    keys of derived ones (``serving.shared_memory.key_of``) are shared. Shared downloads no
    process links to any more are deleted here.
    """
    shared, own = Path(shared), Path(own)
    with file_lock(shared / ".lock"):
        record = shared / f"v{version}.json"  # written once the download passed its digest
        source = shared / json.loads(record.read_text())["path"] if record.exists() else None
        if source is None or not source.is_dir():
            source = Path(download(shared))
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"path": source.relative_to(shared).as_posix()}))
            os.replace(tmp, record)
        top = source.relative_to(shared).parts[0]  # v<version>
        staging = own / f".{top}-{uuid.uuid4().hex}"
        for path in sorted((shared / top).rglob("*")):
            if path.is_file():
                link = staging / path.relative_to(shared / top)
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, link)
        shutil.rmtree(own / top, ignore_errors=True)
        os.replace(staging, own / top)
        _prune_shared(shared, keep=shared / top)
    return own / source.relative_to(shared)


def _prune_shared(shared: Path, keep: Path) -> None:
    """Delete shared downloads (and their records) no process folder links to any more."""
    for folder in shared.glob("v*"):
        if folder.is_dir() and folder != keep and all(
                p.stat().st_nlink == 1 for p in folder.rglob("*") if p.is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            (shared / f"{folder.name}.json").unlink(missing_ok=True)
