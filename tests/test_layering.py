"""The package's layers import one way: graph -> passes -> emit -> runtime -> capture -> inspection.

Read with ast (nothing is executed), every import counts, function-level ones included (a lazy import that
hides a cycle is still a cycle). A module may import its own layer and the layers below; `options.py` is
below everything. The test also plants a bad import in a copy of the package and checks it is caught.
"""
from __future__ import annotations

import ast
import os
import shutil

import networkx as nx

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusebackend")
ORDER = ["options", "graph", "passes", "emit", "runtime", "capture", "inspection"]
LOOSE = {"__init__", "__main__", "options"}


def _modules(root):
    """dotted name (relative to the package) -> file path."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(name, path, known):
    """Package modules that module `name` imports (resolved against the known module names)."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "fusebackend" or node.module.startswith("fusebackend.")):
                mod = node.module[len("fusebackend."):] if node.module != "fusebackend" else ""
            else:
                continue
            targets = [mod + "." + a.name if mod else a.name for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("fusebackend."):] for a in node.names if a.name.startswith("fusebackend.")]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            # a package that contains the importer is already loaded (its parent): not an edge
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _layer(module):
    top = module.split(".")[0]
    if top in LOOSE and top != "options":
        return len(ORDER)            # the package's root: above every layer
    return ORDER.index(top)


def layer_problems(root=PACKAGE) -> list:
    mods = _modules(root)
    g = nx.DiGraph()
    problems = []
    for name, path in mods.items():
        if not name:
            continue
        g.add_node(name)
        for dep in _imports(name, path, mods):
            if not dep:
                continue
            g.add_edge(name, dep)
            if _layer(dep) > _layer(name):
                problems.append("%s imports %s: %s is above %s" % (name, dep, dep.split(".")[0],
                                                                   name.split(".")[0]))
    for cycle in nx.simple_cycles(g):
        problems.append("import cycle: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def test_the_top_level_holds_only_the_layers_and_three_loose_files():
    entries = {e for e in os.listdir(PACKAGE) if not e.startswith((".", "__pycache__"))}
    folders = {e for e in entries if os.path.isdir(os.path.join(PACKAGE, e))}
    assert folders == set(ORDER[1:]), folders
    assert entries - folders == {"__init__.py", "__main__.py", "options.py"}, entries - folders


def test_imports_follow_the_layer_order_without_cycles():
    assert layer_problems() == []


def test_a_planted_bad_import_and_a_planted_cycle_are_caught(tmp_path):
    copy = tmp_path / "fusebackend"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "include"))
    with open(copy / "passes" / "cse.py", "a") as f:
        f.write("\n\ndef _bad():\n    from ..runtime import build\n")
    with open(copy / "graph" / "splits.py", "a") as f:
        f.write("\nfrom .lower import lower\n")
    problems = layer_problems(str(copy))
    assert any(p.startswith("passes.cse imports runtime.build") for p in problems), problems
    assert any("import cycle" in p and "graph.splits" in p and "graph.lower" in p for p in problems), problems
