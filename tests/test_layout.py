"""The package's layout: no import cycle between its modules, local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import snrmoe_dask


def _imports() -> dict[str, set[str]]:
    pkg = Path(snrmoe_dask.__file__).parent
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):  # every import, at module level or inside a function
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "snrmoe_dask."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = deps - {f.stem}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    assert {"fit", "evaluate", "predict", "store", "reduce", "leakage"} <= set(graph)
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if v == "__init__":
                continue  # the package's public names re-export from the modules
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for module in sorted(graph):
        if module != "__init__" and module not in state:
            visit(module)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_kernels_do_not_import_the_stages():
    """NumPy kernels, then the dask layer, then the stages: a kernel never reaches up."""
    graph = _imports()
    kernels = {"stats", "ridge", "features", "bins", "blas", "lines", "physics", "metrics", "leakage", "gates", "pca",
               "bootstrap", "split"}
    stages = {"fit", "evaluate", "predict", "audit", "pipeline", "cli", "estimator", "report"}
    for k in kernels & set(graph):
        assert not graph[k] & stages, (k, graph[k] & stages)
