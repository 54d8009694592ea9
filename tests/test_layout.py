"""The import rules of the layout (../shared/notes/style.md) hold for every module."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"tandem", "jobs", "serving", "dags", "bench", "tests", "feature_repo"}
# package -> first-party modules it must never import (prefix match on dotted names)
FORBIDDEN = {
    "tandem": ("jobs", "serving", "dags", "bench", "tests"),
    "jobs": ("serving", "dags"),
    "serving": ("jobs", "dags", "tandem.spark", "pyspark"),
    "feature_repo": ("jobs", "serving", "dags", "tandem.spark", "pyspark"),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rules(package):
    bad = []
    for path in _modules(package):
        rel = path.relative_to(REPO)
        for name in _imports(path):
            for forbidden in FORBIDDEN[package]:
                if package == "tandem" and rel.parts[:2] == ("tandem", "spark"):
                    continue
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_jobs_never_import_each_other():
    bad = []
    for path in _modules("jobs"):
        for name in _imports(path):
            if name.startswith("jobs.") or name == "jobs":
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_dags_import_jobs_only_inside_tasks():
    """DAG files are configuration: top-level imports are tandem.config and airflow only."""
    for path in _modules("dags"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (mod or "").startswith(("jobs", "pyspark", "torch")), (
                    f"{path.name} imports {mod} at top level")
