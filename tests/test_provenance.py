"""Provenance and the package's shape: the workflow's commit only from its own repository; no stage imports
another, and no import circle anywhere in the package."""

import ast
import shutil
import subprocess

from conftest import ROOT

from virnucpro_core import __version__
from virnucpro_core.stages.merge import workflow_commit

PKG = ROOT / "src" / "virnucpro_core"


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True)


def test_workflow_commit_comes_only_from_the_workflows_own_repository(tmp_path):
    own = tmp_path / "virnucpro"
    own.mkdir()
    (own / "Snakefile").write_text("# the workflow\n")
    _git(own, "init", "-q")
    _git(own, "add", "Snakefile")
    _git(own, "commit", "-q", "-m", "workflow")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=own, capture_output=True, text=True).stdout.strip()
    assert workflow_commit(own) == head

    analysis = tmp_path / "analysis"  # a user's repository with a copy of the workflow inside
    analysis.mkdir()
    _git(analysis, "init", "-q")
    (analysis / "notes.md").write_text("my analysis\n")
    _git(analysis, "add", "notes.md")
    _git(analysis, "commit", "-q", "-m", "analysis")
    shutil.copytree(own, analysis / "workflow-copy", ignore=shutil.ignore_patterns(".git"))
    recorded = workflow_commit(analysis / "workflow-copy")
    assert recorded == f"virnucpro_core {__version__} (not its own git checkout)"
    analysis_head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=analysis, capture_output=True, text=True).stdout.strip()
    assert analysis_head not in recorded

    assert workflow_commit(tmp_path / "nowhere") == recorded  # no git at all


def _imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (anywhere in its body)."""
    graph = {}
    for path in PKG.rglob("*.py"):
        dotted = path.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".")
        name = dotted.removesuffix(".__init__")
        package = name if dotted.endswith(".__init__") else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("virnucpro_core"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                deps.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() else target)
        graph[name] = deps - {name, "virnucpro_core"}
    return graph


def test_no_stage_imports_another_and_there_is_no_import_circle():
    graph = _imports()
    assert "virnucpro_core.stages.embed" in graph and "virnucpro_core.engine.sample_check" in graph["virnucpro_core.stages.embed"]
    stage = "virnucpro_core.stages."
    assert [(m, d) for m, ds in graph.items() if m.startswith(stage) for d in ds if d.startswith(stage)] == []
    state, circles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                circles.append(stack[stack.index(d):] + [d])
            elif d in graph and d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert circles == []
