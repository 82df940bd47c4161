"""The package layout holds: imports point down the pipeline, production code never needs the dev
tooling or the demo, and no module-level import cycle exists. Pure: reads the sources with
``ast``, imports nothing of ours, needs no services.

Layers, lowest first (a module may import its own layer and those below it):
core (errors, settings, durations, events, signing, secrets, aio, targets, text, version,
bundled) <- ops <-
store (and outbox, the producer's half of the store) <- broker <- worker <- cli, demo, runner,
lifecycle, workers/ (the top);
``delivery.testing`` may import anything. Production = delivery/ except testing/ and demo/,
plus workers/. Nothing in delivery/ imports workers/, not even lazily: ``delivery run`` finds
the process through its entry point (``delivery.runner``).
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from delivery.ops import tracing
from delivery.worker.retry import Outcome

ROOT = Path(__file__).resolve().parents[2]
CORE = {
    "errors", "settings", "durations", "events", "signing", "secrets", "aio", "targets", "text",
    "version", "bundled",
}
RANKS = {"core": 0, "ops": 1, "store": 2, "broker": 3, "worker": 4, "top": 5}
# The CLI's `delivery demo` command imports the demo when it runs, never at start-up.
DEMO_ALLOWED = {("delivery.cli.commands", "cmd_demo")}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a submodule when ``from package import submodule``)
    function: str | None  # the enclosing function when the import runs only when it is called
    type_checking: bool  # under ``if TYPE_CHECKING:``: never executed
    line: int

    @property
    def module_level(self) -> bool:
        return self.function is None and not self.type_checking

    def __str__(self) -> str:
        where = f" in {self.function}()" if self.function else ""
        return f"{self.source}:{self.line}{where} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for top in ("delivery", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def visit(node: ast.AST, function: str | None, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name if function is None else function, type_checking)
            elif isinstance(child, ast.Lambda):
                visit(child, function or "<lambda>", type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), function, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), function, type_checking)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, function, type_checking, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = absolute(child)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in SOURCES else base
                    found.append(Import(module, target, function, type_checking, child.lineno))
            else:
                visit(child, function, type_checking)

    visit(tree, None, False)
    return found


IMPORTS = [imp for module, path in SOURCES.items() for imp in _imports_of(module, path)]


def _ours(target: str) -> bool:
    return target.partition(".")[0] in ("delivery", "workers")


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "workers":
        return "top"
    if len(parts) == 1:
        return "top"  # the package's public face re-exports from below
    if parts[1] in CORE:
        return "core"
    if parts[1] == "outbox":
        return "store"
    if parts[1] in ("ops", "store", "broker", "worker", "testing"):
        return parts[1]
    return "top"  # cli, demo, runner, __main__


def _production(module: str) -> bool:
    return _layer(module) != "testing" and not module.startswith("delivery.demo")


def _within(imp: Import, package: str) -> bool:
    return imp.target == package or imp.target.startswith(package + ".")


def test_the_walk_sees_the_whole_package_and_its_imports():
    # Guards the other tests against passing vacuously (a wrong root, a broken walker).
    assert len(SOURCES) > 40
    edges = {(i.source, i.target) for i in IMPORTS}
    assert ("delivery.worker.dispatch", "delivery.store.pool") in edges
    assert ("workers.process", "delivery.worker.deliverer") in edges
    assert ("delivery.cli.commands", "delivery.demo.run") in edges  # lazily, in cmd_demo
    assert ("delivery.cli.commands", "delivery.cli.operations") in edges


def test_no_production_module_imports_the_dev_tooling_or_the_demo():
    wrong = [
        str(i)
        for i in IMPORTS
        if _production(i.source)
        and (_within(i, "delivery.testing") or _within(i, "delivery.demo"))
        and not (
            _within(i, "delivery.demo")
            and i.function is not None
            and (i.source, i.function) in DEMO_ALLOWED
        )
    ]
    assert wrong == []


def test_delivery_never_imports_workers():
    # Lazy imports and imports under TYPE_CHECKING count too: workers/ is above the library.
    wrong = [str(i) for i in IMPORTS if i.source.startswith("delivery") and _within(i, "workers")]
    assert wrong == []


def test_delivery_never_names_a_workers_module_for_a_dynamic_import():
    # importlib.import_module("workers.process") would be the same dependency, hidden.
    named = re.compile(r"^workers(\.\w+)*(:\w+)?$")
    wrong = [
        f"{module}:{node.lineno} {node.value!r}"
        for module, path in SOURCES.items()
        if module.startswith("delivery")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and named.match(node.value)
    ]
    assert wrong == []


def test_no_test_module_imports_another_test_module_or_a_conftest():
    # Shared helpers live in delivery/testing (factories, waits, the receiver) or tests/support.
    wrong = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        module = _module_name(path)
        for imp in _imports_of(module, path):
            last = imp.target.rpartition(".")[2]
            if imp.target.startswith("tests") and (last.startswith("test_") or last == "conftest"):
                wrong.append(str(imp))
    assert wrong == []


def test_the_process_runner_is_registered_as_an_entry_point_that_exists():
    # What `delivery run` looks up (delivery.runner); checked in the sources, installed or not.
    from delivery import runner

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"][runner.GROUP][runner.NAME]
    module, _, function = target.partition(":")
    assert module in SOURCES, target
    tree = ast.parse(SOURCES[module].read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)}
    assert function in defined, target


def test_imports_point_down_the_pipeline():
    # Every import counts, lazy ones too: a lazy import upward is still a dependency upward.
    # The dev tooling is off the ladder (who may import it is the test above).
    wrong = [
        f"{i} ({_layer(i.source)} -> {_layer(i.target)})"
        for i in IMPORTS
        if _ours(i.target)
        and "testing" not in (_layer(i.source), _layer(i.target))
        and not i.type_checking
        and RANKS[_layer(i.target)] > RANKS[_layer(i.source)]
        and not (_within(i, "delivery.demo") and (i.source, i.function) in DEMO_ALLOWED)
    ]
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_there_is_no_module_level_import_cycle_in_delivery():
    graph: dict[str, set[str]] = {}
    for i in IMPORTS:
        inside = i.source.startswith("delivery") and i.target.startswith("delivery")
        if i.module_level and inside and i.target in SOURCES and i.target != i.source:
            graph.setdefault(i.source, set()).add(i.target)
    assert len(graph) > 30
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tracing_names_the_delivered_outcome_as_the_worker_does():
    # ops/tracing.py compares against a plain string so that ops imports no pipeline stage.
    assert Outcome.DELIVERED.value == tracing.DELIVERED
