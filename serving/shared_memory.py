"""The bundle's big read-only arrays memory-mapped, so ``--processes N`` holds one copy.

Server processes are separate interpreters (``serving.server --processes``), not forks, so
nothing they load is shared unless it comes from the same file through the page cache: item
factors, user factors, item vectors and the FAISS indexes are mapped from the bundle's files
(``np.load(mmap_mode="r")``, ``faiss.IO_FLAG_MMAP``), and arrays the engine derives from them
(the unit ALS rows the ranker's similarity features use, the catalog's id lookups, the item
feature table, the co-occurrence matrix) are written once to files keyed by their sources and
mapped too. With the 1M-item benchmark bundle that is ~1.3 GB of bundle files plus ~0.4 GB of
derived arrays per extra process that RSS still counts but USS (memory unique to the process)
does not; and the second process never builds them (it waits for the first, then maps).

A mapped array is read-only: writing to one raises, which is what an engine snapshot wants.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tandem.models.ann import AnnIndex

DERIVED_DIR = Path.home() / ".cache" / "tandem" / "derived"


def load_array(path: Path) -> np.ndarray:
    """``.npy`` at ``path``, mapped read-only: a plain ndarray over the mapping (``np.memmap``
    runs Python hooks on every indexing and operation, and these arrays are on the hot path)."""
    return np.load(path, mmap_mode="r").view(np.ndarray)


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a file mapping (what :func:`load_array` returns)."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base is not None


def load_index(path: Path) -> AnnIndex:
    """The FAISS index at ``path`` with its vectors mapped from the file."""
    return AnnIndex.load(path, mmap=True)


def key_of(*parts: object) -> str:
    """A short key over ``parts`` (strings, numbers, or ``Path``s of existing files, keyed by
    their identity: device, inode, size, mtime). Hard links of one file (a bundle linked into
    each server process's cache folder, ``serving.bundle_sync.fetch_once``) give one key, so
    the arrays derived from it are one file too."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            st = part.stat()
            part = f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        h.update(f"{part}\0".encode())
    return h.hexdigest()[:24]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing), held across processes; the
    kernel drops it if the holder dies, so a crash never leaves a stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def derived_arrays(key: str, names: Sequence[str],
                   compute: Callable[[], Mapping[str, np.ndarray]],
                   folder: Path | None = None) -> dict[str, np.ndarray]:
    """Arrays ``names`` of ``compute()``, computed by the first process that needs them, kept
    in ``folder`` as ``<key>-<name>.npy`` and mapped read-only.

    Processes starting together take a lock per key: one computes, the others wait and map
    its files (a second process never pays the computation's memory peak). Each file is
    written privately and hard-linked into place, so a reader never sees half a file and every
    process maps the same inode (a rename would leave the first one mapping a file the second
    replaced).
    """
    folder = Path(folder or DERIVED_DIR)
    targets = {name: folder / f"{key}-{name}.npy" for name in names}
    try:
        return _written_and_mapped(targets, folder / f".{key}.lock", compute)
    except FileNotFoundError:  # removed (remove_derived) between the check and the map
        return _written_and_mapped(targets, folder / f".{key}.lock", compute)


def _written_and_mapped(targets: Mapping[str, Path], lock: Path,
                        compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    def write() -> None:
        arrays = compute()
        for name, target in targets.items():
            _publish(np.ascontiguousarray(arrays[name]), target)

    _write_once(list(targets.values()), lock, write)
    return {name: load_array(target) for name, target in targets.items()}


def _write_once(targets: Sequence[Path], lock: Path, write: Callable[[], None]) -> None:
    """``write()`` the ``targets`` unless they exist, by one process: the others wait on the
    lock and find them written."""
    if not all(t.exists() for t in targets):
        with file_lock(lock):
            if not all(t.exists() for t in targets):  # not written while we waited
                write()


def remove_derived(key: str, names: Sequence[str], folder: Path | None = None) -> None:
    """Delete the files of ``derived_arrays(key, names)`` (under the key's lock). Processes
    mapping them keep their pages: an unlinked file lives as long as it is mapped."""
    folder = Path(folder or DERIVED_DIR)
    with file_lock(folder / f".{key}.lock"):  # the lock file stays: a holder may wait on it
        for name in names:
            (folder / f"{key}-{name}.npy").unlink(missing_ok=True)


def derived_array(source: Path, name: str, compute: Callable[[np.ndarray], np.ndarray],
                  folder: Path | None = None) -> np.ndarray:
    """``compute(load_array(source))`` written once under a key of the source file and mapped
    read-only (see :func:`derived_arrays`)."""
    source = Path(source).resolve()
    return derived_arrays(key_of(source), [name],
                          lambda: {name: compute(load_array(source))}, folder)[name]


def derived_index(key: str, build: Callable[[], AnnIndex],
                  folder: Path | None = None) -> AnnIndex:
    """``build()`` saved once as ``<key>-index.faiss`` in ``folder`` (under the key's lock, as
    :func:`derived_arrays`) and mapped: e.g. the bundle's index with the hourly new items
    added, which each process would otherwise hold as a private copy."""
    folder = Path(folder or DERIVED_DIR)
    target = folder / f"{key}-index.faiss"

    def write() -> None:
        staging = folder / f".{key}-{uuid.uuid4().hex}"
        try:
            built = build().save(staging / "index.faiss")
            os.replace(f"{built}.json", f"{target}.json")  # read at load, not mapped
            os.link(built, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    _write_once([target], folder / f".{key}-index.lock", write)
    return load_index(target)


def _publish(array: np.ndarray, target: Path) -> None:
    """``array`` saved as ``target`` in one step (a private file hard-linked into place)."""
    tmp = target.with_name(f".{target.stem}-{uuid.uuid4().hex}.npy")
    np.save(tmp, array)
    try:
        os.link(tmp, target)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
