"""Imports run one way: read every module under stn_deploy/ with ``ast`` and check the graph.

The rules (commands -> library -> runners -> config): no import cycles; runners
(``stn_deploy.backends``) know nothing of exporters, commands or serving; exporters know
nothing of commands; no library module imports the commands or the CLI; no module imports the
package root ``stn_deploy`` (its ``__init__`` is the public face, not a place to take names
from); and importing the package or its CLI loads no heavy runtime.

The graph is built from the source files found on disk, so it covers whatever modules exist.
Function-level imports count as edges like module-level ones: a lazy import defers the cost
of loading a module, it does not remove the dependency, and two modules that import each
other inside functions are still one tangle to read and change. Imports under
``if TYPE_CHECKING:`` never run, so they are left out of the cycle check (they are how a type
may be named without a run-time dependency), but they still obey the layering rules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "stn_deploy"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "nncf")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported stn_deploy module (a submodule where the name is one)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    root_names: tuple[str, ...]  # names taken from the package root itself (should be none)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every Import/ImportFrom under ``node``, module- or function-level, with whether it sits
    under ``if TYPE_CHECKING:`` (whose else branch does run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, type_only
        elif isinstance(child, ast.If) and _is_type_checking(child):
            yield from _walk(ast.Module(body=child.body, type_ignores=[]), True)
            yield from _walk(ast.Module(body=child.orelse, type_ignores=[]), type_only)
        else:
            yield from _walk(child, type_only)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def edges_of(module: str) -> list[Edge]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), str(MODULES[module]))
    out = []
    for node, type_only in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    root = ("<import stn_deploy>",) if alias.name == PACKAGE else ()
                    out.append(Edge(module, alias.name, node.lineno, type_only, root))
            continue
        target = _absolute(module, node)
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        plain = []
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in MODULES:
                out.append(Edge(module, sub, node.lineno, type_only, ()))
            else:
                plain.append(alias.name)
        if plain:
            root = tuple(plain) if target == PACKAGE else ()
            out.append(Edge(module, target, node.lineno, type_only, root))
    return out


EDGES: list[Edge] = [e for m in MODULES for e in edges_of(m)]


def where(e: Edge) -> str:
    return f"{MODULES[e.source].relative_to(ROOT.parent)}:{e.line} imports {e.target}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_is_read() -> None:
    """Guards the checks below against passing on an empty graph."""
    assert {"stn_deploy.cli", "stn_deploy.backends.trt", "stn_deploy.version"} <= set(MODULES)
    assert any(e.source == "stn_deploy.cli" and e.target == "stn_deploy.version" for e in EDGES)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in EDGES:
        if not e.type_only and e.target in MODULES and e.target != e.source:
            graph[e.source].add(e.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# (importer package, forbidden packages, why)
LAYERS = [
    ("stn_deploy.names", (PACKAGE,),
     "the vocabulary sits below every layer, so that every layer may import it"),
    ("stn_deploy.backends", ("stn_deploy.export", "stn_deploy.commands", "stn_deploy.serving"),
     "runners sit below exporters, serving and commands"),
    ("stn_deploy.export", ("stn_deploy.commands",), "exporters sit below commands"),
]


@pytest.mark.parametrize("importer,forbidden,why", LAYERS, ids=[la[0] for la in LAYERS])
def test_layers(importer: str, forbidden: tuple[str, ...], why: str) -> None:
    bad = [where(e) for e in EDGES if within(e.source, importer)
           and any(within(e.target, f) for f in forbidden)]
    assert bad == [], f"{why}:\n" + "\n".join(bad)


def test_the_vocabulary_needs_only_the_standard_library() -> None:
    """Commands, exporters and runners all import stn_deploy.names, so it may load nothing
    they would not: no third-party package, not even click."""
    tree = ast.parse(MODULES["stn_deploy.names"].read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node, _ in _walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node, _ in _walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names | {"__future__"}, imported


def test_library_never_imports_commands_or_cli() -> None:
    front = ("stn_deploy.commands", "stn_deploy.cli", "stn_deploy.__main__")
    bad = [where(e) for e in EDGES if not any(within(e.source, f) for f in front)
           and any(within(e.target, f) for f in ("stn_deploy.commands", "stn_deploy.cli"))]
    assert bad == [], "library modules import the command layer:\n" + "\n".join(bad)


def test_no_module_imports_the_package_root() -> None:
    """``from stn_deploy import __version__`` runs the package's __init__ from inside the
    package and ties every module to it; the version lives in ``stn_deploy.version``."""
    bad = [f"{MODULES[e.source].relative_to(ROOT.parent)}:{e.line} takes "
           f"{', '.join(e.root_names)} from the package root" for e in EDGES if e.root_names]
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("module", ["stn_deploy", "stn_deploy.cli"])
def test_import_loads_no_heavy_runtime(module: str) -> None:
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import {module} loaded {out.stdout.strip()}"
