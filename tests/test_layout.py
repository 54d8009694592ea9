"""The layout's rules (README "Layout") hold for every module: who may import whom, no import
cycles, and no file over ``MAX_LINES`` in ``tandem/``, ``serving/`` or ``jobs/``."""

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
# The stages of ``tandem``: the top-level modules (``FOUNDATION``) and each subpackage, with the
# groups it may import besides its own (the README's table). Every group may import FOUNDATION.
FOUNDATION = "foundation"
MAY_IMPORT = {
    FOUNDATION: set(),
    "contracts": set(),
    "data": set(),
    "features": {"data"},
    "models": {"data", "features"},
    "policy": set(),
    "evaluation": {"data", "features", "models", "policy"},
    "ops": {"models"},
    "streaming": {"data", "features"},
    "experiments": {"contracts", "data", "models", "ops", "policy", "streaming"},
    "spark": {"ops"},
    "cli": {"contracts", "data", "evaluation", "experiments", "features", "models", "ops",
            "policy", "streaming"},
}
MAX_LINES = 500
CAPPED = ("tandem", "serving", "jobs")


def _imports(path: Path) -> list[str]:
    """Every absolute import in the file, at top level or inside a function."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            # ``from tandem.models import als``: the imported name may itself be a module
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(module: str) -> str | None:
    """The stage of a ``tandem`` module (``tandem.models.als`` -> ``models``), None outside."""
    parts = module.split(".")
    if parts[0] != "tandem" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in MAY_IMPORT else FOUNDATION


def stage_violations(module: str, imported: list[str]) -> list[str]:
    """The imports of ``module`` that its stage may not make."""
    own = _group(module)
    if own is None:
        return []
    bad = []
    for name in imported:
        other = _group(name)
        if other is None or other in (own, FOUNDATION):
            continue
        if other not in MAY_IMPORT[own]:
            bad.append(f"{module} ({own}) imports {name} ({other})")
    return bad


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


def test_every_tandem_subpackage_has_a_row_in_the_table():
    subpackages = {p.parent.name for p in (REPO / "tandem").glob("*/__init__.py")}
    assert subpackages == set(MAY_IMPORT) - {FOUNDATION}


def test_the_readme_layout_section_matches_the_tree_and_the_table():
    """Every subpackage has a row in the README's folder table, and the README's may-import
    table says what ``MAY_IMPORT`` says (``tandem.cli`` may import every stage but spark)."""
    import re

    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]
    for name in set(MAY_IMPORT) - {FOUNDATION}:
        assert f"| `tandem/{name}/` |" in layout, f"no README row for tandem/{name}/"
    rows = dict(re.findall(r"^\| `tandem\.(\w+)` \| (.*) \|$", layout, re.M))
    assert set(rows) == set(MAY_IMPORT) - {FOUNDATION, "contracts"}
    for name, allowed in rows.items():
        if name != "cli":
            assert set(re.findall(r"`(\w+)`", allowed)) == MAY_IMPORT[name], name


def test_each_stage_imports_only_what_the_table_allows():
    bad = []
    for path in _modules("tandem"):
        bad += stage_violations(_module_name(path), _imports(path))
    assert not bad, "\n".join(bad)


def test_the_stage_rules_catch_a_forbidden_import():
    """The check above can fail: a policy importing a model, or data importing a feature, is
    reported; the same imports from a stage that may make them are not."""
    assert stage_violations("tandem.policy.retrieval", ["tandem.models.als"])
    assert stage_violations("tandem.data.lake", ["tandem.features.entity", "tandem.config"]) == [
        "tandem.data.lake (data) imports tandem.features.entity (features)"]
    assert stage_violations("tandem.config", ["tandem.data.dataset"])
    assert not stage_violations("tandem.evaluation.offline",
                                ["tandem.models.als", "tandem.schema", "numpy"])


def test_no_import_cycles():
    """No first-party module imports itself through others (function-level imports count)."""
    graph = {}
    for package in ("tandem", "serving", "jobs"):
        for path in _modules(package):
            graph[_module_name(path)] = set()
    for package in ("tandem", "serving", "jobs"):
        for path in _modules(package):
            name = _module_name(path)
            graph[name] = {m for m in _imports(path) if m in graph and m != name}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_file_over_the_line_cap():
    long = [f"{p.relative_to(REPO)}: {n} lines"
            for package in CAPPED for p in _modules(package)
            if "_pb2" not in p.name and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)


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
