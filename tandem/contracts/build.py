"""Generate ``tandem/contracts/*_pb2*.py`` from ``schemas/*.proto`` (what ``make proto`` runs).

Generated files are git-ignored: the .proto files are the source of truth. Regeneration is
skipped when every output is newer than its .proto.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
OUT = Path(__file__).resolve().parent


def build(force: bool = False) -> list[Path]:
    """Compile every ``schemas/*.proto`` into this package; return the protos compiled."""
    from grpc_tools import protoc

    compiled = []
    for proto in sorted(SCHEMAS.glob("*.proto")):
        # protoc turns dots in a file name into packages (recommender.v1.proto ->
        # recommender/v1_pb2.py); compile a flat-named copy instead (recommender_v1_pb2.py).
        stem = proto.stem.replace(".", "_")
        target = OUT / f"{stem}_pb2.py"
        if not force and target.exists() and target.stat().st_mtime >= proto.stat().st_mtime:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            flat = Path(tmp) / f"{stem}.proto"
            shutil.copyfile(proto, flat)
            args = [
                "protoc",
                f"-I{tmp}",
                f"--python_out={OUT}",
                f"--pyi_out={OUT}",
                f"--grpc_python_out={OUT}",
                str(flat),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed for {proto}")
        _fix_imports(OUT / f"{stem}_pb2_grpc.py", stem)
        compiled.append(proto)
    return compiled


def _fix_imports(grpc_file: Path, stem: str) -> None:
    """protoc emits ``import x_pb2``; make it package-relative so ``tandem.contracts`` imports."""
    if grpc_file.exists():
        text = grpc_file.read_text()
        grpc_file.write_text(text.replace(f"import {stem}_pb2", f"from . import {stem}_pb2"))


if __name__ == "__main__":
    done = build(force="--force" in sys.argv)
    print(f"proto: compiled {len(done)} file(s)" if done else "proto: up to date")
