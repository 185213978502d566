"""Structure of the ``ttp_ray`` package, read from the source with :mod:`ast` (nothing is imported).

Three rules:

1. **No import cycles between ttp_ray modules.** The graph has one node per module (``ttp_ray/x.py`` is
   ``ttp_ray.x``; a package is its ``__init__.py``, named by the package: ``ttp_ray.sweep``) and an edge
   for every ``import`` / ``from ... import`` anywhere in a module -- at the top, inside functions, under
   ``if TYPE_CHECKING`` alike -- whose target is a ttp_ray module. Relative imports are resolved against
   the importing module. The target of an import is:

   * ``import a.b.c``: the module ``a.b.c`` (not its parent packages);
   * ``from P import x``: the module ``P.x`` when it exists (``from . import analysis``);
   * otherwise, when ``P`` is a package whose ``__init__`` only re-exports ``x`` (binds it with
     ``from Q import x`` at its top level), the module that defines ``x``, followed through chains of
     re-exports (``from ttp_ray.sweep import SweepSpec`` is an edge to ``ttp_ray.sweep.spec``);
   * otherwise the module ``P`` itself (for a package: its ``__init__``, which defines ``x``).

   So an ``__init__`` re-exporting its submodules' names is never a false cycle with them, while a
   submodule that needs a name the ``__init__`` itself defines, from an ``__init__`` that imports the
   submodule back, is one. Self-edges are ignored. A cycle is reported as ``a -> b -> a``.

   The same graph is checked once more with every subpackage of ttp_ray collapsed to one node
   (``ttp_ray.sweep.driver`` counts as ``ttp_ray.sweep``), so that two layers never import each other, not
   even through different modules (``sweep.driver -> analysis -> sweep.output`` is such a cycle).
2. **No private names across modules.** No module in ``ttp_ray/`` or ``bench/`` imports a name starting
   with one underscore (``_x``, not dunders) from another ttp_ray module (``from ttp_ray.dynamics import
   _resolve``, ``from .kernel import _foo``), or reads one as an attribute of an imported ttp_ray module
   (``dynamics._resolve``). Reported as ``file:line``.
3. **Every ttp_ray module declares ``__all__``** (packages' ``__init__`` included; ``__main__`` entry
   points exempt).

The allow-lists below name the known offenders being fixed elsewhere, one comment each: remove an entry
with its fix. The checkers run on small synthetic packages too (``test_checker_*``), so each rule is shown
to fail when it should.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ttp_ray"

# Cycles allowed for now, each as the exact set of modules of its strongly connected component.
ALLOWED_CYCLES: Sequence[FrozenSet[str]] = ()

# Private imports allowed for now: (file relative to the repo root, imported name).
ALLOWED_PRIVATE: Sequence[Tuple[str, str]] = ()

# Modules allowed to lack __all__ for now.
ALLOWED_WITHOUT_ALL: Sequence[str] = ()


# ------------------------------------------------------------------------------------------- reading

@dataclass
class Module:
    name: str  # dotted, a package by its own name
    path: Path
    rel: str  # the file relative to the repository root, posix
    is_package: bool
    tree: ast.Module


def read_modules(root: Path, package: str = PACKAGE) -> Dict[str, Module]:
    """Every ``.py`` file under ``root/package`` parsed, by dotted module name."""
    out: Dict[str, Module] = {}
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        out[name] = Module(name, path, path.relative_to(root).as_posix(), is_package,
                           ast.parse(path.read_text(), filename=str(path)))
    return out


def absolute_base(importer: Optional[Module], node: ast.ImportFrom) -> str:
    """The module a ``from X import ...`` reads from, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    if importer is None:
        return ""  # a relative import outside the package (bench/): not a ttp_ray module
    parts = importer.name.split(".")
    if not importer.is_package:
        parts = parts[:-1]
    if node.level > 1:
        parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def in_package(name: str, package: str = PACKAGE) -> bool:
    return name == package or name.startswith(package + ".")


def owning_module(name: str, modules: Dict[str, Module]) -> Optional[str]:
    """``name`` if it is a module, else its longest prefix that is one (``import ttp_ray.x.attr``)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


# --------------------------------------------------------------------------------------- import graph

def reexport_source(package: Module, name: str, modules: Dict[str, Module]) -> Optional[Tuple[str, str]]:
    """(module, name there) that ``package``'s ``__init__`` binds ``name`` from at its top level, when that
    is a ttp_ray module; None when the ``__init__`` defines ``name`` itself."""
    for node in package.tree.body:
        if isinstance(node, ast.ImportFrom):
            base = absolute_base(package, node)
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if f"{base}.{alias.name}" in modules:
                        return f"{base}.{alias.name}", ""
                    if base in modules:
                        return base, alias.name
    return None


def defining_module(base: str, name: str, modules: Dict[str, Module]) -> str:
    """The module ``from base import name`` depends on (see the module docstring)."""
    seen = set()
    while True:
        if f"{base}.{name}" in modules:
            return f"{base}.{name}"
        mod = modules[base]
        if not mod.is_package or (base, name) in seen:
            return base
        seen.add((base, name))
        src = reexport_source(mod, name, modules)
        if src is None:
            return base
        base, name = src
        if not name:
            return base


def import_graph(modules: Dict[str, Module]) -> Dict[str, Dict[str, int]]:
    """module -> {imported module: first line of such an import} (edges between ttp_ray modules)."""
    graph: Dict[str, Dict[str, int]] = {name: {} for name in modules}
    for mod in modules.values():
        for node in import_nodes(mod.tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [t for t in (owning_module(a.name, modules) for a in node.names) if t]
            else:
                base = owning_module(absolute_base(mod, node), modules)
                if base is None:
                    continue
                for alias in node.names:
                    targets.append(base if alias.name == "*" else defining_module(base, alias.name, modules))
            for t in targets:
                if t != mod.name:
                    graph[mod.name].setdefault(t, node.lineno)
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def one_cycle(graph: Mapping[str, Iterable[str]], component: Sequence[str]) -> List[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first), closed: [a, b, a]."""
    inside = set(component)
    start = component[0]
    parent: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in inside:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start, start]  # pragma: no cover - a component always has a cycle through each member


def subpackage_graph(graph: Dict[str, Dict[str, int]], package: str = PACKAGE) -> Dict[str, Dict[str, str]]:
    """``graph`` with every module of a subpackage of ``package`` merged into the subpackage's node; each edge
    keeps one module-level import behind it (``a -> b``) as its place."""
    depth = len(package.split(".")) + 1

    def node(name: str) -> str:
        return ".".join(name.split(".")[:depth])

    out: Dict[str, Dict[str, str]] = {node(name): {} for name in graph}
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if node(a) != node(b):
                out[node(a)].setdefault(node(b), f"{a} -> {b}")
    return out


def cycle_problems(modules: Dict[str, Module], allowed: Sequence[FrozenSet[str]] = (),
                   subpackages: bool = False) -> List[str]:
    """One line per import cycle not in ``allowed``: the cycle with the place of each import (``subpackages``:
    on :func:`subpackage_graph`)."""
    graph = import_graph(modules)
    places = {a: {b: f"{modules[a].rel}:{line}" for b, line in t.items()} for a, t in graph.items()}
    if subpackages:
        places = subpackage_graph(graph)
    problems = []
    for comp in strongly_connected(places):
        if frozenset(comp) in set(allowed):
            continue
        cycle = one_cycle(places, comp)
        where = ", ".join(places[a][b] for a, b in zip(cycle, cycle[1:]))
        problems.append(f"import cycle {' -> '.join(cycle)} (imports at {where}; component: {', '.join(comp)})")
    return problems


# ----------------------------------------------------------------------------------------- private names

def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, modules: Dict[str, Module], package: str = PACKAGE) -> List[Tuple[int, str, str]]:
    """(line, imported private name, its module) for every private name ``path`` takes from a ttp_ray module
    other than itself: ``from M import _x`` and ``M._x`` on a name bound to a ttp_ray module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = next((m for m in modules.values() if m.path == path), None)
    found: List[Tuple[int, str, str]] = []
    module_names: Dict[str, str] = {}  # local name -> ttp_ray module it is bound to
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if in_package(a.name, package):
                    if a.asname:
                        module_names[a.asname] = a.name
                    if any(is_private(p) for p in a.name.split(".")):
                        found.append((node.lineno, a.name, a.name))
            continue
        base = absolute_base(me, node)
        if not in_package(base, package):
            continue
        for a in node.names:
            if f"{base}.{a.name}" in modules:
                module_names[a.asname or a.name] = f"{base}.{a.name}"
            if is_private(a.name) and (me is None or base != me.name):
                found.append((node.lineno, a.name, base))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and is_private(node.attr)
                and node.value.id in module_names and (me is None or module_names[node.value.id] != me.name)):
            found.append((node.lineno, node.attr, module_names[node.value.id]))
    return sorted(set(found))


def private_problems(root: Path, dirs: Sequence[str], modules: Dict[str, Module],
                     allowed: Sequence[Tuple[str, str]] = (), package: str = PACKAGE) -> List[str]:
    problems = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(root).as_posix()
            for line, name, source in private_imports(path, modules, package):
                if (rel, name) not in set(allowed):
                    problems.append(f"{rel}:{line}: imports private {name} from {source}")
    return problems


# ---------------------------------------------------------------------------------------------- __all__

def declares_all(tree: ast.Module) -> bool:
    for node in tree.body:
        targets: List[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


def missing_all(modules: Dict[str, Module], allowed: Sequence[str] = ()) -> List[str]:
    return [f"{m.rel}: module {m.name} has no __all__" for m in modules.values()
            if not declares_all(m.tree) and m.name.split(".")[-1] != "__main__" and m.name not in allowed]


# ------------------------------------------------------------------------------------------------ tests

def test_no_import_cycles():
    problems = cycle_problems(read_modules(ROOT), ALLOWED_CYCLES)
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_subpackages():
    problems = cycle_problems(read_modules(ROOT), ALLOWED_CYCLES, subpackages=True)
    assert not problems, "\n".join(problems)


def test_no_private_imports_across_modules():
    problems = private_problems(ROOT, [PACKAGE, "bench"], read_modules(ROOT), ALLOWED_PRIVATE)
    assert not problems, "\n".join(problems)


def test_every_module_declares_all():
    problems = missing_all(read_modules(ROOT), ALLOWED_WITHOUT_ALL)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_the_known_edges():
    """Guards the graph rule itself on the real package: lazy, relative and re-exported imports are edges."""
    graph = import_graph(read_modules(ROOT))
    assert "ttp_ray.sweep.driver" in graph["ttp_ray.sweep.cli"]  # inside a function, relative
    assert "ttp_ray.analysis" in graph["ttp_ray.analysis_cli"]  # from . import analysis
    assert "ttp_ray.tables" in graph["ttp_ray.sweep.output"]
    assert "ttp_ray.sweep" not in graph["ttp_ray.sweep.driver"]


# ---------------------------------------------------------------------- the checkers on synthetic packages

def _package(tmp_path: Path, files: Dict[str, str]) -> Dict[str, Module]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return read_modules(tmp_path)


def test_checker_finds_a_cycle_through_lazy_and_relative_imports(tmp_path):
    mods = _package(tmp_path, {
        "ttp_ray/__init__.py": "__all__ = []\n",
        "ttp_ray/data.py": "__all__ = []\ndef f():\n    from .models import g\n",
        "ttp_ray/models.py": "__all__ = []\nimport ttp_ray.data\n",
        "ttp_ray/other.py": "__all__ = []\nfrom ttp_ray import data\n",
    })
    problems = cycle_problems(mods)
    assert len(problems) == 1 and problems[0].startswith("import cycle ttp_ray.data -> ttp_ray.models -> ttp_ray.data")
    assert cycle_problems(mods, [frozenset({"ttp_ray.data", "ttp_ray.models"})]) == []


def test_checker_reexporting_init_is_no_cycle_but_init_defined_names_are(tmp_path):
    files = {
        "ttp_ray/__init__.py": "__all__ = []\n",
        "ttp_ray/sweep/__init__.py": "from .spec import Spec\nfrom .driver import run\n__all__ = ['Spec', 'run']\n",
        "ttp_ray/sweep/spec.py": "__all__ = ['Spec']\nclass Spec: pass\n",
        "ttp_ray/sweep/driver.py": "from ttp_ray.sweep import Spec\n__all__ = ['run']\ndef run(): pass\n",
    }
    assert cycle_problems(_package(tmp_path, files)) == []
    files["ttp_ray/sweep/__init__.py"] += "LIMIT = 3\n"
    files["ttp_ray/sweep/driver.py"] += "from . import LIMIT\n"
    problems = cycle_problems(_package(tmp_path, files))
    assert problems and "ttp_ray.sweep -> ttp_ray.sweep.driver -> ttp_ray.sweep" in problems[0]


def test_checker_finds_a_cycle_between_subpackages_through_different_modules(tmp_path):
    files = {
        "ttp_ray/__init__.py": "__all__ = []\n",
        "ttp_ray/tables.py": "__all__ = []\n",
        "ttp_ray/sweep/__init__.py": "__all__ = []\n",
        "ttp_ray/sweep/output.py": "from ..tables import *\n__all__ = []\n",
        "ttp_ray/sweep/driver.py": "__all__ = []\ndef summary():\n    from .. import analysis\n",
        "ttp_ray/analysis.py": "__all__ = []\ndef load():\n    from .sweep.output import read_table\n",
    }
    mods = _package(tmp_path, files)
    assert cycle_problems(mods) == []  # no module-level cycle
    problems = cycle_problems(mods, subpackages=True)
    assert problems == ["import cycle ttp_ray.analysis -> ttp_ray.sweep -> ttp_ray.analysis (imports at "
                        "ttp_ray.analysis -> ttp_ray.sweep.output, ttp_ray.sweep.driver -> ttp_ray.analysis; "
                        "component: ttp_ray.analysis, ttp_ray.sweep)"]
    files["ttp_ray/analysis.py"] = "__all__ = []\ndef load():\n    from .tables import read_table\n"
    assert cycle_problems(_package(tmp_path, files), subpackages=True) == []


def test_checker_finds_private_imports(tmp_path):
    mods = _package(tmp_path, {
        "ttp_ray/__init__.py": "__all__ = []\n",
        "ttp_ray/dynamics.py": "__all__ = []\ndef _resolve(): pass\n_resolve()\n",
        "ttp_ray/kernel.py": "__all__ = []\nfrom .dynamics import _resolve\nfrom . import dynamics\ndynamics._resolve()\n",
        "bench/project.py": "from ttp_ray.dynamics import SimConfig, _resolve\nfrom ttp_ray import __version__\n",
    })
    problems = private_problems(tmp_path, ["ttp_ray", "bench"], mods)
    assert problems == ["ttp_ray/kernel.py:2: imports private _resolve from ttp_ray.dynamics",
                        "ttp_ray/kernel.py:4: imports private _resolve from ttp_ray.dynamics",
                        "bench/project.py:1: imports private _resolve from ttp_ray.dynamics"]
    assert private_problems(tmp_path, ["bench"], mods, [("bench/project.py", "_resolve")]) == []


def test_checker_finds_a_module_without_all(tmp_path):
    mods = _package(tmp_path, {
        "ttp_ray/__init__.py": "__all__ = []\n",
        "ttp_ray/sub/__init__.py": "from .a import x\n",
        "ttp_ray/sub/a.py": "__all__: list = ['x']\n__all__ += []\nx = 1\n",
        "ttp_ray/__main__.py": "print()\n",
    })
    problems = missing_all(mods)
    assert len(problems) == 1 and "module ttp_ray.sub has no __all__" in problems[0]
