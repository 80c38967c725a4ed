"""dsquant's own import graph has no cycles, and every module imports on its own in a fresh interpreter.

The graph is read from the source (every import statement, also those inside functions, which a run would only
follow when that function is called), so a circle closed by a deferred import is found too. `kernels/` is the
subpackage dsquant.kernels, as installed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Known cycles, each the set of modules of one strongly connected component. The V3 config writer hands a V4
# plan to the V4 writer, which reuses the V3 writer's file names.
ALLOWED_CYCLES = [{"dsquant.convert.config", "dsquant.convert.v4_config"}]


def _modules() -> dict[str, Path]:
    out = {}
    for top, package in (("dsquant", ["dsquant"]), ("kernels", ["dsquant", "kernels"])):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = package + list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _in_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str):
    """For every module an import statement in `tree` names, the names it may be, most specific first
    (`from a import b` is a.b if that is a module, else a), skipping `if TYPE_CHECKING:` blocks, which never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _in_type_checking(node):
            yield from (names for child in node.orelse for names in _imported_names(child, package))
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name,) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield from ((f"{base}.{alias.name}", base) for alias in node.names)
        yield from _imported_names(node, package)


def import_graph() -> dict[str, set[str]]:
    """module -> the dsquant modules it imports."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for candidates in _imported_names(ast.parse(path.read_text(), str(path)), package):
            for imported in candidates:
                imported = "dsquant." + imported if imported.split(".")[0] == "kernels" else imported
                if imported in modules:
                    if imported != name:
                        targets.add(imported)
                    break
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_cycles_finds_a_circle_closed_by_a_deferred_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    source = "def f():\n    from dsquant import hub\n"  # the deferred import is an edge
    assert ("dsquant.hub", "dsquant") in set(_imported_names(ast.parse(source), "dsquant"))
    assert not set(_imported_names(ast.parse("if TYPE_CHECKING:\n    import dsquant.hub\n"), "dsquant"))


def test_dsquant_import_graph_has_no_cycles():
    found = cycles(import_graph())
    unexpected = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles in dsquant: {unexpected}"
    gone = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not gone, f"no longer a cycle, remove from ALLOWED_CYCLES: {gone}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in _modules() if not n.endswith("__main__"))  # __main__ runs the CLI
    script = ("import importlib, sys, traceback\nfailed = []\n"
              f"for name in {names!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc(limit=-1).strip())\n"
              "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-P", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
