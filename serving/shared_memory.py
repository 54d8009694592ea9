"""The bundle's big read-only arrays memory-mapped, so ``--processes N`` holds one copy.

Server processes are separate interpreters (``serving.server --processes``), not forks, so
nothing they load is shared unless it comes from the same file through the page cache: item
factors, user factors, item vectors and the FAISS indexes are mapped from the bundle's files
(``np.load(mmap_mode="r")``, ``faiss.IO_FLAG_MMAP``), and arrays the engine derives from them
(the unit ALS rows the ranker's similarity features use) are written once to a file keyed by
the source file and mapped too. With the 1M-item benchmark bundle that is ~1.3 GB per extra
process that RSS still counts but USS (memory unique to the process) does not.

A mapped array is read-only: writing to one raises, which is what an engine snapshot wants.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tandem.ann import AnnIndex

DERIVED_DIR = Path.home() / ".cache" / "tandem" / "derived"


def load_array(path: Path) -> np.ndarray:
    """``.npy`` at ``path``, mapped read-only."""
    return np.load(path, mmap_mode="r")


def load_index(path: Path) -> AnnIndex:
    """The FAISS index at ``path`` with its vectors mapped from the file."""
    return AnnIndex.load(path, mmap=True)


def derived_array(source: Path, name: str, compute: Callable[[np.ndarray], np.ndarray],
                  folder: Path | None = None) -> np.ndarray:
    """``compute(load_array(source))``, computed by the first process that needs it, written
    to ``folder`` under a key of the source file (path, size, mtime) and mapped read-only.

    Two processes starting together may both compute it; each writes a private file and
    hard-links it into place, and the loser maps the winner's file, so every process maps the
    same inode (a rename would leave the first one mapping a file the second replaced).
    """
    source = Path(source).resolve()
    st = source.stat()
    key = hashlib.sha256(f"{source}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = Path(folder or DERIVED_DIR)
    target = folder / f"{key}-{name}.npy"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}-{name}-{uuid.uuid4().hex}.npy"
        np.save(tmp, np.ascontiguousarray(compute(load_array(source))))
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return load_array(target)
