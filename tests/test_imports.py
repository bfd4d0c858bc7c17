"""The package's import graph has no circle (imports inside functions count; `if TYPE_CHECKING:` ones do not)."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST, modules: set[str], package: str) -> set[str]:
    """The regmean modules a module imports when it runs."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot beyond the first
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def test_no_import_circles():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = runtime_imports(ast.parse(path.read_text()), modules, package) - {name}
    assert len(graph) > 30 and graph["regmean.merge.engine"] >= {"regmean.methods", "regmean.merge.plan"}

    circles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_library_stands_without_the_harness():
    """No module of the library names the benchmark harness, and every one imports with the harness and the
    harness's own dependencies (matplotlib, seqeval) unavailable: `pip install regmean` needs neither."""
    import subprocess
    import sys

    import tomllib

    names = sorted(module_name(p) for p in SRC.rglob("*.py") if p.name != "__main__.py")  # (that one runs the CLI)
    for path in SRC.rglob("*.py"):
        assert "regmean_bench" not in path.read_text(), f"{path} names the benchmark harness"
    blocked = ["regmean_bench", "matplotlib", "seqeval"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # an import of these fails\n"
        f"import importlib\nfor module in {names!r}: importlib.import_module(module)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    declared = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in declared if d.split(">")[0].split("=")[0] in ("matplotlib", "seqeval")], declared


def test_a_statistic_is_one_module_and_its_registry_line():
    """Fisher, the example: its file reader and its measuring command live in one module; every statistic a method
    reads is registered, and the command line offers each registered statistic's command."""
    import inspect

    from typer.main import get_command

    from regmean.cli import app
    from regmean.measure import STATISTICS
    from regmean.methods import METHODS

    fisher = STATISTICS["fisher"]
    module = inspect.getmodule(fisher.reader)
    assert inspect.getmodule(fisher.load_command()) is module and module.FISHER is fisher
    read = {method.statistics for method in METHODS.values() if method.statistics is not None}
    assert read == set(STATISTICS.values()) and len(read) == 2
    assert set(STATISTICS) <= set(get_command(app).commands)
