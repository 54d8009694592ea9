"""An offline dataset by folder: MovieLens (either format) or a synthetic world's spec.

``make eval DATA=<folder>`` evaluates whatever :func:`load_dataset` finds there. A folder holding
``world_config.json`` (the fields of :class:`tandem.data.world_config.WorldConfig`, written by
``python -m tandem.cli world --spec DIR``) is a synthetic world, generated in memory from its
seed: the same protocol then runs where the truth is known and nothing is tuned to one public
split (issue 14's check of the ml-100k gains). Any other folder must hold MovieLens files.

Memory: a world is generated whole (:meth:`tandem.data.world.World.to_dataset`), ~200 bytes per
event in pandas: keep offline evaluation worlds to a few million events.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tandem.data.dataset import Dataset
from tandem.data.movielens import load_movielens

WORLD_SPEC = "world_config.json"


def load_dataset(folder: Path) -> Dataset:
    """The dataset ``folder`` holds: a synthetic world when it has :data:`WORLD_SPEC`, else
    MovieLens (:func:`tandem.data.movielens.load_movielens`, which names what is missing)."""
    spec = Path(folder) / WORLD_SPEC
    if spec.exists():
        from tandem.data.world import World

        return World.generate(read_world_spec(spec)).to_dataset()
    return load_movielens(Path(folder))


def read_world_spec(path: Path):
    """The :class:`~tandem.data.world_config.WorldConfig` of a spec file; a ValueError names
    fields the config does not have (a typo would otherwise silently keep a default)."""
    from tandem.data.world_config import WorldConfig

    fields = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(WorldConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown world fields {unknown}; known: {sorted(known)}")
    return WorldConfig(**fields)


def write_world_spec(folder: Path, cfg) -> Path:
    """Write ``cfg`` (a WorldConfig) as ``folder/world_config.json``; returns the path."""
    path = Path(folder) / WORLD_SPEC
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    return path
