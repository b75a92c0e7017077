"""The package's layers import one way, and no two modules import each other.

The layers, lowest first (docs/architecture.md): ``errors, cache, version`` < ``ir`` < ``targets``
< ``frontends, passes`` < ``codegen`` < ``api`` (with ``zoo`` and ``plot``) < ``lm`` (compile_lm) < ``lm_cli``
(``einfuse generate``) < ``cli`` (with ``dynamo``, the torch.compile backend) < the package
root and ``__main__`` (the root imports the compiler on first use). A module may import its own
package and the layers below it, never a sibling in its layer (``frontends`` and ``passes``, say). Every
import counts, also one inside a function (that only delays the dependency); an import under
``if TYPE_CHECKING:`` does not (it is a type, not a dependency). Cycles are found over the same
imports; the IR's nodes and its printer (``ir/nodes <-> ir/text``) are the one pair allowed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import einfuse

ROOT = Path(einfuse.__file__).parent
LAYERS = [("errors", "cache", "version"), ("ir",), ("targets",), ("frontends", "passes"), ("codegen",),
          ("api", "zoo", "plot"), ("kv",), ("lm",), ("lm_cli",), ("cli", "dynamo"), ("__main__", "")]
ALLOWED_CYCLES = [{"einfuse.ir.nodes", "einfuse.ir.text"}]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("einfuse", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The einfuse modules ``name`` imports (a package's ``from . import x``: the submodule)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) in
                   ("TYPE_CHECKING", "typing.TYPE_CHECKING") for stmt in node.body for n in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            while t:   # (and every package above it but the root, whose eager imports are the lowest layers:
                       # importing a module runs their __init__ first)
                if t != name and not name.startswith(t + "."):
                    found.add(t)
                t = t.rpartition(".")[0] if t.count(".") > 1 else ""
    return found


def layer(name: str) -> tuple[int, str]:
    """(rank, layer) of module ``name``."""
    top = name.split(".")[1] if "." in name else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank, top
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and docs/architecture.md)")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_each_layer_imports_only_itself_and_those_below() -> None:
    wrong = []
    for name, deps in graph().items():
        rank, top = layer(name)
        for dep in deps:
            dep_rank, dep_top = layer(dep)
            if dep_rank > rank or (dep_rank == rank and dep_top != top):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_module_cycles() -> None:
    edges = graph()
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1 and c not in ALLOWED_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(", ".join(sorted(c)) for c in cycles)


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                out.append(component)
    return out
