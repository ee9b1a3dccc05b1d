"""The layout of docs/ARCHITECTURE.md, checked on the source: imports run downward
(stages -> orchestration -> dmp_core), dmp_core has no import cycle, the objectives never
reach up into training, stage modules stay thin, and each DVC stage that runs library code
depends on every module of it that decides its outputs.

Imports are read statically (``ast``), lazy ones inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dmp_core", "orchestration", "stages")
# modules a stage runs that do not decide its outputs (errors, atomic writes, MLflow bookkeeping)
BOOKKEEPING = {"dmp_core/__init__.py", "dmp_core/errors.py", "dmp_core/io.py", "dmp_core/tracking.py"}


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports(path: Path) -> set[Path]:
    """Project modules that ``path`` imports (``from a.b import c`` counts a.b and a.b.c when c is a module)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and (found := _module_file(name)) is not None:
                out.add(found)
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _graph(package: str) -> dict[str, set[str]]:
    return {_rel(f): {_rel(g) for g in _imports(f)} for f in sorted((ROOT / package).rglob("*.py"))}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [_rel(g) for g in _imports(ROOT / current)]
        parts = Path(current).parts
        todo += [f"{Path(*parts[:i]).as_posix()}/__init__.py" for i in range(1, len(parts) - 1)
                 if (ROOT / Path(*parts[:i]) / "__init__.py").is_file()]
    return seen


def test_imports_run_downward_only() -> None:
    for name, targets in _graph("dmp_core").items():
        up = sorted(t for t in targets if not t.startswith("dmp_core/"))
        assert not up, f"{name} imports {up}"
        text = (ROOT / name).read_text()
        for banned in ("import typer", "import dvc", "from dvc", "import ray"):
            assert banned not in text, f"{name}: {banned}"
    for name, targets in _graph("orchestration").items():
        assert not any(t.startswith("stages/") for t in targets), name


def test_no_objective_reaches_up_into_training() -> None:
    for name, targets in _graph("dmp_core").items():
        if name.startswith("dmp_core/losses/"):
            assert not any(t.startswith("dmp_core/training/") for t in targets), (name, targets)


def test_dmp_core_has_no_import_cycle() -> None:
    graph = _graph("dmp_core")
    # a package __init__ that re-exports its own modules is not a cycle with them
    edges = {n: {t for t in ts if not (n.endswith("__init__.py") and t.startswith(n.rsplit("/", 1)[0] + "/"))}
             for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.endswith("__init__.py") and node.startswith(nxt.rsplit("/", 1)[0] + "/"):
                continue  # a module importing its own package's __init__ (a sibling re-export)
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_stage_modules_are_thin() -> None:
    for path in sorted((ROOT / "stages").glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines < 100, f"{_rel(path)} has {lines} lines"


@pytest.mark.parametrize("stage", ["targets", "pretrain", "finetune", "evaluate"])
def test_each_stage_depends_on_the_library_code_it_runs(stage: str) -> None:
    """Every dmp_core module the stage's command imports (transitively) lies under one of its
    DVC deps, so a change to any of them shows in ``dvc status``."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = _closure(f"stages/{stage}.py")
    library = sorted(m for m in code if m.startswith("dmp_core/") and m not in BOOKKEEPING)
    uncovered = [m for m in library if not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not uncovered, f"dvc.yaml stage {stage} lacks deps for {uncovered}"
    assert f"stages/{stage}.py" in deps and "dmp_core/config.py" in deps
