"""The package's layout: no import cycles, no library module importing a command-line module, and the network
files start with the network (the CPU kernels live in models/kernels.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eomt_jax"
# Thin command lines: nothing else in the package may import them.
COMMAND_LINES = {"eomt_jax.main", "eomt_jax.predict", "eomt_jax.evaluate", "eomt_jax.export", "eomt_jax.benchmark",
                 "eomt_jax.__main__", "eomt_jax.conversion.cli", "eomt_jax.data.throughput"}
# The optional TFDS source is imported lazily, only when asked for, by the registry that names it.
LAZY = {("eomt_jax.data.registry", "eomt_jax.data.tfds_source")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    # A package's __init__ re-exporting its own modules is no dependency.
    return {m for m in found & known if m != name and not m.startswith(name + ".")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) - {d for (a, d) in LAZY if a == m} for m, p in modules.items()}


def test_no_library_module_imports_a_command_line_module():
    graph = _graph()
    assert COMMAND_LINES <= set(graph)
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps & COMMAND_LINES)
    assert not bad, bad


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_network_files_start_with_the_network_and_hold_no_cpu_kernel():
    for name in ("vit.py", "eomt.py"):
        tree = ast.parse((PACKAGE / "models" / name).read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        assert isinstance(defs[0], ast.ClassDef), f"{name} starts with {defs[0].name}, not a class of the network"
        names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        assert not names & {"cpu_inference_path", "dot_general", "_chunked_attention", "_attend"}, name
